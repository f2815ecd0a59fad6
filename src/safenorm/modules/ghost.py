"""Ghost-batch normalization layers."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from safenorm import functional as SF
from safenorm.modules._base import SafeBatchNormBase, check_ghost_batch_size
from safenorm.modules._ranks import ANY_RANK, COMMON_ARGS_DOC, RANK_1D, RANK_2D, RANK_3D, SHAPE_DOC

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]

DEFAULT_GHOST_BATCH_SIZE = 32


class GhostBatchNorm(SafeBatchNormBase):
    __doc__ = (
        """Ghost-batch normalization: the batch is cut into consecutive groups of
    ``ghost_batch_size`` samples (the last may be smaller) and each group is normalized with its
    own mean and variance; gradients flow through the group statistics as in BatchNorm.

    Running statistics are updated once per forward: the size-weighted mean of the group means
    and the pooled unbiased within-group variance. With ``ghost_batch_size >= N`` the layer is
    exactly ``nn.BatchNorm``.

    .. note:: Ghost batching is **not** a differential-privacy mechanism. It confines a sample's
       influence to its ``g - 1`` group mates, but within a group the influence is unbounded, and
       the running statistics are an unprotected summary of the training data. For DP training
       use :class:`DPBatchNorm2d`.
"""
        + COMMON_ARGS_DOC
        + """        ghost_batch_size: samples per group ``g`` (keyword-only). Default: 32
"""
        + SHAPE_DOC
    )

    _input_ranks = ANY_RANK
    _variant_args: ClassVar[tuple[str, ...]] = ("ghost_batch_size",)

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
        ghost_batch_size: int = DEFAULT_GHOST_BATCH_SIZE,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        check_ghost_batch_size(type(self).__name__, ghost_batch_size, optional=False)
        self.ghost_batch_size = ghost_batch_size

    def _batch_forward(self, input: Tensor) -> Tensor:
        momentum = self._momentum_factor()
        running_mean, running_var = self._running_buffers()
        return SF.ghost_batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
            ghost_batch_size=self.ghost_batch_size,
        )


class GhostBatchNorm1d(GhostBatchNorm):
    __doc__ = GhostBatchNorm.__doc__
    _input_ranks = RANK_1D


class GhostBatchNorm2d(GhostBatchNorm):
    __doc__ = GhostBatchNorm.__doc__
    _input_ranks = RANK_2D


class GhostBatchNorm3d(GhostBatchNorm):
    __doc__ = GhostBatchNorm.__doc__
    _input_ranks = RANK_3D
