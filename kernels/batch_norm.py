"""Batch norm and ghost batch norm (gradients through the statistics) in five launches.

The general path of :mod:`safenorm.ops` combines per-sample moments into group statistics with
dozens of small PyTorch operations each way, each a kernel launch that costs more host time than
the kernel takes on a GPU. Without clipping (``nn.BatchNorm``'s math, per consecutive ghost
group as :class:`~safenorm.GhostBatchNorm2d` makes them) the combine is a per-channel reduction
over ``(N, C, splits)`` partial sums, done here in one kernel each way:

* forward: stage-1 partial sums (:func:`safenorm.kernels.moments.moments_partials`), then
  ``_statistics_kernel`` (each group's mean and variance, the affine coefficients and the
  running update in place), then :func:`safenorm.kernels.normalize.normalize_forward`;
* backward: the reduce pass of :func:`safenorm.kernels.normalize.normalize_backward`, then
  ``_statistics_backward_kernel`` (``dweight``, ``dbias`` and each group's coefficients of
  ``dx``), then the ``dx`` pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .moments import moments_partials
from .normalize import normalize_backward, normalize_forward

__all__ = ["batch_norm_backward", "batch_norm_forward"]

# Samples per loop step of the combine kernels (a tile of BLOCK_N x BLOCK_C partial sums).
_BLOCK_N = 32
_BLOCK_C = 32


@triton.jit
def _statistics_kernel(
    pivot_ptr,  # (N, C) fp32: each row's first element
    s1_ptr,  # (N, C, SPLITS) fp32: partial sums of x - pivot
    s2_ptr,  # (N, C, SPLITS) fp32: partial sums of (x - pivot)^2
    weight_ptr,  # (C,) any float (HAS_WEIGHT)
    bias_ptr,  # (C,) any float (HAS_BIAS)
    running_mean_ptr,  # (C,) updated in place (UPDATE_RUNNING)
    running_var_ptr,  # (C,) updated in place (UPDATE_RUNNING)
    mean_ptr,  # (G, C) fp32 out
    rstd_ptr,  # (G, C) fp32 out
    scale_ptr,  # (G, C) fp32 out: rstd * weight
    shift_ptr,  # (G, C) fp32 out: bias - mean * scale
    N,
    C,
    SPLITS,
    M,
    GROUP_SIZE,
    eps,
    momentum,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Statistics of each ghost group (consecutive samples) for BLOCK_C channels.

    Args:
        pivot_ptr, s1_ptr, s2_ptr: the stage-1 outputs (:func:`moments_partials`).
        weight_ptr, bias_ptr: affine parameters, if any.
        running_mean_ptr, running_var_ptr: buffers, moved ``momentum`` of the way to the batch
            mean and the pooled unbiased within-group variance
            (:func:`safenorm.functional.pooled_running_update`).
        mean_ptr, rstd_ptr, scale_ptr, shift_ptr: fp32 ``(G, C)`` outputs, one row per group.
        N, C, SPLITS, M: samples, channels, spatial splits, spatial size.
        GROUP_SIZE: samples per group (the last one may be smaller; ``N`` for one group).
        eps, momentum: as named.
        BLOCK_N, BLOCK_C: tile of one loop step.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    weighted_mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    weighted_var = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dof = 0.0
    for group_start in range(0, N, GROUP_SIZE):
        group_end = tl.minimum(group_start + GROUP_SIZE, N)
        count = group_end - group_start
        # Sample means are summed as deviations from the group's first, so the variance of the
        # means cancels nothing larger than their spread (the data's mean can be far from 0).
        first_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first_row = group_start * C + c
        for split in range(0, SPLITS):
            first_sum += tl.load(s1_ptr + first_row * SPLITS + split, mask=c_mask, other=0.0)
        first = tl.load(pivot_ptr + first_row, mask=c_mask, other=0.0) + first_sum / M
        acc_d = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc_d2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc_w = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for n_start in range(group_start, group_end, BLOCK_N):
            n = n_start + tl.arange(0, BLOCK_N)
            mask = (n < group_end)[:, None] & c_mask[None, :]
            row = n[:, None] * C + c[None, :]
            sum1 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            sum2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            for split in range(0, SPLITS):
                sum1 += tl.load(s1_ptr + row * SPLITS + split, mask=mask, other=0.0)
                sum2 += tl.load(s2_ptr + row * SPLITS + split, mask=mask, other=0.0)
            shift = sum1 / M
            sample_var = tl.maximum(sum2 / M - shift * shift, 0.0)
            deviation = tl.load(pivot_ptr + row, mask=mask, other=0.0) + shift - first[None, :]
            deviation = tl.where(mask, deviation, 0.0)
            acc_d += deviation
            acc_d2 += deviation * deviation
            acc_w += tl.where(mask, sample_var, 0.0)
        mean_deviation = tl.sum(acc_d, axis=0) / count
        mean = first + mean_deviation
        var = tl.sum(acc_w, axis=0) / count + tl.sum(acc_d2, axis=0) / count
        var = tl.maximum(var - mean_deviation * mean_deviation, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        scale = rstd
        if HAS_WEIGHT:
            scale = rstd * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_BIAS:
            shift += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        out = (group_start // GROUP_SIZE) * C + c
        tl.store(mean_ptr + out, mean, mask=c_mask)
        tl.store(rstd_ptr + out, rstd, mask=c_mask)
        tl.store(scale_ptr + out, scale, mask=c_mask)
        tl.store(shift_ptr + out, shift, mask=c_mask)
        values = count.to(tl.float32) * M  # in fp32: N * M can pass 2^31
        weighted_mean += values * mean
        weighted_var += values * var
        dof += tl.maximum(values - 1.0, 0.0)
    if UPDATE_RUNNING:
        total = N * 1.0 * M
        batch_mean = weighted_mean / total
        # With a single value per channel in all there is no degree of freedom: keep it biased.
        batch_var = weighted_var / tl.where(dof > 0, dof, total)
        old_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        old_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        new_mean = old_mean + momentum * (batch_mean - old_mean)
        new_var = old_var + momentum * (batch_var - old_var)
        tl.store(running_mean_ptr + c, new_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(running_var_ptr + c, new_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _statistics_backward_kernel(
    sdyx_ptr,  # (N, C, SPLITS) fp32: partial sums of dy * xhat
    sdy_ptr,  # (N, C, SPLITS) fp32: partial sums of dy
    scale_ptr,  # (G, C) fp32: rstd * weight
    rstd_ptr,  # (G, C) fp32
    coef_ptr,  # (G, C) fp32 out
    offset_ptr,  # (G, C) fp32 out
    dweight_ptr,  # (C,) fp32 out: sum of dy * xhat
    dbias_ptr,  # (C,) fp32 out: sum of dy
    N,
    C,
    SPLITS,
    M,
    GROUP_SIZE,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dweight``, ``dbias`` and, per group, the terms of ``dx = dy * scale + coef * (x - mean)
    + offset``.

    With ``count = n_g * M`` values per channel in group ``g``, BN's input gradient is
    ``scale * (dy - sum(dy) / count - xhat * sum(dy * xhat) / count)`` (sums over the group),
    so ``coef = -scale * rstd * sum(dy * xhat) / count`` and ``offset = -scale * sum(dy) / count``.

    Args:
        sdyx_ptr, sdy_ptr: the reduce pass's partial sums.
        scale_ptr, rstd_ptr: the forward's coefficients, one row per group.
        coef_ptr, offset_ptr: fp32 ``(G, C)`` outputs. dweight_ptr, dbias_ptr: fp32 ``(C,)``.
        N, C, SPLITS, M: samples, channels, spatial splits, spatial size.
        GROUP_SIZE: samples per group (``N`` for one group).
        BLOCK_N, BLOCK_C: tile of one loop step.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dweight = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for group_start in range(0, N, GROUP_SIZE):
        group_end = tl.minimum(group_start + GROUP_SIZE, N)
        acc_dyx = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        acc_dy = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for n_start in range(group_start, group_end, BLOCK_N):
            n = n_start + tl.arange(0, BLOCK_N)
            mask = (n < group_end)[:, None] & c_mask[None, :]
            row = (n[:, None] * C + c[None, :]) * SPLITS
            for split in range(0, SPLITS):
                acc_dyx += tl.load(sdyx_ptr + row + split, mask=mask, other=0.0)
                acc_dy += tl.load(sdy_ptr + row + split, mask=mask, other=0.0)
        total_dyx = tl.sum(acc_dyx, axis=0)
        total_dy = tl.sum(acc_dy, axis=0)
        count = (group_end - group_start).to(tl.float32) * M
        out = (group_start // GROUP_SIZE) * C + c
        scale = tl.load(scale_ptr + out, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + out, mask=c_mask, other=0.0)
        tl.store(coef_ptr + out, -scale * rstd * total_dyx / count, mask=c_mask)
        tl.store(offset_ptr + out, -scale * total_dy / count, mask=c_mask)
        dweight += total_dyx
        dbias += total_dy
    tl.store(dweight_ptr + c, dweight, mask=c_mask)
    tl.store(dbias_ptr + c, dbias, mask=c_mask)


def _group_size(n: int, group_size: int | None) -> int:
    return n if group_size is None or group_size <= 0 or group_size >= n else group_size


def _dummy(x: Tensor) -> Tensor:
    return torch.empty(1, device=x.device, dtype=torch.float32)


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    *,
    group_size: int | None = None,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm of ``x``, statistics over the batch or each ghost group.

    Args:
        x: ``(N, C, *S)`` float32/float16/bfloat16 with ``N, C, prod(S) > 0``; contiguous or
            channels-last run in place, other layouts are copied.
        weight, bias: ``(C,)`` or ``None``.
        eps: added to the variance.
        running_mean, running_var: ``(C,)`` buffers updated in place as ``nn.BatchNorm`` does
            (unbiased variance), or ``None``.
        momentum: weight of the batch's value in the running update.
        group_size: samples per ghost group (consecutive, the last one ragged); ``None`` for
            one group.
        num_splits: force this many spatial splits (tests).

    Returns:
        ``(y, mean, rstd, scale)``: ``y`` in ``x``'s dtype and memory format; fp32 ``(G, C)``
        group mean, ``1 / sqrt(var + eps)`` and ``rstd * weight`` (kept for the backward).
    """
    n, c, m_size = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    group = _group_size(n, group_size)
    pivot, s1, s2 = moments_partials(x, num_splits=num_splits)
    shape = (triton.cdiv(n, group), c)
    mean, rstd, scale, shift = (
        torch.empty(shape, device=x.device, dtype=torch.float32) for _ in range(4)
    )
    update = running_mean is not None and running_var is not None
    _statistics_kernel[(triton.cdiv(c, _BLOCK_C),)](
        pivot,
        s1,
        s2,
        weight if weight is not None else _dummy(x),
        bias if bias is not None else _dummy(x),
        running_mean if update else _dummy(x),
        running_var if update else _dummy(x),
        mean,
        rstd,
        scale,
        shift,
        n,
        c,
        s1.shape[2],
        m_size,
        group,
        float(eps),
        float(momentum),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        UPDATE_RUNNING=update,
        BLOCK_N=_BLOCK_N,
        BLOCK_C=_BLOCK_C,
    )
    y = normalize_forward(x, scale, shift, group_size=group, num_splits=num_splits)
    return y, mean, rstd, scale


def batch_norm_backward(
    grad_output: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    scale: Tensor,
    *,
    group_size: int | None = None,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`batch_norm_forward` (statistics included).

    Args:
        grad_output: ``(N, C, *S)`` ``dy``, float32/float16/bfloat16.
        x: the forward input.
        mean, rstd, scale: fp32 ``(G, C)`` from :func:`batch_norm_forward`.
        group_size: as given to :func:`batch_norm_forward`.
        num_splits: force this many spatial splits (tests).

    Returns:
        ``(dx, dweight, dbias)``: ``dx`` in ``x``'s dtype and memory format; fp32 ``(C,)``
        ``sum(dy * xhat)`` and ``sum(dy)``.
    """
    n, c = x.shape[0], x.shape[1]
    group = _group_size(n, group_size)
    _, sdyx, sdy = normalize_backward(
        grad_output, x, mean, rstd, None, group_size=group, num_splits=num_splits, partials=True
    )
    coef, offset = torch.empty_like(mean), torch.empty_like(mean)
    dweight, dbias = (torch.empty(c, device=x.device, dtype=torch.float32) for _ in range(2))
    _statistics_backward_kernel[(triton.cdiv(c, _BLOCK_C),)](
        sdyx,
        sdy,
        scale,
        rstd,
        coef,
        offset,
        dweight,
        dbias,
        n,
        c,
        sdyx.shape[2],
        math.prod(x.shape[2:]),
        group,
        BLOCK_N=_BLOCK_N,
        BLOCK_C=_BLOCK_C,
    )
    dx, _, _ = normalize_backward(
        grad_output, x, None, None, scale, coef, mean, offset, group_size=group,
        num_splits=num_splits,
    )  # fmt: skip
    return dx, dweight, dbias
