"""Stage 2: the per-channel combine of every variant, one kernel forward and one backward.

From the per-(sample, channel) moments ``(m, w)`` (or the stage-1 partial sums they come from)
one program computes, in fp32, what :func:`safenorm.functional.private_statistics` and
:func:`safenorm.functional.pooled_running_update` compute with dozens of PyTorch operations:

* per-sample clipping of the mean contributions ``(m_i - center) / scale`` and of the centred
  second moments ``(w_i + (m_i - mu_g)^2) / scale^2`` (overflow-safe, as
  :func:`safenorm.functional.clip_rows`: each row is divided by its largest absolute value before
  its norm is taken, and a row with a non-finite entry contributes zero);
* the group sums (consecutive ghost groups, or one group index per sample for DP's random
  groups), the noise (drawn on the host, ``(2, G, C)``, scaled here by ``sigma * R``), the
  division by each group's denominator and the variance floor;
* the running update (pooled over groups), with the finite-statistics check folded in: the
  buffers are written only if every new value is finite, and a flag says whether they were;
* the normalization coefficients ``rstd``, ``scale = rstd * weight`` and
  ``shift = bias - mean * scale`` per group, per sample, or from the updated running statistics.

The backward kernel is the vector-Jacobian product of the same map (clipping included) from the
per-sample affine sums of the reduce pass: it writes the per-sample coefficients of
``dx = dy * scale + coef * (x - m) + offset`` and ``dweight``, ``dbias``.

The clipping norm couples all channels of a sample and the group sums couple all samples of a
channel, so one program does the whole ``(N, C)`` combine, in tiles: one launch instead of four
(no grid-wide barrier exists to split it), at the price of one SM sweeping the ``N x C`` fp32
moments about eight times. That is a few microseconds at ``N x C`` of a few 10^4 (ResNet stems,
CIFAR nets), but on the order of 100 us at 256 x 2048 (ResNet-50's last stage at batch 256),
comparable to the whole layer's step there: the GPU benchmark measures it; a split into
per-sample and per-channel programs is the fix if it shows, at one or two launches more.

Phases hand values to each other through global memory, with a barrier between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["Combined", "combine_backward", "combine_forward"]

# A tile of BLOCK_N samples x BLOCK_C channels per loop step: 2048 fp32 values in registers,
# spread over 8 warps (the one program has the SM to itself).
_BLOCK_N = 16
_BLOCK_C = 128
_NUM_WARPS = 8

#: Where the normalization coefficients come from (one row per group, per sample, or running).
COEF_GROUPS, COEF_SAMPLES, COEF_RUNNING = 0, 1, 2
# Per-sample clip record, per phase: divisor (the row's peak), multiplier (R / unit norm),
# state (0 within the bound, 1 clipped, -1 non-finite: contributes zero), factor
# (min(1, R / ||u||) as clip_rows_with_factors: 0 for a non-finite row).
_CLIP_FIELDS = tl.constexpr(4)


@triton.jit
def _group_of(n, index_ptr, n_mask, GROUP_SIZE, RANDOM_GROUPS: tl.constexpr):
    if RANDOM_GROUPS:
        return tl.load(index_ptr + n, mask=n_mask, other=0).to(tl.int32)
    return n // GROUP_SIZE


@triton.jit
def _contribution(
    m_ptr,
    w_ptr,
    mean_ptr,
    center_ptr,
    scale_ptr,
    index_ptr,
    n,
    c,
    n_mask,
    c_mask,
    C,
    GROUP_SIZE,
    VAR: tl.constexpr,
    HAS_REFERENCE: tl.constexpr,
    RANDOM_GROUPS: tl.constexpr,
):
    """The ``(BLOCK_N, BLOCK_C)`` tile of per-sample contributions before clipping: the mean's
    ``(m - center) / scale``, or (``VAR``) the variance's ``(w + (m - mean_g)^2) / scale^2``."""
    mask = n_mask[:, None] & c_mask[None, :]
    row = n[:, None] * C + c[None, :]
    m = tl.load(m_ptr + row, mask=mask, other=0.0)
    if HAS_REFERENCE:
        center = tl.load(center_ptr + c, mask=c_mask, other=0.0)
        scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
    else:
        center = tl.zeros_like(c).to(tl.float32)
        scale = center + 1.0
    if VAR:
        w = tl.load(w_ptr + row, mask=mask, other=0.0)
        g = _group_of(n, index_ptr, n_mask, GROUP_SIZE, RANDOM_GROUPS)
        mean = tl.load(mean_ptr + g[:, None] * C + c[None, :], mask=mask, other=0.0)
        d = m - mean
        u = (w + d * d) / (scale * scale)[None, :]
    else:
        u = (m - center[None, :]) / scale[None, :]
    return tl.where(mask, u, 0.0)


@triton.jit
def _clip_rows(
    m_ptr,
    w_ptr,
    mean_ptr,
    center_ptr,
    scale_ptr,
    index_ptr,
    clip_ptr,
    N,
    C,
    GROUP_SIZE,
    bound,
    VAR: tl.constexpr,
    HAS_REFERENCE: tl.constexpr,
    RANDOM_GROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The clip record of every sample's contribution row (``clip_rows``' arithmetic)."""
    for n_start in range(0, N, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_mask = n < N
        peak = tl.zeros((BLOCK_N,), dtype=tl.float32)
        finite = tl.full((BLOCK_N,), 1, dtype=tl.int32)
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            u = _contribution(
                m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, index_ptr, n, c, n_mask,
                c < C, C, GROUP_SIZE, VAR, HAS_REFERENCE, RANDOM_GROUPS,
            )  # fmt: skip
            ok = tl.abs(u) < float("inf")  # false for inf and NaN
            finite = tl.minimum(finite, tl.min(ok.to(tl.int32), axis=1))
            peak = tl.maximum(peak, tl.max(tl.where(ok, tl.abs(u), 0.0), axis=1))
        divisor = tl.where(peak > 0, peak, 1.0)
        sum_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            u = _contribution(
                m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, index_ptr, n, c, n_mask,
                c < C, C, GROUP_SIZE, VAR, HAS_REFERENCE, RANDOM_GROUPS,
            )  # fmt: skip
            unit = tl.where(tl.abs(u) < float("inf"), u, 0.0) / divisor[:, None]
            sum_sq += tl.sum(unit * unit, axis=1)
        unit_norm = tl.sqrt(sum_sq)
        clipped = (peak * unit_norm > bound) & (finite > 0)
        state = tl.where(finite > 0, tl.where(clipped, 1.0, 0.0), -1.0)
        multiplier = tl.where(clipped, bound / tl.maximum(unit_norm, 1e-30), 1.0)
        factor = tl.where(clipped, bound / tl.maximum(peak * unit_norm, 1e-30), 1.0)
        tl.store(clip_ptr + n, tl.where(clipped, divisor, 1.0), mask=n_mask)
        tl.store(clip_ptr + N + n, multiplier, mask=n_mask)
        tl.store(clip_ptr + 2 * N + n, state, mask=n_mask)
        tl.store(clip_ptr + 3 * N + n, tl.where(finite > 0, factor, 0.0), mask=n_mask)


@triton.jit
def _clipped(u, clip_ptr, n, n_mask, N, CLIP: tl.constexpr):
    """A tile of contributions after clipping (rows by their clip record)."""
    if CLIP:
        divisor = tl.load(clip_ptr + n, mask=n_mask, other=1.0)
        multiplier = tl.load(clip_ptr + N + n, mask=n_mask, other=1.0)
        state = tl.load(clip_ptr + 2 * N + n, mask=n_mask, other=0.0)
        u = tl.where(state[:, None] >= 0, u / divisor[:, None] * multiplier[:, None], 0.0)
    return u


@triton.jit
def _group_range(g, N, GROUP_SIZE, RANDOM_GROUPS: tl.constexpr):
    """Samples to visit for group ``g``: its own range, or every sample (random groups)."""
    if RANDOM_GROUPS:
        return 0, N
    return g * GROUP_SIZE, tl.minimum(g * GROUP_SIZE + GROUP_SIZE, N)


@triton.jit
def _group_sums(
    m_ptr,
    w_ptr,
    mean_ptr,
    center_ptr,
    scale_ptr,
    index_ptr,
    clip_ptr,
    noise_ptr,
    size_ptr,
    out_ptr,
    raw_ptr,
    norm_ptr,
    N,
    C,
    G,
    GROUP_SIZE,
    noise_std,
    var_floor,
    rho,
    VAR: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_REFERENCE: tl.constexpr,
    RANDOM_GROUPS: tl.constexpr,
    SELF_NORMALIZED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Each group's (noised) sum of clipped contributions, turned into its mean or variance.

    The sum is divided by the group's denominator ``D_g``, or (``SELF_NORMALIZED``, the clipped
    layer's statistics) by ``max(sum_g f_i, rho D_g)`` with ``f_i`` the clip factors; the
    weight and the divisor go to ``norm_ptr`` (``(2, G)``) for the backward.
    """
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        if HAS_REFERENCE:
            center = tl.load(center_ptr + c, mask=c_mask, other=0.0)
            scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
        else:
            center = tl.zeros((BLOCK_C,), dtype=tl.float32)
            scale = center + 1.0
        for g in range(0, G):
            start, end = _group_range(g, N, GROUP_SIZE, RANDOM_GROUPS)
            acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
            weight = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for n_start in range(start, end, BLOCK_N):
                n = n_start + tl.arange(0, BLOCK_N)
                n_mask = n < end
                if RANDOM_GROUPS:
                    n_mask = n_mask & (tl.load(index_ptr + n, mask=n_mask, other=-1) == g)
                u = _contribution(
                    m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, index_ptr, n, c, n_mask,
                    c_mask, C, GROUP_SIZE, VAR, HAS_REFERENCE, RANDOM_GROUPS,
                )  # fmt: skip
                u = _clipped(u, clip_ptr, n, n_mask, N, CLIP)
                acc += tl.sum(tl.where(n_mask[:, None] & c_mask[None, :], u, 0.0), axis=0)
                if SELF_NORMALIZED:
                    weight += tl.load(clip_ptr + 3 * N + n, mask=n_mask, other=0.0)
            if HAS_NOISE:
                acc += tl.load(noise_ptr + g * C + c, mask=c_mask, other=0.0) * noise_std
            size = tl.load(size_ptr + g)
            if SELF_NORMALIZED:
                total_weight = tl.sum(weight, axis=0)
                divisor = tl.maximum(total_weight, rho * size)
                tl.store(norm_ptr + g, total_weight)
                tl.store(norm_ptr + G + g, divisor)
                if VAR:
                    raw = scale * scale * (acc / divisor)
                else:
                    mean = center + scale * (acc / divisor)
            else:
                if VAR:
                    raw = scale * scale * acc / size
                else:
                    mean = center + scale * acc / size
            if VAR:
                tl.store(raw_ptr + g * C + c, raw, mask=c_mask)
                floor = var_floor * (scale * scale)
                tl.store(out_ptr + g * C + c, tl.maximum(raw, floor), mask=c_mask)
            else:
                tl.store(out_ptr + g * C + c, mean, mask=c_mask)


@triton.jit
def _coefficients(
    mean,
    var,
    weight_ptr,
    bias_ptr,
    c,
    c_mask,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd
    if HAS_WEIGHT:
        scale = rstd * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return rstd, scale, shift


@triton.jit
def _combine_forward_kernel(
    pivot_ptr,  # (N, C) fp32: stage-1 pivots (FROM_PARTIALS)
    s1_ptr,  # (N, C, SPLITS) fp32: partial sums of x - pivot (FROM_PARTIALS)
    s2_ptr,  # (N, C, SPLITS) fp32: partial sums of (x - pivot)^2 (FROM_PARTIALS)
    m_ptr,  # (N, C) fp32: per-sample means (written here FROM_PARTIALS, else read)
    w_ptr,  # (N, C) fp32: per-sample centred second moments (likewise)
    index_ptr,  # (N,) int64: group of each sample (RANDOM_GROUPS)
    size_ptr,  # (G,) fp32: each group's denominator
    center_ptr,  # (C,) fp32: clipping reference centre (HAS_REFERENCE)
    scale_ptr,  # (C,) fp32: clipping reference scale (HAS_REFERENCE)
    reference_ptr,  # (2, C) fp32 out: the reference used, centre then scale (REFERENCE_RUNNING)
    noise_ptr,  # (2, G, C) fp32: standard normal noise, mean then variance (HAS_NOISE)
    weight_ptr,  # (C,) any float (HAS_WEIGHT)
    bias_ptr,  # (C,) any float (HAS_BIAS)
    running_mean_ptr,  # (C,) updated in place (UPDATE_RUNNING)
    running_var_ptr,  # (C,) updated in place (UPDATE_RUNNING)
    num_batches_ptr,  # () int64: decremented when the check fails (CHECK)
    flag_ptr,  # (1,) int32 out: 1 if the running statistics are finite (were written)
    clip_ptr,  # (2, 3, N) fp32 out: per-sample clip records, mean then variance
    mean_ptr,  # (G, C) fp32 out: group means
    var_ptr,  # (G, C) fp32 out: group variances (floored)
    raw_var_ptr,  # (G, C) fp32 out: group variances before the floor
    norm_ptr,  # (2, 2, G) fp32 out: weight and divisor of each sum (SELF_NORMALIZED)
    new_running_ptr,  # (2, C) fp32 scratch: the updated running statistics
    norm_mean_ptr,  # (R, C) fp32 out: the statistics normalized with (COEF_MODE)
    norm_var_ptr,  # (R, C) fp32 out
    rstd_ptr,  # (R, C) fp32 out: 1 / sqrt(var + eps)
    gain_ptr,  # (R, C) fp32 out: rstd * weight
    shift_ptr,  # (R, C) fp32 out: bias - mean * gain
    N,
    C,
    G,
    SPLITS,
    M,
    GROUP_SIZE,
    clip_norm,
    var_clip_norm,
    mean_noise_std,
    var_noise_std,
    var_floor,
    mean_rho,
    var_rho,
    eps,
    momentum,
    reference_eps,
    FROM_PARTIALS: tl.constexpr,
    RANDOM_GROUPS: tl.constexpr,
    HAS_REFERENCE: tl.constexpr,
    REFERENCE_RUNNING: tl.constexpr,
    CLIP_MEAN: tl.constexpr,
    CLIP_VAR: tl.constexpr,
    NORMALIZED_MEAN: tl.constexpr,
    NORMALIZED_VAR: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    CHECK: tl.constexpr,
    COEF_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The whole stage 2 of one layer's forward (one program).

    Args:
        pivot_ptr, s1_ptr, s2_ptr: stage-1 partials (:func:`moments_partials`), if
            ``FROM_PARTIALS``; their moments are written to ``m_ptr``, ``w_ptr``.
        m_ptr, w_ptr: per-sample moments (read, or written from the partials).
        index_ptr, size_ptr: the partition (``RANDOM_GROUPS``: one index per sample, else
            consecutive groups of ``GROUP_SIZE``) and each group's denominator ``D_g``.
        center_ptr, scale_ptr: the clipping reference (``HAS_REFERENCE``; else 0 and 1).
        reference_ptr: with ``REFERENCE_RUNNING``, the reference is the running statistics
            before this update, ``(running_mean, sqrt(running_var + reference_eps))``, read
            here and written to ``reference_ptr`` (kept for the backward) instead.
        noise_ptr: ``(2, G, C)`` standard normals, times ``mean_noise_std = sigma R1`` and
            ``var_noise_std = sigma R2`` (``HAS_NOISE``).
        weight_ptr, bias_ptr: affine parameters, if any.
        running_mean_ptr, running_var_ptr: buffers moved ``momentum`` of the way to the pooled
            batch statistics (``UPDATE_RUNNING``); with ``CHECK`` only if all new values are
            finite, else left unchanged and ``num_batches_ptr`` decremented.
        flag_ptr: 1 if finite (or nothing to check), else 0.
        clip_ptr, mean_ptr, var_ptr, raw_var_ptr: outputs kept for the backward.
        new_running_ptr: scratch.
        norm_mean_ptr ... shift_ptr: ``COEF_MODE`` rows: ``COEF_GROUPS`` one per group,
            ``COEF_SAMPLES`` one per sample (its group's), ``COEF_RUNNING`` one row, the
            updated running statistics.
        N, C, G, SPLITS, M, GROUP_SIZE: sizes.
        clip_norm, var_clip_norm: ``R1``, ``R2`` (``CLIP_MEAN``, ``CLIP_VAR``).
        NORMALIZED_MEAN, NORMALIZED_VAR, mean_rho, var_rho: the clipped layer's statistics
            (:func:`safenorm.functional.clipped_statistics`): each clipped sum divided by
            ``max(sum f_i, rho D)``; ``norm_ptr`` keeps the weights and divisors.
        var_floor, eps, momentum: as named.
        BLOCK_N, BLOCK_C: tile of one loop step.
    """
    # Phases hand values to each other through global memory: a barrier between them makes
    # one phase's stores visible to every thread of the next.
    if REFERENCE_RUNNING:
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            c_mask = c < C
            center = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            var = tl.load(running_var_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
            tl.store(reference_ptr + c, center, mask=c_mask)
            tl.store(reference_ptr + C + c, tl.sqrt(var + reference_eps), mask=c_mask)
        center_ptr = reference_ptr
        scale_ptr = reference_ptr + C
        tl.debug_barrier()
    if FROM_PARTIALS:
        for n_start in range(0, N, BLOCK_N):
            n = n_start + tl.arange(0, BLOCK_N)
            for c_start in range(0, C, BLOCK_C):
                c = c_start + tl.arange(0, BLOCK_C)
                mask = (n < N)[:, None] & (c < C)[None, :]
                row = n[:, None] * C + c[None, :]
                sum1 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
                sum2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
                for split in range(0, SPLITS):
                    sum1 += tl.load(s1_ptr + row * SPLITS + split, mask=mask, other=0.0)
                    sum2 += tl.load(s2_ptr + row * SPLITS + split, mask=mask, other=0.0)
                d = sum1 / M
                w = tl.maximum(sum2 / M - d * d, 0.0)
                tl.store(m_ptr + row, tl.load(pivot_ptr + row, mask=mask, other=0.0) + d, mask=mask)
                tl.store(w_ptr + row, w, mask=mask)
        tl.debug_barrier()
    # Mean: clip records of (m - center) / scale, then each group's noised sum.
    if CLIP_MEAN:
        _clip_rows(
            m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, index_ptr, clip_ptr, N, C,
            GROUP_SIZE, clip_norm, False, HAS_REFERENCE, RANDOM_GROUPS, BLOCK_N, BLOCK_C,
        )  # fmt: skip
        tl.debug_barrier()
    _group_sums(
        m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, index_ptr, clip_ptr, noise_ptr,
        size_ptr, mean_ptr, raw_var_ptr, norm_ptr, N, C, G, GROUP_SIZE, mean_noise_std,
        var_floor, mean_rho, False, CLIP_MEAN, HAS_NOISE, HAS_REFERENCE, RANDOM_GROUPS,
        NORMALIZED_MEAN, BLOCK_N, BLOCK_C,
    )  # fmt: skip
    tl.debug_barrier()
    # Variance: centred second moments around the group's (released) mean, likewise.
    var_clip_ptr = clip_ptr + _CLIP_FIELDS * N
    if CLIP_VAR:
        _clip_rows(
            m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, index_ptr, var_clip_ptr, N, C,
            GROUP_SIZE, var_clip_norm, True, HAS_REFERENCE, RANDOM_GROUPS, BLOCK_N, BLOCK_C,
        )  # fmt: skip
        tl.debug_barrier()
    _group_sums(
        m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, index_ptr, var_clip_ptr,
        noise_ptr + G * C, size_ptr, var_ptr, raw_var_ptr, norm_ptr + 2 * G, N, C, G,
        GROUP_SIZE, var_noise_std, var_floor, var_rho, True, CLIP_VAR, HAS_NOISE, HAS_REFERENCE,
        RANDOM_GROUPS, NORMALIZED_VAR, BLOCK_N, BLOCK_C,
    )  # fmt: skip
    tl.debug_barrier()
    # Running update (pooled over groups) into scratch, and whether every value is finite.
    finite = tl.full([], 1, tl.int32)
    if UPDATE_RUNNING:
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            c_mask = c < C
            weighted_mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
            weighted_var = tl.zeros((BLOCK_C,), dtype=tl.float32)
            total = 0.0
            dof = 0.0
            for g in range(0, G):
                values = tl.load(size_ptr + g) * M
                weighted_mean += values * tl.load(mean_ptr + g * C + c, mask=c_mask, other=0.0)
                weighted_var += values * tl.load(var_ptr + g * C + c, mask=c_mask, other=0.0)
                total += values
                dof += tl.maximum(values - 1.0, 0.0)
            batch_mean = weighted_mean / total
            # With a single value per channel in all there is no degree of freedom: biased.
            batch_var = weighted_var / tl.where(dof > 0, dof, total)
            old_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            old_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            new_mean = old_mean * (1.0 - momentum) + batch_mean * momentum
            new_var = old_var * (1.0 - momentum) + batch_var * momentum
            ok = (tl.abs(new_mean) < float("inf")) & (tl.abs(new_var) < float("inf"))
            finite = tl.minimum(finite, tl.min(tl.where(c_mask, ok, 1).to(tl.int32), axis=0))
            tl.store(new_running_ptr + c, new_mean, mask=c_mask)
            tl.store(new_running_ptr + C + c, new_var, mask=c_mask)
        if not CHECK:
            finite = tl.full([], 1, tl.int32)
        tl.debug_barrier()
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            c_mask = c < C
            write = c_mask & ((tl.zeros((BLOCK_C,), dtype=tl.int32) + finite) > 0)
            new_mean = tl.load(new_running_ptr + c, mask=c_mask, other=0.0)
            new_var = tl.load(new_running_ptr + C + c, mask=c_mask, other=0.0)
            mean_type = running_mean_ptr.dtype.element_ty
            var_type = running_var_ptr.dtype.element_ty
            tl.store(running_mean_ptr + c, new_mean.to(mean_type), mask=write)
            tl.store(running_var_ptr + c, new_var.to(var_type), mask=write)
        if CHECK:
            batches = tl.load(num_batches_ptr)
            tl.store(num_batches_ptr, batches - 1, mask=finite == 0)
    tl.store(flag_ptr, finite)
    tl.debug_barrier()
    # Normalization coefficients.
    if COEF_MODE == 2:
        rows = 1
    elif COEF_MODE == 1:
        rows = N
    else:
        rows = G
    for r in range(0, rows):
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            c_mask = c < C
            if COEF_MODE == 2:  # the running statistics as they are now
                mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
                var = tl.load(running_var_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
            else:
                g = r
                if COEF_MODE == 1:
                    g = _group_of(r, index_ptr, r < N, GROUP_SIZE, RANDOM_GROUPS)
                mean = tl.load(mean_ptr + g * C + c, mask=c_mask, other=0.0)
                var = tl.load(var_ptr + g * C + c, mask=c_mask, other=1.0)
            rstd, gain, shift = _coefficients(
                mean, var, weight_ptr, bias_ptr, c, c_mask, eps, HAS_WEIGHT, HAS_BIAS
            )
            out = r * C + c
            tl.store(norm_mean_ptr + out, mean, mask=c_mask)
            tl.store(norm_var_ptr + out, var, mask=c_mask)
            tl.store(rstd_ptr + out, rstd, mask=c_mask)
            tl.store(gain_ptr + out, gain, mask=c_mask)
            tl.store(shift_ptr + out, shift, mask=c_mask)


@triton.jit
def _clip_vjp(
    m_ptr,
    w_ptr,
    mean_ptr,
    center_ptr,
    scale_ptr,
    clip_ptr,
    cot_ptr,
    dm_ptr,
    dw_ptr,
    dmean_ptr,
    g,
    start,
    end,
    N,
    C,
    GROUP_SIZE,
    bound,
    weight_cot,
    VAR: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_REFERENCE: tl.constexpr,
    NORMALIZED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward of one group's clipped sum: the sum's cotangent ``cot`` (a ``(C,)`` row) to
    each sample's moments.

    A clipped row ``c_i = R u_i / ||u_i||`` has the Jacobian ``R / ||u_i|| (I - e e^T)`` with
    ``e = c_i / R``; a row within the bound passes ``cot`` unchanged; a non-finite row gets zero.
    ``NORMALIZED``: the sum's divisor ``max(sum f_i, rho D)`` has the cotangent ``weight_cot``
    on each clip factor ``f_i = R / ||u_i||`` of a clipped row, whose gradient is
    ``-f_i^2 c_i / R^2``.
    The mean's contributions give ``dm += du / scale``; the variance's give
    ``dw += du / scale^2``, ``dm += 2 (m - mu_g) du / scale^2`` and ``dmu_g -= the latter``
    (accumulated in ``dmean_ptr``).
    """
    for n_start in range(start, end, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_mask = n < end
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if CLIP:
            divisor = tl.load(clip_ptr + n, mask=n_mask, other=1.0)
            multiplier = tl.load(clip_ptr + N + n, mask=n_mask, other=1.0)
            state = tl.load(clip_ptr + 2 * N + n, mask=n_mask, other=0.0)
            for c_start in range(0, C, BLOCK_C):
                c = c_start + tl.arange(0, BLOCK_C)
                c_mask = c < C
                u = _contribution(
                    m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, m_ptr, n, c, n_mask, c_mask,
                    C, GROUP_SIZE, VAR, HAS_REFERENCE, False,
                )  # fmt: skip
                clipped = u / divisor[:, None] * multiplier[:, None]
                cot = tl.load(cot_ptr + g * C + c, mask=c_mask, other=0.0)
                dot += tl.sum(tl.where(c_mask[None, :], clipped * cot[None, :], 0.0), axis=1)
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C)
            c_mask = c < C
            mask = n_mask[:, None] & c_mask[None, :]
            cot = tl.load(cot_ptr + g * C + c, mask=c_mask, other=0.0)
            du = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32) + cot[None, :]
            if CLIP:
                u = _contribution(
                    m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, m_ptr, n, c, n_mask, c_mask,
                    C, GROUP_SIZE, VAR, HAS_REFERENCE, False,
                )  # fmt: skip
                clipped = u / divisor[:, None] * multiplier[:, None]
                projected = (multiplier / divisor)[:, None] * (
                    du - (dot / bound)[:, None] * clipped / bound
                )
                if NORMALIZED:
                    factor = tl.load(clip_ptr + 3 * N + n, mask=n_mask, other=0.0)
                    through_factor = -(factor * factor)[:, None] * clipped / (bound * bound)
                    projected += weight_cot * through_factor
                du = tl.where(state[:, None] > 0, projected, du)
                du = tl.where(state[:, None] >= 0, du, 0.0)
            if HAS_REFERENCE:
                scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
            else:
                scale = tl.zeros((BLOCK_C,), dtype=tl.float32) + 1.0
            row = n[:, None] * C + c[None, :]
            if VAR:
                scale_sq = (scale * scale)[None, :]
                m = tl.load(m_ptr + row, mask=mask, other=0.0)
                mean = tl.load(mean_ptr + g * C + c, mask=c_mask, other=0.0)
                through_mean = du * 2.0 * (m - mean[None, :]) / scale_sq
                through_mean = tl.where(mask, through_mean, 0.0)
                tl.store(dw_ptr + row, du / scale_sq, mask=mask)
                tl.store(dm_ptr + row, through_mean, mask=mask)
                previous = tl.load(dmean_ptr + g * C + c, mask=c_mask, other=0.0)
                total = previous - tl.sum(through_mean, axis=0)
                tl.debug_barrier()  # every thread has read before any writes
                tl.store(dmean_ptr + g * C + c, total, mask=c_mask)
                tl.debug_barrier()
            else:
                dm = tl.load(dm_ptr + row, mask=mask, other=0.0)
                tl.store(dm_ptr + row, dm + du / scale[None, :], mask=mask)


@triton.jit
def _sum_cotangent(
    cot_ptr,
    stat_ptr,
    center_ptr,
    scale_ptr,
    norm_ptr,
    g,
    C,
    G,
    size,
    rho,
    VAR: tl.constexpr,
    HAS_REFERENCE: tl.constexpr,
    NORMALIZED: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Row ``g`` of ``cot_ptr``, the cotangent of a group statistic, becomes that of its sum
    (in place): ``* scale / divisor`` (mean) or ``* scale^2 / divisor`` (variance).

    ``NORMALIZED``: also the cotangent of the weight ``sum f_i`` through the divisor
    ``max(weight, rho D)`` (half at a tie, as ``torch.maximum``): the statistic's derivative in
    the divisor is ``-(mu - center) / divisor`` or ``-var / divisor``. Returns that weight
    cotangent (0 otherwise).
    """
    divisor = size
    if NORMALIZED:
        divisor = tl.load(norm_ptr + G + g)
    divisor_cot = 0.0
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        if HAS_REFERENCE:
            scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
        else:
            scale = tl.zeros((BLOCK_C,), dtype=tl.float32) + 1.0
        cot = tl.load(cot_ptr + g * C + c, mask=c_mask, other=0.0)
        if NORMALIZED:
            stat = tl.load(stat_ptr + g * C + c, mask=c_mask, other=0.0)
            if not VAR:  # noqa: SIM102 (constexpr branches, one at a time)
                if HAS_REFERENCE:
                    stat -= tl.load(center_ptr + c, mask=c_mask, other=0.0)
            divisor_cot += tl.sum(tl.where(c_mask, -cot * stat / divisor, 0.0), axis=0)
        factor = scale
        if VAR:
            factor = scale * scale
        tl.debug_barrier()  # every thread has read the row before any writes it
        tl.store(cot_ptr + g * C + c, cot * factor / divisor, mask=c_mask)
    weight_cot = divisor * 0.0
    if NORMALIZED:
        weight = tl.load(norm_ptr + g)
        passed = tl.where(weight > rho * size, 1.0, tl.where(weight == rho * size, 0.5, 0.0))
        weight_cot = divisor_cot * passed
    return weight_cot


@triton.jit
def _combine_backward_kernel(
    sdyx_ptr,  # (N, C, SPLITS) fp32: partial sums of dy * xhat
    sdy_ptr,  # (N, C, SPLITS) fp32: partial sums of dy
    m_ptr,  # (N, C) fp32: per-sample means (forward)
    w_ptr,  # (N, C) fp32: per-sample centred second moments (forward)
    size_ptr,  # (G,) fp32: group denominators
    center_ptr,  # (C,) fp32 (HAS_REFERENCE)
    scale_ptr,  # (C,) fp32 (HAS_REFERENCE)
    clip_ptr,  # (2, 3, N) fp32: the forward's clip records
    mean_ptr,  # (G, C) fp32: group means
    raw_var_ptr,  # (G, C) fp32: group variances before the floor
    norm_ptr,  # (2, 2, G) fp32: the forward's weights and divisors (NORMALIZED_*)
    rstd_ptr,  # (G, C) fp32
    gain_ptr,  # (G, C) fp32: rstd * weight
    d_mean_ptr,  # (G, C) fp32 scratch: cotangent of the group mean
    d_sum_ptr,  # (G, C) fp32 scratch: cotangent of a group sum
    coef_ptr,  # (N, C) fp32 out: 2 dw / M
    offset_ptr,  # (N, C) fp32 out: dm / M
    dweight_ptr,  # (C,) fp32 out
    dbias_ptr,  # (C,) fp32 out
    N,
    C,
    G,
    SPLITS,
    M,
    GROUP_SIZE,
    clip_norm,
    var_clip_norm,
    var_floor,
    mean_rho,
    var_rho,
    HAS_REFERENCE: tl.constexpr,
    CLIP_MEAN: tl.constexpr,
    CLIP_VAR: tl.constexpr,
    NORMALIZED_MEAN: tl.constexpr,
    NORMALIZED_VAR: tl.constexpr,
    HAS_FLOOR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Vector-Jacobian product of :func:`_combine_forward_kernel` (consecutive groups, no
    noise) composed with the normalization's: ``dx = dy * gain + coef * (x - m) + offset``.

    With ``sdyx_i = sum_s dy xhat`` and ``sdy_i = sum_s dy`` per sample, the group statistics'
    cotangents are ``d_mean_g = -gain_g sum_g sdy`` and ``d_var_g = -gain_g rstd_g / 2 sum_g
    sdyx`` (``dweight``, ``dbias`` are the plain sums); the floor passes ``d_var`` where the raw
    variance is above it (half at a tie, as ``torch.maximum``); the rest runs backward through
    the two clipped sums (:func:`_clip_vjp`).

    Args:
        sdyx_ptr, sdy_ptr: the reduce pass's partials.
        m_ptr ... gain_ptr: the forward's inputs and outputs.
        d_mean_ptr, d_sum_ptr: scratch.
        coef_ptr, offset_ptr: per-sample coefficients of ``dx`` (``offset`` doubles as the
            ``dm`` accumulator, ``coef`` as ``dw``).
        dweight_ptr, dbias_ptr: affine gradients.
        N, C, G, SPLITS, M, GROUP_SIZE: sizes. clip_norm, var_clip_norm, var_floor: as forward.
    """
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        if HAS_REFERENCE:
            scale = tl.load(scale_ptr + c, mask=c_mask, other=1.0)
        else:
            scale = tl.zeros((BLOCK_C,), dtype=tl.float32) + 1.0
        scale_sq = scale * scale
        dweight = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for g in range(0, G):
            start = g * GROUP_SIZE
            end = tl.minimum(start + GROUP_SIZE, N)
            acc_dyx = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            acc_dy = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            for n_start in range(start, end, BLOCK_N):
                n = n_start + tl.arange(0, BLOCK_N)
                mask = (n < end)[:, None] & c_mask[None, :]
                row = (n[:, None] * C + c[None, :]) * SPLITS
                for split in range(0, SPLITS):
                    acc_dyx += tl.load(sdyx_ptr + row + split, mask=mask, other=0.0)
                    acc_dy += tl.load(sdy_ptr + row + split, mask=mask, other=0.0)
            total_dyx = tl.sum(acc_dyx, axis=0)
            total_dy = tl.sum(acc_dy, axis=0)
            dweight += total_dyx
            dbias += total_dy
            out = g * C + c
            gain = tl.load(gain_ptr + out, mask=c_mask, other=0.0)
            rstd = tl.load(rstd_ptr + out, mask=c_mask, other=0.0)
            d_var = -0.5 * gain * rstd * total_dyx
            if HAS_FLOOR:  # torch.maximum: the raw variance's share (half at a tie)
                raw = tl.load(raw_var_ptr + out, mask=c_mask, other=0.0)
                floor = var_floor * scale_sq
                d_var *= tl.where(raw > floor, 1.0, tl.where(raw == floor, 0.5, 0.0))
            tl.store(d_mean_ptr + out, -gain * total_dy, mask=c_mask)
            tl.store(d_sum_ptr + out, d_var, mask=c_mask)
        tl.store(dweight_ptr + c, dweight, mask=c_mask)
        tl.store(dbias_ptr + c, dbias, mask=c_mask)
    tl.debug_barrier()
    var_clip_ptr = clip_ptr + _CLIP_FIELDS * N
    for g in range(0, G):
        start = g * GROUP_SIZE
        end = tl.minimum(start + GROUP_SIZE, N)
        size = tl.load(size_ptr + g)
        # The variance's sum: var_g = scale^2 * S / divisor.
        weight_cot = _sum_cotangent(
            d_sum_ptr, raw_var_ptr, center_ptr, scale_ptr, norm_ptr + 2 * G, g, C, G, size,
            var_rho, True, HAS_REFERENCE, NORMALIZED_VAR, BLOCK_C,
        )  # fmt: skip
        tl.debug_barrier()
        # Through its clipped contributions: dw, dm (into coef, offset) and d_mean += ...
        _clip_vjp(
            m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, var_clip_ptr, d_sum_ptr, offset_ptr,
            coef_ptr, d_mean_ptr, g, start, end, N, C, GROUP_SIZE, var_clip_norm, weight_cot,
            True, CLIP_VAR, HAS_REFERENCE, NORMALIZED_VAR, BLOCK_N, BLOCK_C,
        )  # fmt: skip
        tl.debug_barrier()
        # The mean's sum: mu_g = center + scale * S / divisor.
        weight_cot = _sum_cotangent(
            d_mean_ptr, mean_ptr, center_ptr, scale_ptr, norm_ptr, g, C, G, size, mean_rho,
            False, HAS_REFERENCE, NORMALIZED_MEAN, BLOCK_C,
        )  # fmt: skip
        tl.debug_barrier()
        _clip_vjp(
            m_ptr, w_ptr, mean_ptr, center_ptr, scale_ptr, clip_ptr, d_mean_ptr, offset_ptr,
            coef_ptr, d_mean_ptr, g, start, end, N, C, GROUP_SIZE, clip_norm, weight_cot, False,
            CLIP_MEAN, HAS_REFERENCE, NORMALIZED_MEAN, BLOCK_N, BLOCK_C,
        )  # fmt: skip
        tl.debug_barrier()
        # Per-sample coefficients of dx: dm / M and 2 dw / M.
        for n_start in range(start, end, BLOCK_N):
            n = n_start + tl.arange(0, BLOCK_N)
            for c_start in range(0, C, BLOCK_C):
                c = c_start + tl.arange(0, BLOCK_C)
                mask = (n < end)[:, None] & (c < C)[None, :]
                row = n[:, None] * C + c[None, :]
                dm = tl.load(offset_ptr + row, mask=mask, other=0.0)
                dw = tl.load(coef_ptr + row, mask=mask, other=0.0)
                tl.store(offset_ptr + row, dm / M, mask=mask)
                tl.store(coef_ptr + row, 2.0 * dw / M, mask=mask)


@dataclass(frozen=True)
class Combined:
    """What :func:`combine_forward` returns (fp32; ``R`` rows of coefficients).

    Attributes:
        mean, var: ``(G, C)`` group statistics (``var`` floored); ``raw_var`` before the floor.
        m, w: ``(N, C)`` per-sample moments.
        clip: ``(2, 3, N)`` per-sample clip records (mean, variance).
        norm_mean, norm_var, rstd, gain, shift: ``(R, C)`` the statistics normalized with and
            the coefficients of ``y = x * gain + shift``.
        finite: ``(1,)`` int32, 1 if the running statistics are finite (and were written).
        reference: ``(2, C)`` the reference read from the running statistics (centre, scale),
            with ``reference_eps``; else ``None``.
        norm: ``(2, 2, G)`` weights ``sum f_i`` and divisors of the self-normalized sums (mean,
            variance); else ``None``.
    """

    mean: Tensor
    var: Tensor
    raw_var: Tensor
    m: Tensor
    w: Tensor
    clip: Tensor
    norm_mean: Tensor
    norm_var: Tensor
    rstd: Tensor
    gain: Tensor
    shift: Tensor
    finite: Tensor
    reference: Tensor | None = None
    norm: Tensor | None = None


def _f32(t: Tensor | None, like: Tensor) -> Tensor:
    if t is None:
        return torch.empty(1, device=like.device, dtype=torch.float32)
    return t.detach().to(torch.float32).contiguous()


def _bound(value: float) -> tuple[bool, float]:
    """Whether a bound clips, and the value the kernel gets (a finite stand-in otherwise)."""
    return (not math.isinf(value)), (float(value) if not math.isinf(value) else 1.0)


def _reference(
    center: Tensor | None, scale: Tensor | None, c: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """Both or neither: a reference with only one of them gets the default other (0 or 1)."""
    if (center is None) == (scale is None):
        return center, scale
    if center is None:
        center = torch.zeros(c, device=device)
    return center, scale if scale is not None else torch.ones(c, device=device)


def combine_forward(
    moments: tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor],
    spatial: int,
    sizes: Tensor,
    *,
    index: Tensor | None = None,
    group_size: int = 0,
    center: Tensor | None = None,
    scale: Tensor | None = None,
    clip_norm: float = math.inf,
    var_clip_norm: float = math.inf,
    noise: Tensor | None = None,
    noise_multiplier: float = 0.0,
    var_floor: float = 0.0,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    num_batches_tracked: Tensor | None = None,
    coef_mode: int = COEF_GROUPS,
    reference_eps: float | None = None,
    weight_floors: tuple[float, float] | None = None,
) -> Combined:
    """Stage 2 of a training forward in one launch (see the module docstring).

    Args:
        moments: ``(m, w)`` ``(N, C)`` fp32, or the stage-1 partials ``(pivot, s1, s2)``.
        spatial: ``M``, values per (sample, channel).
        sizes: ``(G,)`` the groups' denominators (actual sizes, or public DP ones).
        index: ``(N,)`` long group of each sample (random groups), or ``None`` for consecutive
            groups of ``group_size`` (``<= 0``: one group).
        center, scale: ``(C,)`` clipping reference, or ``None`` (raw units).
        clip_norm, var_clip_norm: ``R1``, ``R2`` (``inf``: no clipping).
        noise: ``(2, G, C)`` standard normals (mean, variance), or ``None``.
        noise_multiplier: ``sigma``; the noise is scaled by ``sigma * R``.
        var_floor: lower bound of the variance in units of ``scale^2``.
        weight, bias, eps: the affine normalization the coefficients are for.
        running_mean, running_var, momentum: the running update, if buffers are given.
        num_batches_tracked: if given, the running update is checked: written only when all new
            values are finite, and on failure this counter is decremented (undoing the
            forward's increment).
        coef_mode: ``COEF_GROUPS``, ``COEF_SAMPLES`` or ``COEF_RUNNING`` (needs the buffers).
        reference_eps: if given (and no ``center``/``scale``), the clipping reference is the
            running statistics before the update, ``(running_mean, sqrt(running_var + eps))``;
            the kernel reads them itself and returns the snapshot (``Combined.reference``).
        weight_floors: ``(rho1, rho2)``: self-normalized sums (the clipped layer's statistics,
            :func:`safenorm.functional.clipped_statistics`), each clipped sum divided by
            ``max(sum f_i, rho D)``; ``None``: by ``D`` (:func:`~safenorm.functional.
            private_statistics`).
    """
    from_partials = len(moments) == 3
    first = moments[0]
    n, c = first.shape[0], first.shape[1]
    device = first.device
    g = sizes.shape[0]
    group = n if group_size <= 0 or group_size >= n else group_size
    if n == 0:  # nothing to read (a noise-only release): the kernel visits no sample
        moments, from_partials = (first.new_empty((1, c)), first.new_empty((1, c))), False
    if from_partials:
        pivot, s1, s2 = moments
        m, w = torch.empty_like(pivot), torch.empty_like(pivot)
    else:
        m, w = (t.detach().to(torch.float32).contiguous() for t in moments)
        pivot = s1 = s2 = m
    clip_mean, r1 = _bound(clip_norm)
    clip_var, r2 = _bound(var_clip_norm)
    center, scale = _reference(center, scale, c, device)
    has_noise = noise is not None and noise_multiplier > 0
    update = running_mean is not None and running_var is not None
    from_running = reference_eps is not None
    if from_running and (center is not None or not update):
        raise ValueError("reference_eps reads the reference from the running buffers alone")
    rows = {COEF_GROUPS: g, COEF_SAMPLES: n, COEF_RUNNING: 1}[coef_mode]
    empty = lambda *shape: torch.empty(shape, device=device, dtype=torch.float32)  # noqa: E731
    mean, var, raw_var = empty(g, c), empty(g, c), empty(g, c)
    clip = empty(2, _CLIP_FIELDS.value, max(n, 1))
    norm_mean, norm_var, rstd, gain, shift = (empty(max(rows, 1), c)[:rows] for _ in range(5))
    finite = torch.empty(1, device=device, dtype=torch.int32)
    dummy = empty(1)
    reference = empty(2, c) if from_running else None
    normalized = weight_floors is not None
    rho1, rho2 = weight_floors if normalized else (0.0, 0.0)
    norm = empty(2, 2, g) if normalized else None
    # One program: the whole combine (clipping couples channels, the group sums samples).
    _combine_forward_kernel[(1,)](
        pivot,
        s1,
        s2,
        m,
        w,
        index if index is not None and index.numel() > 0 else dummy,
        _f32(sizes, first),
        _f32(center, first),
        _f32(scale, first),
        reference if from_running else dummy,
        _f32(noise, first) if has_noise else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        running_mean if update else dummy,
        running_var if update else dummy,
        num_batches_tracked if num_batches_tracked is not None else dummy,
        finite,
        clip,
        mean,
        var,
        raw_var,
        norm if normalized else dummy,
        empty(2, c) if update else dummy,
        norm_mean,
        norm_var,
        rstd,
        gain,
        shift,
        n,
        c,
        g,
        s1.shape[2] if from_partials else 1,
        spatial,
        group,
        r1,
        r2,
        float(noise_multiplier) * (r1 if clip_mean else math.inf) if has_noise else 0.0,
        float(noise_multiplier) * (r2 if clip_var else math.inf) if has_noise else 0.0,
        float(var_floor),
        float(rho1),
        float(rho2),
        float(eps),
        float(momentum),
        float(reference_eps) if from_running else 0.0,
        FROM_PARTIALS=from_partials,
        RANDOM_GROUPS=index is not None,
        HAS_REFERENCE=center is not None or scale is not None or from_running,
        REFERENCE_RUNNING=from_running,
        CLIP_MEAN=clip_mean,
        CLIP_VAR=clip_var,
        NORMALIZED_MEAN=normalized and clip_mean,
        NORMALIZED_VAR=normalized and clip_var,
        HAS_NOISE=has_noise,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        UPDATE_RUNNING=update,
        CHECK=update and num_batches_tracked is not None,
        COEF_MODE=coef_mode,
        BLOCK_N=_BLOCK_N,
        BLOCK_C=min(_BLOCK_C, triton.next_power_of_2(c)),
        num_warps=_NUM_WARPS,
    )
    return Combined(
        mean, var, raw_var, m, w, clip, norm_mean, norm_var, rstd, gain, shift, finite,
        reference, norm,
    )  # fmt: skip


def combine_backward(
    sdyx: Tensor,
    sdy: Tensor,
    forward: Combined,
    spatial: int,
    sizes: Tensor,
    *,
    group_size: int = 0,
    center: Tensor | None = None,
    scale: Tensor | None = None,
    clip_norm: float = math.inf,
    var_clip_norm: float = math.inf,
    var_floor: float = 0.0,
    weight_floors: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`combine_forward` (``COEF_GROUPS``, consecutive groups, no noise)
    composed with the normalization's.

    Args:
        sdyx, sdy: ``(N, C, splits)`` partial sums of ``dy * xhat`` and ``dy`` (the reduce pass
            of :func:`safenorm.kernels.normalize.normalize_backward` with ``partials=True``).
        forward: what :func:`combine_forward` returned.
        spatial, sizes, group_size, center, scale, clip_norm, var_clip_norm, var_floor,
            weight_floors: as given to :func:`combine_forward`.

    Returns:
        ``(coef, offset, dweight, dbias)``: ``(N, C)`` fp32 with ``dx = dy * gain + coef *
        (x - m) + offset`` (``gain`` per group, ``m`` per sample); ``(C,)`` fp32 sums.
    """
    n, c = forward.m.shape
    g = sizes.shape[0]
    group = n if group_size <= 0 or group_size >= n else group_size
    clip_mean, r1 = _bound(clip_norm)
    clip_var, r2 = _bound(var_clip_norm)
    device = forward.m.device
    center, scale = _reference(center, scale, c, device)
    coef, offset = torch.empty_like(forward.m), torch.empty_like(forward.m)
    d_mean, d_sum = torch.empty_like(forward.mean), torch.empty_like(forward.mean)
    dweight, dbias = (torch.empty(c, device=device, dtype=torch.float32) for _ in range(2))
    # One program: the whole vector-Jacobian product of the combine.
    _combine_backward_kernel[(1,)](
        sdyx,
        sdy,
        forward.m,
        forward.w,
        _f32(sizes, forward.m),
        _f32(center, forward.m),
        _f32(scale, forward.m),
        forward.clip,
        forward.mean,
        forward.raw_var,
        forward.norm if forward.norm is not None else forward.raw_var,
        forward.rstd,
        forward.gain,
        d_mean,
        d_sum,
        coef,
        offset,
        dweight,
        dbias,
        n,
        c,
        g,
        sdyx.shape[2],
        spatial,
        group,
        r1,
        r2,
        float(var_floor),
        float(weight_floors[0]) if weight_floors else 0.0,
        float(weight_floors[1]) if weight_floors else 0.0,
        HAS_REFERENCE=center is not None or scale is not None,
        CLIP_MEAN=clip_mean,
        CLIP_VAR=clip_var,
        NORMALIZED_MEAN=weight_floors is not None and clip_mean,
        NORMALIZED_VAR=weight_floors is not None and clip_var,
        HAS_FLOOR=var_floor > 0,
        BLOCK_N=_BLOCK_N,
        BLOCK_C=min(_BLOCK_C, triton.next_power_of_2(c)),
        num_warps=_NUM_WARPS,
    )
    return coef, offset, dweight, dbias
