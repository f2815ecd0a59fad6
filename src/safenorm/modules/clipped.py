"""Per-sample-clipped-statistics batch normalization layers."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from safenorm import functional as SF
from safenorm import ops
from safenorm.modules._base import SafeBatchNormBase, check_ghost_batch_size, resolve_bound
from safenorm.modules._ranks import ANY_RANK, COMMON_ARGS_DOC, RANK_1D, RANK_2D, RANK_3D, SHAPE_DOC

__all__ = ["ClippedBatchNorm", "ClippedBatchNorm1d", "ClippedBatchNorm2d", "ClippedBatchNorm3d"]

# Defaults in units of the running statistics, as an RMS per channel (bound = k * sqrt(C)):
# typical samples sit near 1 per channel, so only outliers are clipped.
DEFAULT_MEAN_CLIP_PER_CHANNEL = 2.0
DEFAULT_VAR_CLIP_PER_CHANNEL = 4.0

ClipReferenceName = Literal["running", "none"]


def check_sync(layer: str, process_group: Any, ghost_batch_size: int | None) -> None:
    if process_group is not None and ghost_batch_size is not None:
        raise ValueError(
            f"{layer}: ghost_batch_size cannot be combined with a process_group; use one or the "
            "other"
        )


def clip_reference_of(layer: SafeBatchNormBase) -> SF.ClipReference:
    """The public clipping reference of a clipped or DP layer: raw units, or a snapshot of its
    running statistics (as they are before this forward updates them)."""
    if layer.clip_reference == "none":
        return SF.ClipReference()
    if layer.running_mean is None or layer.running_var is None:
        return SF.ClipReference()
    # Taken lazily (before this forward's update); the kernels read the buffers themselves.
    return ops.RunningReference(layer.running_mean, layer.running_var, layer.eps)


def check_reference(layer: str, clip_reference: str) -> None:
    if clip_reference not in ("running", "none"):
        raise ValueError(
            f"{layer}: clip_reference must be 'running' or 'none', got {clip_reference!r}"
        )


class ClippedBatchNorm(SafeBatchNormBase):
    __doc__ = (
        r"""Batch normalization whose statistics sum per-sample contributions clipped in L2 norm.

    With per-sample moments ``m_i`` (mean over the spatial axes) and ``w_i`` (spatial variance),
    and ``D`` the actual batch (or ghost group) size::

        mu  = c + s * (1/D) sum_i clip((m_i - c) / s, R1)
        var = s^2 * (1/D) sum_i clip((w_i + (m_i - mu)^2) / s^2, R2)

    where ``clip(u, R) = u * min(1, R / ||u||_2)`` over channels and ``(c, s)`` is the clipping
    reference: the running statistics ``(running_mean, sqrt(running_var + eps))`` by default
    (so one default bound fits every layer), or raw units ``(0, 1)``. Replacing one sample moves
    ``mu`` by at most ``2 * s * R1 / D`` (elementwise ``s``), whatever its values; gradients flow
    through the clipped statistics. With infinite bounds the layer is exactly ``nn.BatchNorm``.

    .. note:: Clipping bounds a sample's influence; it is **not** differential privacy (no noise,
       and the running statistics are an unprotected, if robust, summary of the data). For DP
       training use :class:`DPBatchNorm2d`.

    .. note:: With the running reference, statistics far from the initial ``(0, 1)`` are clipped
       hard for the first steps, until the running statistics catch up (a few hundred steps at
       momentum 0.1). Use ``clip_reference="none"`` with bounds in raw units to avoid that.
"""
        + COMMON_ARGS_DOC
        + """        clip_norm: ``R1``, L2 bound over channels of each sample's mean
            contribution, in reference units. Default: ``2 * sqrt(num_features)``
        var_clip_norm: ``R2``, bound of each sample's centred second-moment contribution.
            Default: ``4 * sqrt(num_features)``
        ghost_batch_size: optional consecutive ghost groups of this size. Default: ``None``
        clip_reference: ``"running"`` or ``"none"`` (raw units; also used when the layer has no
            running statistics). Default: ``"running"``
        detach_statistics: stop gradients through the statistics. Default: ``False``
        process_group: sync the clipped sums and batch sizes over this ``torch.distributed``
            group (as ``nn.SyncBatchNorm``); ``None`` for no sync. Default: ``None``
"""
        + SHAPE_DOC
    )

    _input_ranks = ANY_RANK
    _variant_args: ClassVar[tuple[str, ...]] = (
        "clip_norm",
        "var_clip_norm",
        "ghost_batch_size",
        "clip_reference",
    )

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        clip_norm: float | None = None,
        var_clip_norm: float | None = None,
        ghost_batch_size: int | None = None,
        clip_reference: ClipReferenceName = "running",
        detach_statistics: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        check_reference(type(self).__name__, clip_reference)
        check_ghost_batch_size(type(self).__name__, ghost_batch_size, optional=True)
        self.clip_norm = resolve_bound(clip_norm, DEFAULT_MEAN_CLIP_PER_CHANNEL, num_features)
        self.var_clip_norm = resolve_bound(
            var_clip_norm, DEFAULT_VAR_CLIP_PER_CHANNEL, num_features
        )
        self.ghost_batch_size = ghost_batch_size
        self.clip_reference = clip_reference
        self.detach_statistics = detach_statistics
        self.process_group = process_group
        check_sync(type(self).__name__, process_group, ghost_batch_size)

    def _reference(self) -> SF.ClipReference:
        return clip_reference_of(self)

    def _handles_empty_batch(self) -> bool:
        # A process with no samples must still join the all-reduce of the others.
        return self.process_group is not None

    def _batch_forward(self, input: Tensor) -> Tensor:
        all_reduce, _ = self._all_reduce()
        reference = self._reference()
        momentum = self._momentum_factor()
        running_mean, running_var = self._running_buffers()
        return SF.clipped_batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
            clip_norm=self.clip_norm,
            var_clip_norm=self.var_clip_norm,
            ghost_batch_size=self.ghost_batch_size,
            reference=reference,
            detach_statistics=self.detach_statistics,
            all_reduce=all_reduce,
        )


class ClippedBatchNorm1d(ClippedBatchNorm):
    __doc__ = ClippedBatchNorm.__doc__
    _input_ranks = RANK_1D


class ClippedBatchNorm2d(ClippedBatchNorm):
    __doc__ = ClippedBatchNorm.__doc__
    _input_ranks = RANK_2D


class ClippedBatchNorm3d(ClippedBatchNorm):
    __doc__ = ClippedBatchNorm.__doc__
    _input_ranks = RANK_3D
