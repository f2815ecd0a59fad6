"""The primitives every safenorm layer is built from, each by the Triton kernels or PyTorch.

A training forward is three stages (DESIGN.md §6): per-sample moments, the per-channel combine
(stage 2: clipping, groups, noise, floor, running update, coefficients) and normalize; a
backward is a reduce pass, the combine's vector-Jacobian product and the ``dx`` pass.

* The fused pipeline (:func:`train_forward`, :func:`train_backward`, :func:`release`) runs
  eager code on the kernels: three launches forward, three backward for every variant, the
  finite-statistics check included (:mod:`safenorm.kernels.combine`).
* The ``*_impl`` functions are the implementations of the custom ops
  (:mod:`safenorm.ops.registrations`, what ``torch.compile`` captures): the kernels where they
  run on the tensor (:func:`~safenorm.ops.backend.use_kernels`), else PyTorch with the
  reference math of :mod:`safenorm.functional`; stage 2 there is PyTorch (the compiler fuses it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from safenorm import functional as SF
from safenorm.noise import gaussian_noise
from safenorm.ops.backend import kernel_modules, use_kernels

__all__ = [
    "RunningReference",
    "Stage2",
    "TrainState",
    "release",
    "train_backward",
    "train_forward",
]


# ----------------------------------------------------------------------------------------------
# What stage 2 computes
# ----------------------------------------------------------------------------------------------


class RunningReference:
    """The clipping reference of a layer's running statistics, ``(running_mean,
    sqrt(running_var + eps))`` as they are before this forward updates them: a
    :class:`safenorm.functional.ClipReference` (same attributes and methods) taken late.

    :meth:`safenorm.functional.ClipReference.from_running` copies them at once (three
    operations); this one copies them the first time :attr:`center` or :attr:`scale` is read,
    which every path does before its running update. On the kernels nothing reads them: the
    combine reads the buffers itself, before it writes them, and hands back its snapshot
    (:meth:`adopt`), so the backward and any later reader see the values it clipped with.
    """

    def __init__(self, running_mean: Tensor, running_var: Tensor, eps: float) -> None:
        self.running = (running_mean, running_var, float(eps))
        self._snapshot: tuple[Tensor, Tensor] | None = None

    @property
    def taken(self) -> bool:
        """Whether the snapshot exists (from a read or from the kernel)."""
        return self._snapshot is not None

    def adopt(self, center: Tensor, scale: Tensor) -> None:
        self._snapshot = (center, scale)

    def _values(self) -> tuple[Tensor, Tensor]:
        if self._snapshot is None:
            snapshot = SF.ClipReference.from_running(*self.running)
            self.adopt(snapshot.center, snapshot.scale)
        return self._snapshot

    @property
    def center(self) -> Tensor:
        return self._values()[0]

    @property
    def scale(self) -> Tensor:
        return self._values()[1]

    def center_like(self, m: Tensor) -> Tensor:
        return self.center.to(m.dtype)

    def scale_like(self, m: Tensor) -> Tensor:
        return self.scale.to(m.dtype)

    def __repr__(self) -> str:
        return f"RunningReference(eps={self.running[2]}, taken={self.taken})"


@dataclass(frozen=True)
class Stage2:
    """The per-channel combine of one layer: one description for ghost, clipped and DP BN.

    Attributes:
        ghost_batch_size: consecutive groups (ghost, clipped), or the target size of the
            independently drawn groups (DP); ``None`` for one group.
        clip_norm, var_clip_norm: ``R1``, ``R2`` (``inf``: no clipping).
        reference: the clipping reference (public centre and scale), or ``None``.
        var_floor: lower bound of the variance in units of ``scale^2``.
        detach_statistics: no gradient through the statistics.
        noise_multiplier: ``sigma`` of the DP releases.
        denominator: the public batch size ``D`` of a DP release (``None``: not DP).
        var_release: the DP variance release, ``"linear"`` (fused by the kernels) or ``"log"``
            (compiled code only: the custom op runs the reference math).
    """

    ghost_batch_size: int | None = None
    clip_norm: float = math.inf
    var_clip_norm: float = math.inf
    reference: SF.ClipReference | None = None
    var_floor: float = 0.0
    detach_statistics: bool = False
    noise_multiplier: float = 0.0
    denominator: float | None = None
    var_release: str = "linear"

    @property
    def clipped(self) -> bool:
        return not (math.isinf(self.clip_norm) and math.isinf(self.var_clip_norm))

    def reference_tensors(self) -> tuple[Tensor | None, Tensor | None]:
        reference = self.reference or SF.ClipReference()
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return detach(reference.center), detach(reference.scale)

    def combine_reference(self, running_mean: Tensor | None, running_var: Tensor | None) -> dict:
        """The reference arguments of the combine kernel: the kernel reads a running reference
        not yet taken from the very buffers it updates, else it gets the tensors."""
        reference = self.reference
        if (
            isinstance(reference, RunningReference)
            and not reference.taken
            and reference.running[0] is running_mean
            and reference.running[1] is running_var
        ):
            return {"reference_eps": reference.running[2]}
        center, scale = self.reference_tensors()
        return {"center": center, "scale": scale}

    def weight_floors(self, channels: int) -> tuple[float, float] | None:
        """``(rho1, rho2)`` of the clipped layer's self-normalized sums
        (:func:`safenorm.functional.clipped_statistics`), or ``None`` for sums divided by the
        public denominator (the DP release) or without clipping (ghost BN)."""
        if self.denominator is not None or not self.clipped:
            return None
        floor = SF.weight_floor
        return floor(self.clip_norm, channels), floor(self.var_clip_norm, channels)

    def adopt_reference(self, combined: object) -> None:
        """Hand the kernel's snapshot of a running reference back to it."""
        if getattr(combined, "reference", None) is not None:
            self.reference.adopt(combined.reference[0], combined.reference[1])


# ----------------------------------------------------------------------------------------------
# Small helpers (shapes, groups, views)
# ----------------------------------------------------------------------------------------------


def stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def view(t: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` or ``(N, C)`` values as a view broadcastable against ``x`` of ``(N, C, *S)``."""
    tail = [1] * (x.dim() - 2)
    return t.reshape(*t.shape, *tail) if t.dim() == 2 else t.reshape(1, -1, *tail)


def spatial_sum(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.sum(dim=tuple(range(2, t.dim())))


def group_count(n: int, ghost_batch_size: int) -> int:
    g = n if ghost_batch_size <= 0 or ghost_batch_size >= n else ghost_batch_size
    return max(1, -(-n // max(g, 1)))


def consecutive_groups(n: int, ghost_batch_size: int, device: torch.device) -> SF.Groups:
    """:func:`safenorm.functional.consecutive_groups` without ``bincount`` (traceable)."""
    g = max(1, n if ghost_batch_size <= 0 or ghost_batch_size >= n else ghost_batch_size)
    count = group_count(n, ghost_batch_size)
    size = torch.clamp(n - torch.arange(count, device=device) * g, max=g).to(torch.float32)
    return SF.Groups(index=torch.arange(n, device=device) // g, size=size)


def group_statistics(
    m: Tensor,
    w: Tensor,
    groups: SF.Groups,
    clipped: bool,
    clip_norm: float,
    var_clip_norm: float,
    center: Tensor | None,
    scale: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Stage 2 of the ghost / clipped variants: ``(G, C)`` group mean and variance."""
    if not clipped:
        return SF.batch_statistics(m, w, groups)
    stats = SF.clipped_statistics(
        m,
        w,
        groups,
        clip_norm=clip_norm,
        var_clip_norm=var_clip_norm,
        reference=SF.ClipReference(center=center, scale=scale),
    )
    return stats.mean, stats.var


def affine_coefficients(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(rstd, scale, shift)`` with ``y = x * scale + shift`` (as :func:`SF.normalize`)."""
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return rstd, scale, shift


def normalize_impl(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if use_kernels(x):
        _, scale, shift = affine_coefficients(mean.float(), var.float(), weight, bias, eps)
        return kernel_modules().normalize.normalize_forward(x, scale, shift)
    return SF.normalize(x, mean, var, weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Implementations: plain functions run by the custom ops (compiled code) and by the eager
# autograd Functions below. Eager code calls them directly because a custom op's Python dispatch
# costs tens of microseconds per call, which on a GPU is more than the kernels take.
# ----------------------------------------------------------------------------------------------


def moments_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    if use_kernels(x):
        return kernel_modules().moments.moments_forward(x)
    m, w = SF.per_sample_moments(x)
    if x.dim() == 2 or m.numel() == 0:  # outputs must not alias x or each other
        m, w = m.clone(), w.clone()
    return m, w


def affine_grad_sums_reference(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    dtype = stat_dtype(x)
    dy = grad_output.to(dtype)
    xhat = (x.to(dtype) - view(mean.to(dtype), x)) * view(rstd.to(dtype), x)
    sdy = spatial_sum(dy)
    return spatial_sum(dy * xhat), (sdy.clone() if sdy is grad_output else sdy)


def affine_grad_sums_impl(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    if use_kernels(x) and use_kernels(grad_output):
        _, sdyx, sdy = kernel_modules().normalize.normalize_backward(
            grad_output, x, mean, rstd, None
        )
        return sdyx, sdy
    return affine_grad_sums_reference(grad_output, x, mean, rstd)


def normalize_backward_impl(
    grad_output: Tensor,
    x: Tensor,
    scale: Tensor,
    coef: Tensor | None,
    center: Tensor | None,
    offset: Tensor | None,
) -> Tensor:
    if use_kernels(x) and use_kernels(grad_output):
        dx, _, _ = kernel_modules().normalize.normalize_backward(
            grad_output, x, None, None, scale, coef, center, offset
        )
        return dx
    dtype = stat_dtype(x)
    dx = grad_output.to(dtype) * view(scale.to(dtype), x)
    if coef is not None and center is not None and offset is not None:
        dx = dx + view(coef.to(dtype), x) * (x.to(dtype) - view(center.to(dtype), x))
        dx = dx + view(offset.to(dtype), x)
    return dx.to(x.dtype)


def frozen_normalize_backward_impl(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    if use_kernels(x) and use_kernels(grad_output):
        return kernel_modules().normalize.normalize_backward(grad_output, x, mean, rstd, scale)
    dx = normalize_backward_impl(grad_output, x, scale, None, None, None)
    sdyx, sdy = affine_grad_sums_impl(grad_output, x, mean, rstd)
    return dx, sdyx, sdy


def batch_norm_train_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    center: Tensor | None,
    scale: Tensor | None,
    eps: float,
    ghost_batch_size: int,
    clipped: bool,
    clip_norm: float,
    var_clip_norm: float,
    detach_statistics: bool,
    *,
    make_groups: Callable[[int, int, torch.device], SF.Groups] = consecutive_groups,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    m, w = moments_impl(x)
    groups = make_groups(x.shape[0], ghost_batch_size, x.device)
    mean, var = group_statistics(m, w, groups, clipped, clip_norm, var_clip_norm, center, scale)
    mean_x, var_x = groups.normalization_statistics(mean, var)
    y = normalize_impl(x, mean_x, var_x, weight, bias, eps)
    return y, mean, var, m, w


def normalize_op_impl(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    # Not SF.frozen_normalize, which hands the work back to these primitives when they route.
    return normalize_impl(x, mean.detach(), var.detach(), weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# The fused pipeline (eager code on the kernels)
# ----------------------------------------------------------------------------------------------


def _group(n: int, ghost_batch_size: int | None) -> int:
    """Samples per consecutive group (``n`` for one group)."""
    return n if ghost_batch_size is None or ghost_batch_size >= n else max(1, ghost_batch_size)


@functools.lru_cache(maxsize=64)
def _cached_sizes(n: int, group: int, denominator: float | None, device: torch.device) -> Tensor:
    if denominator is not None:
        return torch.full((1,), float(denominator), device=device)
    count = -(-n // group) if n > 0 else 1
    return torch.clamp(n - torch.arange(count, device=device) * group, max=group).float()


def _sizes(n: int, group: int, denominator: float | None, device: torch.device) -> Tensor:
    """The groups' denominators: actual sizes of consecutive groups, or one public ``D``.

    Read-only, so eager code reuses them per batch size (building them is a few launches);
    not under inference mode, whose tensors could not be used by autograd later.
    """
    if torch.is_inference_mode_enabled():
        return _cached_sizes.__wrapped__(n, group, denominator, device)
    return _cached_sizes(n, group, denominator, torch.device(device))


@dataclass(frozen=True)
class TrainState:
    """What :func:`train_backward` needs from :func:`train_forward`."""

    combined: object  # safenorm.kernels.combine.Combined
    sizes: Tensor
    group: int


def train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    stage2: Stage2,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, TrainState]:
    """Training-mode ghost / clipped batch norm in three launches: stage-1 partials, the
    combine (running update and, with ``num_batches_tracked``, the finite check), normalize."""
    kernels = kernel_modules()
    n, spatial = x.shape[0], math.prod(x.shape[2:])
    group = _group(n, stage2.ghost_batch_size)
    sizes = _sizes(n, group, None, x.device)
    update = running_mean is not None and running_var is not None
    combined = kernels.combine.combine_forward(
        kernels.moments.moments_partials(x),
        spatial,
        sizes,
        group_size=group,
        **stage2.combine_reference(running_mean, running_var),
        clip_norm=stage2.clip_norm,
        var_clip_norm=stage2.var_clip_norm,
        var_floor=stage2.var_floor,
        weight_floors=stage2.weight_floors(x.shape[1]),
        weight=weight,
        bias=bias,
        eps=eps,
        running_mean=running_mean if update else None,
        running_var=running_var if update else None,
        momentum=momentum,
        num_batches_tracked=num_batches_tracked if update else None,
    )
    stage2.adopt_reference(combined)
    y = kernels.normalize.normalize_forward(x, combined.gain, combined.shift, group_size=group)
    return y, TrainState(combined, sizes, group)


def train_backward(
    dy: Tensor, x: Tensor, state: TrainState, stage2: Stage2
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`train_forward`, fp32 affine gradients: the reduce pass,
    the combine's vector-Jacobian product and the ``dx`` pass (frozen statistics: one pass)."""
    normalize = kernel_modules().normalize
    c, group = state.combined, state.group
    if stage2.detach_statistics:
        dx, sdyx, sdy = normalize.normalize_backward(
            dy, x, c.norm_mean, c.rstd, c.gain, group_size=group, partials=True
        )
        return dx, sdyx.sum((0, 2)), sdy.sum((0, 2))
    _, sdyx, sdy = normalize.normalize_backward(
        dy, x, c.norm_mean, c.rstd, None, group_size=group, partials=True
    )
    center, scale = stage2.reference_tensors()
    coef, offset, dweight, dbias = kernel_modules().combine.combine_backward(
        sdyx,
        sdy,
        c,
        math.prod(x.shape[2:]),
        state.sizes,
        group_size=group,
        center=center,
        scale=scale,
        clip_norm=stage2.clip_norm,
        var_clip_norm=stage2.var_clip_norm,
        var_floor=stage2.var_floor,
        weight_floors=stage2.weight_floors(x.shape[1]),
    )
    dx, _, _ = normalize.normalize_backward(
        dy, x, None, None, c.gain, coef, c.m, offset, group_size=group
    )
    return dx, dweight, dbias


def release(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    stage2: Stage2,
    *,
    normalize_with: str,
    generator: torch.Generator | None,
    secure_mode: bool,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DP release in three launches (noise, stage-1 partials, the combine), as
    :func:`safenorm.functional.dp_release`: the same group draw from the same generator, then
    the noise of both releases in one draw ``(2, G, C)``. Returns the statistics to normalize
    with (detached; ``(C,)``, or ``(N, C)`` with ghost groups and ``normalize_with="batch"``)
    and the finite flag of the running update."""
    combine = kernel_modules().combine
    n, c, spatial = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    update = running_mean is not None and running_var is not None
    if normalize_with == "running" and not update:
        raise ValueError("normalize_with='running' needs running statistics")
    denominator = float(stage2.denominator)
    ghost = stage2.ghost_batch_size
    count = SF.dp_group_count(denominator, ghost)
    if count == 1:
        index, sizes = None, _sizes(0, 1, denominator, x.device)
    else:
        groups = SF.random_groups(n, count, denominator, x.device, generator, secure_mode)
        index, sizes = groups.index, groups.size
    noise = None
    if stage2.noise_multiplier > 0:
        noise = gaussian_noise(
            (2, count, c), device=x.device, generator=generator, secure_mode=secure_mode
        )
    if x.numel() > 0:
        moments = kernel_modules().moments.moments_partials(x)
    else:
        empty = x.new_zeros((n, c), dtype=torch.float32)
        moments = (empty, empty)
    mode = combine.COEF_SAMPLES if count > 1 else combine.COEF_GROUPS
    if normalize_with == "running":
        mode = combine.COEF_RUNNING
    with torch.no_grad():
        combined = combine.combine_forward(
            moments,
            spatial,
            sizes,
            index=index,
            **stage2.combine_reference(running_mean, running_var),
            clip_norm=stage2.clip_norm,
            var_clip_norm=stage2.var_clip_norm,
            noise=noise,
            noise_multiplier=stage2.noise_multiplier,
            var_floor=stage2.var_floor,
            running_mean=running_mean if update else None,
            running_var=running_var if update else None,
            momentum=momentum,
            num_batches_tracked=num_batches_tracked if update else None,
            coef_mode=mode,
        )
    stage2.adopt_reference(combined)
    if mode == combine.COEF_SAMPLES:
        return combined.norm_mean, combined.norm_var, combined.finite
    return combined.norm_mean[0], combined.norm_var[0], combined.finite
