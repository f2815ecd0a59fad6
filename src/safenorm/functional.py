"""The math of every safenorm layer, once, in pure vectorized PyTorch.

This module is the single source of truth: the modules in :mod:`safenorm.modules` only decide
policy (which buffers, which momentum, which reference) and call the functions here; the Triton
kernels and the Opacus grad samplers are tested against them.

Notation (see docs/PRIVACY.md): input ``x`` of shape ``(N, C, *S)`` with ``M = prod(S)``
(``M = 1`` for ``(N, C)`` input). One pass gives per-sample, per-channel moments

    m[i, c] = mean_s x[i, c, s]            w[i, c] = mean_s (x[i, c, s] - m[i, c])^2

and every variant builds its statistics from ``(m, w)``: the centred per-sample second moment
around a centre ``mu`` is ``v_i = w_i + (m_i - mu)^2``, which equals ``q_i - 2 mu m_i + mu^2``
with ``q_i = mean_s x^2`` but does not cancel catastrophically when ``|mu| >> std``.

All statistics are computed in float32 (float64 for float64 input) whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from safenorm import ops as _ops
from safenorm.noise import gaussian_noise, uniform_integers

#: Sums a tensor over processes and returns the result (differentiable for the clipped variant).
AllReduce = Callable[[Tensor], Tensor]

__all__ = [
    "AllReduce",
    "ClipReference",
    "Groups",
    "PrivateStatistics",
    "batch_statistics",
    "clip_rows",
    "clip_rows_with_factors",
    "clipped_batch_norm",
    "clipped_statistics",
    "consecutive_groups",
    "dp_batch_norm",
    "dp_group_count",
    "dp_groups",
    "dp_release",
    "dp_statistics",
    "dp_statistics_from_moments",
    "frozen_normalize",
    "ghost_batch_norm",
    "log_ratio_contributions",
    "normalize",
    "per_sample_moments",
    "pooled_running_update",
    "private_statistics",
    "project_gradient_per_sample",
    "random_groups",
    "statistics_to_normalize_with",
    "weight_floor",
]


# ----------------------------------------------------------------------------------------------
# Per-sample moments and groups
# ----------------------------------------------------------------------------------------------


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _PerSampleMoments(torch.autograd.Function):
    """``(m, w)`` by two passes (mean, then mean of squared deviations) with a one-pass backward.

    ``torch.var_mean`` over the spatial axes is several times slower on CPU than a mean and a
    squared-deviation mean, and autograd through ``(x - m)**2`` costs three elementwise passes;
    the analytic gradient ``dx = (dm + 2 (x - m) dw) / M`` costs one.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        xs = x.to(_stat_dtype(x))
        spatial = tuple(range(2, x.dim()))
        m = xs.mean(spatial)
        deviation = xs - m.view(*m.shape, *([1] * len(spatial)))
        w = deviation.square_().mean(spatial)
        ctx.save_for_backward(x, m)
        ctx.spatial = spatial
        return m, w

    @staticmethod
    @once_differentiable
    def backward(ctx, dm: Tensor, dw: Tensor) -> Tensor:
        x, m = ctx.saved_tensors
        size = math.prod(x.shape[2:])
        slope = 2.0 * dw / size
        offset = dm / size - slope * m
        view = (*m.shape, *([1] * len(ctx.spatial)))
        return torch.addcmul(offset.view(view), x, slope.view(view)).to(x.dtype)


def per_sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and centred second moment over the spatial axes.

    Args:
        x: input of shape ``(N, C, *S)``, any floating dtype, any memory format.

    Returns:
        ``(m, w)``, each of shape ``(N, C)`` in float32 (float64 for float64 input):
        ``m = mean_s x`` and ``w = mean_s (x - m)^2`` (biased, ``0`` when ``M = 1``).
        Differentiable with respect to ``x``.
    """
    if x.dim() == 2:
        xs = x.to(_stat_dtype(x))
        return xs, torch.zeros_like(xs)
    if x.shape[0] == 0:
        empty = x.new_zeros(x.shape[:2], dtype=_stat_dtype(x))
        return empty, empty
    return _PerSampleMoments.apply(x)


def spatial_size(x: Tensor) -> int:
    """``M = prod(S)`` for input of shape ``(N, C, *S)``."""
    return math.prod(x.shape[2:])


@dataclass(frozen=True)
class Groups:
    """A partition of the batch into (ghost) groups.

    Attributes:
        index: ``(N,)`` long, the group of each sample.
        size: ``(G,)`` float, the denominator of each group: its actual size for the
            non-private variants, a public number for the DP variant.
    """

    index: Tensor
    size: Tensor

    @property
    def count(self) -> int:
        return self.size.shape[0]

    def sum(self, values: Tensor) -> Tensor:
        """Sum ``(N, C)`` per-sample values into ``(G, C)`` group sums (differentiable)."""
        if self.count == 1:  # the common case, without the scatter
            return values.sum(0, keepdim=True)
        out = values.new_zeros((self.count, values.shape[1]))
        return out.index_add(0, self.index, values)

    def per_sample(self, group_values: Tensor) -> Tensor:
        """Broadcast ``(G, C)`` group values back to ``(N, C)``."""
        if self.count == 1:
            return group_values.expand(self.index.shape[0], -1)
        return group_values.index_select(0, self.index)

    def normalization_statistics(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """``(G, C)`` group statistics as ``(C,)`` for one group, else ``(N, C)`` per sample."""
        if self.count == 1:
            return mean[0], var[0]
        return self.per_sample(mean), self.per_sample(var)


def consecutive_groups(n: int, group_size: int | None, device: torch.device) -> Groups:
    """Position-based ghost groups: samples ``[k*g, (k+1)*g)`` form group ``k``.

    The last group may be smaller (ragged). ``group_size=None`` or ``>= n`` gives one group.
    Not usable for DP: removing one sample shifts every later boundary.
    """
    g = n if group_size is None or group_size >= n else group_size
    g = max(g, 1)
    index = torch.arange(n, device=device) // g
    count = max(1, -(-n // g))
    size = torch.bincount(index, minlength=count).to(torch.float32)
    return Groups(index=index, size=size)


def random_groups(
    n: int,
    num_groups: int,
    denominator: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> Groups:
    """Ghost groups for DP: each sample draws its group uniformly and independently.

    A sample's group does not depend on any other sample, so adding or removing one sample
    changes exactly one group's sums. Every group gets the public denominator
    ``denominator / num_groups``. In ``secure_mode`` the draw comes from the OS CSPRNG.
    """
    index = uniform_integers(
        num_groups, n, device=device, generator=generator, secure_mode=secure_mode
    )
    size = torch.full((num_groups,), denominator / num_groups, device=device)
    return Groups(index=index, size=size)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def clip_rows(u: Tensor, max_norm: float) -> Tensor:
    """``clip(u_i, R) = u_i * min(1, R / ||u_i||_2)`` for every row ``u_i`` of ``(N, C)`` ``u``.

    Overflow-safe: the norm of each row is taken after dividing the row by its largest absolute
    value, so a finite row clips correctly even when ``||u_i||^2`` (or ``||u_i||``) overflows its
    dtype. A row with a non-finite entry (NaN, or a moment that overflowed upstream) contributes
    zero: whatever one sample's values, its contribution has norm at most ``R`` and depends on that
    sample only, so no input can make a release non-finite (docs/PRIVACY.md).
    """
    return clip_rows_with_factors(u, max_norm)[0]


def clip_rows_with_factors(u: Tensor, max_norm: float) -> tuple[Tensor, Tensor]:
    """:func:`clip_rows` and each row's clip factor ``min(1, R / ||u_i||)``, ``(N, 1)``.

    The factor is 0 for a non-finite row (its contribution is zero) and underflows to 0 for a
    row whose norm overflows; 1 for rows within the bound. Infinite ``R``: ``(u, 1)``.
    """
    if math.isinf(max_norm):
        return u, u.new_ones((u.shape[0], 1))
    finite = torch.isfinite(u).all(dim=1, keepdim=True)
    u = torch.where(finite, u, torch.zeros_like(u))  # before any arithmetic: no NaN gradients
    peak = u.abs().amax(dim=1, keepdim=True)
    # Rows scaled into [-1, 1] (zero rows stay zero); ||u|| = peak * ||unit||, which may overflow
    # to inf: the comparison below is still right, and the clipped row is formed from ``unit``.
    unit = u / torch.where(peak > 0, peak, torch.ones_like(peak))
    unit_norms = torch.linalg.vector_norm(unit, dim=1, keepdim=True)
    norms = peak * unit_norms
    over = norms > max_norm
    clipped = unit * (max_norm / unit_norms.clamp_min(1e-30))
    # Rows within the bound (zero rows included) are returned exactly.
    factor = torch.where(over, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
    return torch.where(over, clipped, u), torch.where(finite, factor, torch.zeros_like(factor))


def batch_statistics(m: Tensor, w: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """Standard BN statistics of each group: biased mean and variance, each ``(G, C)``."""
    size = groups.size.to(m.dtype).unsqueeze(1)
    mean = groups.sum(m) / size
    centred = w + (m - groups.per_sample(mean)) ** 2
    return mean, groups.sum(centred) / size


@dataclass(frozen=True)
class ClipReference:
    """Public centre and scale in whose units per-sample contributions are clipped.

    ``contribution = (m_i - center) / scale`` for the mean and ``v_i / scale^2`` for the
    variance. Both must be public (constants or already released statistics); ``None`` means
    raw units (centre 0, scale 1).

    Attributes:
        center: ``(C,)`` or ``None``.
        scale: ``(C,)``, positive, or ``None``.
    """

    center: Tensor | None = None
    scale: Tensor | None = None

    @classmethod
    def from_running(cls, running_mean: Tensor | None, running_var: Tensor | None, eps: float):
        """Centre and scale from running statistics (snapshotted: buffers change in place)."""
        if running_mean is None or running_var is None:
            return cls()
        return cls(
            center=running_mean.detach().clone().float(),
            scale=torch.sqrt(running_var.detach().float() + eps),
        )

    def center_like(self, m: Tensor) -> Tensor:
        return m.new_zeros(m.shape[1]) if self.center is None else self.center.to(m.dtype)

    def scale_like(self, m: Tensor) -> Tensor:
        return m.new_ones(m.shape[1]) if self.scale is None else self.scale.to(m.dtype)


@dataclass(frozen=True)
class PrivateStatistics:
    """Statistics of the clipped / noised mechanism, per group.

    Attributes:
        mean: ``(G, C)`` statistics mean (``mu`` or ``mu~``).
        var: ``(G, C)`` statistics variance (``var`` or ``var~``), biased.
        groups: the partition they were computed on.
    """

    mean: Tensor
    var: Tensor
    groups: Groups


def private_statistics(
    m: Tensor,
    w: Tensor,
    groups: Groups,
    *,
    clip_norm: float,
    var_clip_norm: float,
    noise_multiplier: float = 0.0,
    reference: ClipReference | None = None,
    var_floor: float = 0.0,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    all_reduce: AllReduce | None = None,
    add_noise: bool = True,
    var_release: str = "linear",
) -> PrivateStatistics:
    """Clipped (and optionally noised) mean and variance of each group.

    In the reference's units (``mc_i = (m_i - center) / scale``)::

        S_mu  = sum_i clip(mc_i, R1) [+ N(0, sigma^2 R1^2 I)]
        mu    = center + scale * S_mu / D
        S_var = sum_i clip(v_i(mu) / scale^2, R2) [+ N(0, sigma^2 R2^2 I)]
        var   = max(scale^2 * S_var / D, var_floor * scale^2)

    with ``D`` the group's denominator. Noise is added when ``noise_multiplier > 0``.

    ``var_release="log"`` releases the log of each sample's second-moment ratio instead, each
    channel's term clamped to ``+-R2 / sqrt(C)`` (so each row's L2 norm, the sensitivity, is
    still at most ``R2``; :func:`log_ratio_contributions`), with ``tau = sigma R2 / D``::

        S_log = sum_i clamp(log(v_i(mu) / scale^2), R2 / sqrt(C)) [+ N(0, sigma^2 R2^2 I)]
        var   = max(scale^2 * exp(S_log / D - tau^2 / 2), var_floor * scale^2)

    A ratio far above 1 then raises the variance by a factor of up to ``exp(R2 / sqrt(C))`` per
    release, as one far below 1 lowers it, whereas the linear release is bounded by about
    ``R2 / sqrt(C)`` times the reference's variance and cannot follow activations that grow.
    ``exp(-tau^2 / 2)`` (public: ``sigma``, ``R2``, ``D``) makes the noise factor mean-one.
    It estimates the *geometric* mean of the per-sample second moments, at most their
    arithmetic mean (BN's variance): the gap grows with their spread across samples.

    Args:
        m, w: ``(N, C)`` per-sample moments from :func:`per_sample_moments`.
        groups: partition of the batch and each group's denominator ``D``.
        clip_norm: ``R1``, L2 bound over channels of each sample's mean contribution.
        var_clip_norm: ``R2``, L2 bound of each sample's centred second-moment contribution.
        noise_multiplier: ``sigma``; Gaussian noise of std ``sigma * R`` on each clipped sum.
        reference: public centre/scale of the clipping units. Default: raw units.
        var_floor: lower bound of the variance in units of ``scale^2``.
        generator, secure_mode: the noise source (see :func:`safenorm.noise.gaussian_noise`).
        all_reduce: sums tensors across processes (multi-process training); the clipped sums are
            reduced before they are used, so every process gets the global statistics.
        add_noise: whether this process adds the noise; with ``all_reduce`` exactly one process
            must, so the global sum carries the noise once.
        var_release: ``"linear"`` or ``"log"`` (above).
    """
    if var_release not in VAR_RELEASES:
        raise ValueError(f"var_release must be one of {VAR_RELEASES}, got {var_release!r}")
    reference = reference or ClipReference()
    center, scale = reference.center_like(m), reference.scale_like(m)
    size = groups.size.to(m.dtype).unsqueeze(1)

    def noised_sum(contributions: Tensor, bound: float, bounded: Callable = clip_rows) -> Tensor:
        total = groups.sum(bounded(contributions, bound))
        if noise_multiplier > 0 and add_noise:
            noise = gaussian_noise(
                tuple(total.shape),
                device=total.device,
                generator=generator,
                secure_mode=secure_mode,
            )
            total = total + noise.to(total.dtype) * (noise_multiplier * bound)
        return total if all_reduce is None else all_reduce(total)

    mean = center + scale * noised_sum((m - center) / scale, clip_norm) / size
    scale_sq = scale * scale
    centred = (w + (m - groups.per_sample(mean)) ** 2) / scale_sq
    if var_release == "log":
        log_ratio = noised_sum(centred, var_clip_norm, log_ratio_contributions) / size
        tau = noise_multiplier * var_clip_norm / size if noise_multiplier > 0 else 0.0
        var = scale_sq * torch.exp(log_ratio - 0.5 * tau * tau)
    else:
        var = scale_sq * noised_sum(centred, var_clip_norm) / size
    var = torch.maximum(var, var_floor * scale_sq)
    return PrivateStatistics(mean=mean, var=var, groups=groups)


#: How a DP layer releases its variance (:func:`private_statistics`).
VAR_RELEASES = ("linear", "log")


def log_ratio_contributions(ratio: Tensor, bound: float) -> Tensor:
    """``clamp(log(ratio), +-bound / sqrt(C))`` per entry of ``(N, C)`` second-moment ratios.

    Each row's L2 norm is at most ``bound`` whatever the input: a ratio of 0 (or below the
    dtype's smallest normal) or of ``inf`` clamps to an end, and a NaN entry contributes 0.
    """
    per_channel = bound / math.sqrt(ratio.shape[1])
    tiny = torch.finfo(ratio.dtype).tiny
    logs = torch.log(ratio.clamp_min(tiny)).clamp(-per_channel, per_channel)
    return torch.nan_to_num(logs, nan=0.0)


def weight_floor(bound: float, channels: int) -> float:
    """``rho = min(1/2, R / (2 sqrt(C)))``: the smallest share of the batch the clipped layer's
    self-normalized statistics divide by (:func:`clipped_statistics`)."""
    return min(0.5, bound / (2.0 * math.sqrt(channels)))


def clipped_statistics(
    m: Tensor,
    w: Tensor,
    groups: Groups,
    *,
    clip_norm: float,
    var_clip_norm: float,
    reference: ClipReference | None = None,
    all_reduce: AllReduce | None = None,
) -> PrivateStatistics:
    """Per-sample-clipped statistics without noise (bounded influence, not DP).

    Self-normalized: clipping down-weights a sample instead of truncating every sample's share.
    In the reference's units, with ``f_i = min(1, R / ||u_i||)`` each contribution's clip factor
    and ``D`` the group's actual size::

        mu  = center + scale * sum_i clip(mc_i, R1) / max(sum_i f_i, rho1 D)
        var = scale^2 * sum_i clip(v_i(mu) / scale^2, R2) / max(sum_i f_i, rho2 D)

    ``rho = min(1/2, R / (2 sqrt(C)))`` (:func:`weight_floor`). When every sample exceeds the
    bound by the same factor the weights cancel and the statistic is exact, so a tight bound
    does not bias the variance low; when they exceed it by more than ``1 / rho`` the variance is
    at least twice the reference's, so the running statistics grow back toward the activations
    instead of collapsing. With infinite bounds every ``f_i = 1`` and this is exactly BN.

    Influence: each clipped term has norm at most ``R`` and each denominator at least
    ``rho D``, so replacing one sample moves ``(mu - center) / scale`` by at most
    ``(2 + 1/rho) R1 / (rho D)``, and its own term moves ``var / scale^2`` by at most
    ``(2 + 1/rho) R2 / (rho D)`` (plus, as for every clipped variance, the shift of the other
    samples' terms through ``mu``).

    With ``all_reduce`` the sums, weights and denominators are summed across processes.
    """
    reference = reference or ClipReference()
    center, scale = reference.center_like(m), reference.scale_like(m)
    size = groups.size.to(m.dtype).unsqueeze(1)
    reduce = all_reduce or (lambda t: t)
    if all_reduce is not None:
        size = all_reduce(size)
    channels = m.shape[1]

    def self_normalized(contributions: Tensor, bound: float) -> Tensor:
        clipped, factors = clip_rows_with_factors(contributions, bound)
        weight = reduce(groups.sum(factors.to(clipped.dtype)))
        return reduce(groups.sum(clipped)) / torch.maximum(
            weight, weight_floor(bound, channels) * size
        )

    mean = center + scale * self_normalized((m - center) / scale, clip_norm)
    scale_sq = scale * scale
    centred = (w + (m - groups.per_sample(mean)) ** 2) / scale_sq
    var = scale_sq * self_normalized(centred, var_clip_norm)
    return PrivateStatistics(mean=mean, var=var, groups=groups)


def pooled_running_update(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    group_size: Tensor | float,
    spatial: int,
    momentum: float,
) -> None:
    """Update running statistics in place from per-group statistics, as ``nn.BatchNorm`` does.

    The batch mean is the size-weighted mean of the group means; the variance stored is the
    pooled unbiased within-group variance ``sum_g n_g M var_g / sum_g (n_g M - 1)``, which for a
    single group is exactly BN's ``var * NM / (NM - 1)``.

    Args:
        running_mean, running_var: ``(C,)`` buffers, updated in place.
        mean, var: ``(G, C)`` biased group statistics.
        group_size: ``(G,)`` denominators ``n_g``; or, for a single group whose size the host
            knows, that number (three kernels instead of a dozen on a GPU).
        spatial: ``M``.
        momentum: weight of the new value (the cumulative-average factor when BN's momentum is
            ``None``).
    """
    with torch.no_grad():
        if not isinstance(group_size, Tensor):
            n = float(group_size) * spatial
            correction = n / (n - 1) if n > 1 else 1.0  # no degree of freedom: keep it biased
            running_mean.lerp_(mean[0].to(running_mean.dtype), momentum)
            running_var.lerp_((var[0] * correction).to(running_var.dtype), momentum)
            return
        n = group_size.to(mean.dtype).unsqueeze(1) * spatial
        batch_mean = (n * mean).sum(0) / n.sum()
        # Pooled unbiased variance; with a single value per channel in all (a public DP
        # denominator of 1 on (N, C) input) there is no degree of freedom: keep it biased.
        dof = (n - 1).clamp_min(0).sum()
        dof = torch.where(dof > 0, dof, n.sum())
        batch_var = (n * var).sum(0) / dof
        for buffer, value in ((running_mean, batch_mean), (running_var, batch_var)):
            buffer.mul_(1 - momentum).add_(value.to(buffer.dtype), alpha=momentum)


# ----------------------------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------------------------


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with per-sample or per-channel statistics.

    Differentiable with respect to ``mean`` and ``var`` (gradients flow through the statistics).

    Args:
        x: ``(N, C, *S)`` input, any floating dtype and memory format.
        mean, var: ``(N, C)`` per-sample or ``(C,)`` per-channel statistics (float32/64).
        weight, bias: ``(C,)`` affine parameters or ``None``.
        eps: added to the variance.

    Returns:
        Output of ``x``'s shape, dtype and memory format.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return _ScaleShift.apply(x, scale, shift)


def _broadcast_view(stat: Tensor, x: Tensor) -> Tensor:
    """``(N, C)`` or ``(C,)`` statistics viewed to broadcast against ``(N, C, *S)``."""
    lead = tuple(stat.shape) if stat.dim() == 2 else (1, stat.shape[0])
    return stat.reshape(*lead, *([1] * (x.dim() - 2)))


def _spatial_sum(x: Tensor) -> Tensor:
    """``sum_s x[n, c, s]`` as ``(N, C)``."""
    return x.sum(tuple(range(2, x.dim()))) if x.dim() > 2 else x


def _spatial_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_s a[n, c, s] * b[n, c, s]`` as ``(N, C)``, fused where the layout allows it.

    Channels-last tensors are read as ``(N, M, C)`` and contiguous ones as ``(N, C, M)``, so the
    product is never formed in a layout the reduction would have to gather from.
    """
    if a.dim() == 2:
        return a * b
    n, c, m = a.shape[0], a.shape[1], spatial_size(a)
    channels_inner = a.stride(1) == 1 and b.stride(1) == 1 and c > 1
    if channels_inner:
        order = (0, *range(2, a.dim()), 1)
        a3, b3 = a.permute(order).reshape(n, m, c), b.permute(order).reshape(n, m, c)
        return (a3 * b3).sum(1)  # vecdot over a strided axis is slower than this here
    return torch.linalg.vecdot(a.reshape(n, c, m), b.reshape(n, c, m), dim=2)


class _ScaleShift(torch.autograd.Function):
    """``y = x * scale + shift`` with per-sample ``(N, C)`` or per-channel ``(C,)`` coefficients.

    Autograd of the broadcast ``addcmul`` forms ``dy * x`` in the input's layout and reduces it
    with ``sum_to_size``, which is several times slower than BatchNorm on channels-last input;
    here the coefficient gradients are fused spatial reductions.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale)
        out = torch.addcmul(_broadcast_view(shift, x), x, _broadcast_view(scale, x))
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, scale = ctx.saved_tensors
        dx = dscale = dshift = None
        if ctx.needs_input_grad[0]:
            dx = (dy * _broadcast_view(scale, x)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dy_s, x_s = dy.to(scale.dtype), x.to(scale.dtype)
            dscale, dshift = _spatial_dot(dy_s, x_s), _spatial_sum(dy_s)
            if scale.dim() == 1:
                dscale, dshift = dscale.sum(0), dshift.sum(0)
        return dx, dscale, dshift


class _ProjectPerSample(torch.autograd.Function):
    """Identity forward; the backward removes, per sample and channel, the gradient's components
    along ``1`` and the sample's own centred values (see :func:`project_gradient_per_sample`)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        # Scaled into [-1, 1] before centring, and again after: the mean and the squared norm
        # of huge finite values would overflow.
        unit = _scaled_to_unit_peak(x.to(acc), dims)
        unit = _scaled_to_unit_peak(unit - unit.mean(dims, keepdim=True), dims)
        norm_sq = (unit * unit).sum(dims, keepdim=True)
        g = grad.to(acc)
        g = g - g.mean(dims, keepdim=True)
        coefficient = (g * unit).sum(dims, keepdim=True) / torch.where(
            norm_sq > 0, norm_sq, torch.ones_like(norm_sq)
        )
        return (g - coefficient * unit).to(grad.dtype)


def _scaled_to_unit_peak(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` divided by its largest absolute value over ``dims`` (all-zero slices stay zero)."""
    peak = t.abs().amax(dims, keepdim=True)
    return t / torch.where(peak > 0, peak, torch.ones_like(peak))


def project_gradient_per_sample(x: Tensor) -> Tensor:
    """``x`` unchanged, with a per-sample projection of the gradient that flows back into it.

    For each sample ``i`` and channel ``c`` the gradient over the spatial positions is projected
    onto the orthogonal complement of ``span{1, x_ic - mean_s x_ic}``: the direction of
    InstanceNorm's backward (up to its per-sample scale), which makes the update blind to shifts
    and rescalings of the sample's own activations, as BatchNorm's backward is to those of the
    batch. It uses sample ``i`` alone, so per-sample gradients stay exact and DP-SGD's clipping
    bound holds; the result is a surrogate direction, not the gradient of the forward.

    Args:
        x: ``(N, C, *S)`` with ``prod(S) >= 2`` (on ``(N, C)`` input nothing would be left).

    Returns:
        ``x`` (a view), whose backward is projected.
    """
    if spatial_size(x) < 2:
        raise ValueError(
            "project_gradient_per_sample needs input with spatial dimensions (N, C, *S), "
            f"prod(S) >= 2, got shape {tuple(x.shape)}: on one value per sample and channel the "
            "projection removes the whole gradient"
        )
    return _ProjectPerSample.apply(x)


def frozen_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Normalize with statistics that are constants (no gradient flows into them).

    Per-channel ``(C,)`` statistics use the native ``F.batch_norm`` in eval form; per-sample
    ``(N, C)`` statistics (DP ghost groups) use :func:`normalize` on detached values.

    Args:
        x: ``(N, C, *S)`` input.
        mean, var: ``(C,)`` or ``(N, C)`` statistics (float32, float64 for float64 input).
        weight, bias: ``(C,)`` or ``None``.
        eps: added to the variance.
    """
    if _ops.routes(x):  # the kernels (or the custom ops when compiling)
        return _ops.normalize(x, mean, var, weight, bias, eps)
    mean, var = mean.detach(), var.detach()
    if mean.dim() == 2:
        return normalize(x, mean, var, weight, bias, eps)
    if x.dtype == torch.float64:
        mean, var = mean.double(), var.double()
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


# ----------------------------------------------------------------------------------------------
# Layer functions (mirroring F.batch_norm: running buffers are updated in place when training)
# ----------------------------------------------------------------------------------------------


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    ghost_batch_size: int | None = None,
) -> Tensor:
    """Ghost-batch normalization: each group of ``ghost_batch_size`` consecutive samples is
    normalized with its own statistics (the last group may be smaller).

    Gradients flow through each group's statistics as in BN. Running statistics (when given and
    ``training``) are updated once from all groups (see :func:`pooled_running_update`). With
    ``ghost_batch_size >= N`` (or ``None``) this is exactly :func:`torch.nn.functional.batch_norm`.
    Not a DP mechanism: a sample still influences its ``g - 1`` group mates without bound.

    Args:
        input: ``(N, C, *S)``.
        running_mean, running_var: ``(C,)`` buffers or ``None``.
        weight, bias: ``(C,)`` or ``None``.
        training: use batch statistics (and update the buffers) if ``True``, else the buffers.
        momentum: weight of the new statistics in the running update.
        eps: added to the variance.
        ghost_batch_size: group size ``g``.
    """
    if training and _ops.routes(input):  # the kernels (or the custom ops when compiling)
        stage2 = _ops.Stage2(ghost_batch_size=ghost_batch_size)
        return _ops.batch_norm_train(
            input, running_mean, running_var, weight, bias, momentum, eps, stage2
        )
    n = input.shape[0]
    if not training or ghost_batch_size is None or ghost_batch_size >= n:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if ghost_batch_size >= 1 and ((n - 1) % ghost_batch_size + 1) * spatial_size(input) > 1:
        return _ghost_batch_norm_per_group(
            input, running_mean, running_var, weight, bias, momentum, eps, ghost_batch_size
        )
    m, w = per_sample_moments(input)
    groups = consecutive_groups(n, ghost_batch_size, input.device)
    mean, var = batch_statistics(m, w, groups)
    if running_mean is not None and running_var is not None:
        pooled_running_update(
            running_mean, running_var, mean, var, groups.size, spatial_size(input), momentum
        )
    return normalize(input, groups.per_sample(mean), groups.per_sample(var), weight, bias, eps)


def _ghost_batch_norm_per_group(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    ghost_batch_size: int,
) -> Tensor:
    """:func:`ghost_batch_norm` as one native batch norm per group (its fused kernels are much
    faster than per-sample moments, in channels-last above all). Each group's mean and unbiased
    variance come out of the same call, in scratch buffers with momentum 1; every group must
    have more than one value per channel."""
    track = running_mean is not None and running_var is not None
    chunks = input.split(ghost_batch_size)
    outputs, means, unbiased = [], [], []
    for chunk in chunks:
        scratch = (
            (torch.zeros_like(running_mean), torch.ones_like(running_var))
            if track
            else (None, None)
        )
        outputs.append(F.batch_norm(chunk, *scratch, weight, bias, True, 1.0, eps))
        if track:
            means.append(scratch[0])
            unbiased.append(scratch[1])
    if track:
        spatial = spatial_size(input)
        sizes = torch.tensor([float(chunk.shape[0]) for chunk in chunks], device=means[0].device)
        values = sizes.unsqueeze(1) * spatial
        var = torch.stack(unbiased) * (values - 1) / values  # back to each group's biased var
        pooled_running_update(
            running_mean, running_var, torch.stack(means), var, sizes, spatial, momentum
        )
    return torch.cat(outputs)


def clipped_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    clip_norm: float = math.inf,
    var_clip_norm: float = math.inf,
    ghost_batch_size: int | None = None,
    reference: ClipReference | None = None,
    detach_statistics: bool = False,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Batch normalization with per-sample-clipped statistics (bounded influence, not DP).

    See :func:`private_statistics` (with ``noise_multiplier = 0``) for the statistics; ``D`` is
    the actual batch (or ghost group) size. With infinite bounds this is exactly BN.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps: as in
            :func:`ghost_batch_norm`.
        clip_norm: ``R1`` (mean), in the reference's units.
        var_clip_norm: ``R2`` (centred second moment), in the reference's units.
        ghost_batch_size: optional position-based ghost groups.
        reference: public centre/scale of the clipping units. Default: raw units.
        detach_statistics: stop gradients through the statistics.
        all_reduce: sum the clipped sums and batch sizes across processes (no ghost groups).
    """
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if all_reduce is None and _ops.routes(input):  # the kernels (or the custom ops)
        stage2 = _ops.Stage2(
            ghost_batch_size=ghost_batch_size,
            clip_norm=clip_norm,
            var_clip_norm=var_clip_norm,
            reference=reference,
            detach_statistics=detach_statistics,
        )
        return _ops.batch_norm_train(
            input, running_mean, running_var, weight, bias, momentum, eps, stage2
        )
    m, w = per_sample_moments(input)
    groups = consecutive_groups(input.shape[0], ghost_batch_size, input.device)
    stats = clipped_statistics(
        m,
        w,
        groups,
        clip_norm=clip_norm,
        var_clip_norm=var_clip_norm,
        reference=reference,
        all_reduce=all_reduce,
    )
    mean, var = stats.mean, stats.var
    if running_mean is not None and running_var is not None:
        pooled_running_update(
            running_mean, running_var, mean, var, stats.groups.size, spatial_size(input), momentum
        )
    if detach_statistics:
        mean, var = mean.detach(), var.detach()
    return normalize(input, groups.per_sample(mean), groups.per_sample(var), weight, bias, eps)


def dp_statistics(
    input: Tensor,
    *,
    clip_norm: float,
    var_clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    ghost_batch_size: int | None = None,
    reference: ClipReference | None = None,
    var_floor: float = 0.0,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    all_reduce: AllReduce | None = None,
    add_noise: bool = True,
    var_release: str = "linear",
) -> PrivateStatistics:
    """The DP release: noised clipped statistics of ``input``, detached.

    Two Gaussian releases (mean sums, then centred-variance sums around the released mean),
    each with add/remove sensitivity ``R`` and noise std ``sigma * R``. With ghost groups, each
    sample draws its group independently (:func:`random_groups`), so one sample touches one
    group and the sensitivity of the whole release stays ``R``.

    Args:
        input: ``(N, C, *S)``; ``N = 0`` is allowed (a noise-only release).
        clip_norm, var_clip_norm, noise_multiplier, reference, var_floor, generator, secure_mode,
            var_release: see :func:`private_statistics`.
        denominator: the public batch size ``D`` (the expected batch size under Poisson
            sampling); each of ``G`` ghost groups gets ``D / G``.
        ghost_batch_size: target group size; ``G = max(1, round(D / ghost_batch_size))``.
        all_reduce, add_noise: multi-process release (see :func:`private_statistics`); ``D`` is
            then the global public batch size.
    """
    with torch.no_grad():
        m, w = per_sample_moments(input)
    return dp_statistics_from_moments(
        m,
        w,
        clip_norm=clip_norm,
        var_clip_norm=var_clip_norm,
        noise_multiplier=noise_multiplier,
        denominator=denominator,
        ghost_batch_size=ghost_batch_size,
        reference=reference,
        var_floor=var_floor,
        generator=generator,
        secure_mode=secure_mode,
        all_reduce=all_reduce,
        add_noise=add_noise,
        var_release=var_release,
    )


def dp_group_count(denominator: float, ghost_batch_size: int | None) -> int:
    """``G``: 1 without ghost groups, else ``max(1, round(D / ghost_batch_size))`` (public)."""
    return 1 if ghost_batch_size is None else max(1, round(denominator / ghost_batch_size))


def dp_groups(
    n: int,
    denominator: float,
    ghost_batch_size: int | None,
    device: torch.device,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> Groups:
    """The DP layer's partition: one group of public size ``D``, or
    ``G = max(1, round(D / ghost_batch_size))`` independently drawn groups (:func:`random_groups`;
    from the OS CSPRNG in ``secure_mode``).
    """
    num_groups = dp_group_count(denominator, ghost_batch_size)
    if num_groups == 1:
        return Groups(
            index=torch.zeros(n, dtype=torch.long, device=device),
            size=torch.full((1,), float(denominator), device=device),
        )
    return random_groups(n, num_groups, denominator, device, generator, secure_mode)


def dp_statistics_from_moments(
    m: Tensor,
    w: Tensor,
    *,
    clip_norm: float,
    var_clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    ghost_batch_size: int | None = None,
    reference: ClipReference | None = None,
    var_floor: float = 0.0,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    all_reduce: AllReduce | None = None,
    add_noise: bool = True,
    var_release: str = "linear",
) -> PrivateStatistics:
    """:func:`dp_statistics` from precomputed ``(N, C)`` per-sample moments (e.g. a kernel's).

    The group draw comes before the noise, from the same generator.
    """
    with torch.no_grad():
        groups = dp_groups(
            m.shape[0], denominator, ghost_batch_size, m.device, generator, secure_mode
        )
        return private_statistics(
            m,
            w,
            groups,
            clip_norm=clip_norm,
            var_clip_norm=var_clip_norm,
            noise_multiplier=noise_multiplier,
            reference=reference,
            var_floor=var_floor,
            generator=generator,
            secure_mode=secure_mode,
            all_reduce=all_reduce,
            add_noise=add_noise,
            var_release=var_release,
        )


def statistics_to_normalize_with(
    stats: PrivateStatistics,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    normalize_with: str,
) -> tuple[Tensor, Tensor]:
    """The detached statistics a DP layer normalizes with, after its running update.

    ``"running"``: a snapshot of the (already updated) running buffers; ``"batch"``: the release,
    ``(C,)`` for one group or ``(N, C)`` per sample with ghost groups.
    """
    if normalize_with == "running":
        if running_mean is None or running_var is None:
            raise ValueError("normalize_with='running' needs running statistics")
        return running_mean.detach().clone(), running_var.detach().clone()
    return stats.groups.normalization_statistics(stats.mean, stats.var)


def dp_release(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float = 0.1,
    *,
    clip_norm: float,
    var_clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    ghost_batch_size: int | None = None,
    reference: ClipReference | None = None,
    var_floor: float = 0.0,
    normalize_with: str = "batch",
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    all_reduce: AllReduce | None = None,
    add_noise: bool = True,
    moments: tuple[Tensor, Tensor] | None = None,
    var_release: str = "linear",
) -> tuple[Tensor, Tensor]:
    """Release DP statistics of ``input``, update the running buffers from them, and return the
    (detached) statistics to normalize with.

    Args:
        input, clip_norm, var_clip_norm, noise_multiplier, denominator, ghost_batch_size,
            reference, var_floor, generator, secure_mode, all_reduce, add_noise, var_release:
            see :func:`dp_statistics`; ``var_release="log"`` needs spatial dimensions (with one
            value per sample and channel, each second moment is one squared deviation, whose
            geometric mean is far below the variance).
        moments: ``input``'s per-sample moments ``(m, w)`` if already computed (e.g. by a
            kernel); else :func:`per_sample_moments`.
        running_mean, running_var: ``(C,)`` buffers updated in place from the released values
            only, or ``None``.
        momentum: weight of the new statistics in the running update.
        normalize_with: ``"batch"`` (this release) or ``"running"`` (the updated running
            statistics, post-processing of earlier releases).

    Returns:
        ``(mean, var)``: ``(C,)`` per-channel, or ``(N, C)`` per-sample with ghost groups under
        ``normalize_with="batch"``; biased variance, detached.
    """
    if var_release == "log" and spatial_size(input) < 2:
        raise ValueError(
            "var_release='log' needs input with spatial dimensions (N, C, *S), prod(S) >= 2, got "
            f"shape {tuple(input.shape)}; use var_release='linear'"
        )
    # The kernels fuse the linear release; the log release runs on these reference primitives,
    # in compiled code inside the custom op (random work stays opaque to the compiler).
    release_op = var_release == "linear" or torch.compiler.is_compiling()
    if release_op and moments is None and all_reduce is None and _ops.routes(input):
        stage2 = _ops.Stage2(
            ghost_batch_size=ghost_batch_size,
            clip_norm=clip_norm,
            var_clip_norm=var_clip_norm,
            reference=reference,
            var_floor=var_floor,
            noise_multiplier=noise_multiplier,
            denominator=denominator,
            var_release=var_release,
        )
        return _ops.release(
            input,
            running_mean,
            running_var,
            momentum,
            stage2,
            normalize_with=normalize_with,
            generator=generator,
            secure_mode=secure_mode,
        )
    if moments is None:
        with torch.no_grad():
            moments = per_sample_moments(input)
    stats = dp_statistics_from_moments(
        *moments,
        clip_norm=clip_norm,
        var_clip_norm=var_clip_norm,
        noise_multiplier=noise_multiplier,
        denominator=denominator,
        ghost_batch_size=ghost_batch_size,
        reference=reference,
        var_floor=var_floor,
        generator=generator,
        secure_mode=secure_mode,
        all_reduce=all_reduce,
        add_noise=add_noise,
        var_release=var_release,
    )
    return _update_and_choose(
        stats, running_mean, running_var, momentum, denominator, spatial_size(input), normalize_with
    )


def _update_and_choose(
    stats: PrivateStatistics,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    denominator: float,
    spatial: int,
    normalize_with: str,
) -> tuple[Tensor, Tensor]:
    """The running update from a release, then the statistics to normalize with."""
    if running_mean is not None and running_var is not None:
        # One group's size is the public denominator, a host number: the short update.
        size = float(denominator) if stats.groups.count == 1 else stats.groups.size
        pooled_running_update(
            running_mean, running_var, stats.mean, stats.var, size, spatial, momentum
        )
    return statistics_to_normalize_with(stats, running_mean, running_var, normalize_with)


def dp_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    clip_norm: float,
    var_clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    ghost_batch_size: int | None = None,
    reference: ClipReference | None = None,
    var_floor: float = 0.0,
    normalize_with: str = "batch",
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    all_reduce: AllReduce | None = None,
    add_noise: bool = True,
    var_release: str = "linear",
    project_gradient: bool = False,
) -> Tensor:
    """Batch normalization with differentially private (noised, clipped) statistics.

    In training, releases :func:`dp_statistics`, updates the running buffers from the released
    values only, and normalizes with the released statistics (``normalize_with="batch"``) or
    with the updated running statistics (``"running"``; post-processing, free). The statistics
    are detached, so each sample's output depends only on its own input and released numbers.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps: as in
            :func:`ghost_batch_norm`.
        clip_norm, var_clip_norm, noise_multiplier, denominator, ghost_batch_size, reference,
            var_floor, generator, secure_mode, all_reduce, add_noise, var_release: see
            :func:`dp_statistics`.
        normalize_with: ``"batch"`` or ``"running"``.
        project_gradient: in training, pass the input through
            :func:`project_gradient_per_sample` (a different backward, the same forward).
    """
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    mean, var = dp_release(
        input,
        running_mean,
        running_var,
        momentum,
        clip_norm=clip_norm,
        var_clip_norm=var_clip_norm,
        noise_multiplier=noise_multiplier,
        denominator=denominator,
        ghost_batch_size=ghost_batch_size,
        reference=reference,
        var_floor=var_floor,
        normalize_with=normalize_with,
        generator=generator,
        secure_mode=secure_mode,
        all_reduce=all_reduce,
        add_noise=add_noise,
        var_release=var_release,
    )
    if project_gradient:
        input = project_gradient_per_sample(input)
    return frozen_normalize(input, mean, var, weight, bias, eps)
