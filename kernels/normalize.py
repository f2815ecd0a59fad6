"""Stage 3: normalize + affine, and its backward with the per-sample affine gradients.

Forward: ``y = x * scale + shift`` with ``scale = rstd * weight`` and
``shift = bias - mean * scale`` folded on the host per channel ``(C,)`` or per sample and
channel ``(N, C)`` (ghost groups), fp32 math, output in ``x``'s dtype and memory format.

Backward, one kernel with two passes selected by constexpr flags:

* ``REDUCE``: per-(sample, channel) partial sums ``sum_s dy * xhat`` and ``sum_s dy`` into
  ``(N, C, splits)`` fp32 buffers summed on the host (deterministic). These are exactly the
  per-sample gradients of ``weight`` and ``bias`` (Opacus' grad sampler) and, summed over the
  samples, ``dweight`` and ``dbias``; with statistics that depend on the batch they also give
  the gradients of the statistics.
* ``WRITE_DX``: ``dx = dy * scale + coef * (x - center) + offset`` with per-(sample, channel)
  coefficients; the last two terms (``STATS_TERM``) carry the gradient through per-sample
  moments ``(m, w)`` (``dm / M`` and ``2 dw / M``) and are dropped for frozen statistics.

Frozen statistics (DP) run both in one pass (read ``x``, ``dy``; write ``dx``); statistics that
depend on the batch need the sums before ``dx``: two passes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tiling import as_3d, autotuned, tiling

__all__ = [
    "normalize_backward",
    "normalize_forward",
    "normalize_stats_backward",
    "normalize_stats_forward",
]


@autotuned
@triton.jit
def _normalize_forward_kernel(
    x_ptr,  # (N, C, M) input, strided
    y_ptr,  # (N, C, M) output, x's dtype, strided
    scale_ptr,  # (N or 1, C) fp32 (the mean with FROM_STATS)
    shift_ptr,  # (N or 1, C) fp32 (the variance with FROM_STATS)
    weight_ptr,  # (C,) any float (FROM_STATS and HAS_WEIGHT)
    bias_ptr,  # (C,) any float (FROM_STATS and HAS_BIAS)
    C,
    M,
    SPLITS,
    M_PER_SPLIT,
    x_stride_n,
    x_stride_c,
    x_stride_m,
    y_stride_n,
    y_stride_c,
    y_stride_m,
    stat_stride_n,
    stat_group,
    eps,
    FROM_STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``y = x * scale + shift`` on one (sample, channel block, spatial split).

    Args:
        x_ptr, y_ptr: input and output viewed as ``(N, C, M)``.
        scale_ptr, shift_ptr: fp32 coefficients of sample ``n`` in row ``n // stat_group``
            (consecutive ghost groups; 1 per sample), row stride ``stat_stride_n`` (0 for
            per-channel statistics), unit channel stride. With ``FROM_STATS`` they hold the
            mean and variance, and the coefficients are formed here with ``weight_ptr``,
            ``bias_ptr`` and ``eps`` (no host-side operations for frozen statistics).
        C, M, SPLITS, M_PER_SPLIT: sizes and spatial split.
        x_stride_*, y_stride_*: strides of the views (elements).
        BLOCK_C, BLOCK_M: tile of one loop step.
    """
    pid_ns = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = pid_ns // SPLITS
    split = pid_ns % SPLITS
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    stat = (n // stat_group) * stat_stride_n + c
    scale = tl.load(scale_ptr + stat, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + stat, mask=c_mask, other=0.0)
    if FROM_STATS:
        mean = scale
        scale = 1.0 / tl.sqrt(shift + eps)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_BIAS:
            shift += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    x_row = x_ptr + n.to(tl.int64) * x_stride_n + c.to(tl.int64) * x_stride_c
    y_row = y_ptr + n.to(tl.int64) * y_stride_n + c.to(tl.int64) * y_stride_c
    m_start = split * M_PER_SPLIT
    for m_off in range(0, M_PER_SPLIT, BLOCK_M):
        m = (m_start + m_off + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = c_mask[:, None] & (m < M)[None, :]
        x = tl.load(x_row[:, None] + m[None, :] * x_stride_m, mask=mask, other=0.0)
        y = x.to(tl.float32) * scale[:, None] + shift[:, None]
        tl.store(y_row[:, None] + m[None, :] * y_stride_m, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotuned
@triton.jit
def _normalize_backward_kernel(
    dy_ptr,  # (N, C, M) upstream gradient, strided
    x_ptr,  # (N, C, M) input, strided
    dx_ptr,  # (N, C, M) out (WRITE_DX), x's dtype and strides
    mean_ptr,  # (N or 1, C) fp32, centre of xhat (REDUCE)
    rstd_ptr,  # (N or 1, C) fp32, 1 / sqrt(var + eps) (REDUCE; the variance with FROM_STATS)
    scale_ptr,  # (N or 1, C) fp32, dx = dy * scale ... (WRITE_DX; unused with FROM_STATS)
    weight_ptr,  # (C,) any float: scale = rstd * weight (FROM_STATS and HAS_WEIGHT)
    coef_ptr,  # (rows, C) fp32, ... + coef * (x - center) + offset (STATS_TERM)
    center_ptr,  # (rows, C) fp32 (STATS_TERM)
    offset_ptr,  # (rows, C) fp32 (STATS_TERM)
    sdyx_ptr,  # (N, C, SPLITS) fp32 out: partial sum of dy * xhat (REDUCE)
    sdy_ptr,  # (N, C, SPLITS) fp32 out: partial sum of dy (REDUCE)
    C,
    M,
    SPLITS,
    M_PER_SPLIT,
    dy_stride_n,
    dy_stride_c,
    dy_stride_m,
    x_stride_n,
    x_stride_c,
    x_stride_m,
    dx_stride_n,
    dx_stride_c,
    dx_stride_m,
    stat_stride_n,
    stat_group,
    term_stride_n,
    term_group,
    eps,
    REDUCE: tl.constexpr,
    WRITE_DX: tl.constexpr,
    STATS_TERM: tl.constexpr,
    FROM_STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Per-sample affine-gradient sums and/or ``dx`` on one (sample, channel block, split).

    Args:
        dy_ptr, x_ptr, dx_ptr: ``(N, C, M)`` views with their own strides.
        mean_ptr, rstd_ptr, scale_ptr: fp32 ``(rows, C)``, sample ``n`` in row
            ``n // stat_group``, row stride ``stat_stride_n`` (0: one row for all).
        coef_ptr, center_ptr, offset_ptr: fp32, sample ``n`` in row ``n // term_group``, row
            stride ``term_stride_n`` (``STATS_TERM`` only).
        sdyx_ptr, sdy_ptr: fp32 ``(N, C, SPLITS)`` partial sums (``REDUCE`` only).
        C, M, SPLITS, M_PER_SPLIT: sizes and spatial split.
        REDUCE: accumulate the partial sums. WRITE_DX: write ``dx``. STATS_TERM: add the
            gradient through the per-sample moments to ``dx``. FROM_STATS: ``rstd_ptr`` holds
            the variance; ``rstd`` and ``scale`` are formed here (with ``weight_ptr``, ``eps``).
        BLOCK_C, BLOCK_M: tile of one loop step.
    """
    pid_ns = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = pid_ns // SPLITS
    split = pid_ns % SPLITS
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    stat = (n // stat_group) * stat_stride_n + c
    term = (n // term_group) * term_stride_n + c
    per_sample = n * C + c
    if FROM_STATS:
        rstd = 1.0 / tl.sqrt(tl.load(rstd_ptr + stat, mask=c_mask, other=1.0) + eps)
        scale = rstd
        if HAS_WEIGHT:
            scale = rstd * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if REDUCE:
        mean = tl.load(mean_ptr + stat, mask=c_mask, other=0.0)
        acc_dyx = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
        acc_dy = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    if WRITE_DX and not FROM_STATS:
        scale = tl.load(scale_ptr + stat, mask=c_mask, other=0.0)
        if STATS_TERM:
            coef = tl.load(coef_ptr + term, mask=c_mask, other=0.0)
            center = tl.load(center_ptr + term, mask=c_mask, other=0.0)
            offset = tl.load(offset_ptr + term, mask=c_mask, other=0.0)
    dy_row = dy_ptr + n.to(tl.int64) * dy_stride_n + c.to(tl.int64) * dy_stride_c
    x_row = x_ptr + n.to(tl.int64) * x_stride_n + c.to(tl.int64) * x_stride_c
    dx_row = dx_ptr + n.to(tl.int64) * dx_stride_n + c.to(tl.int64) * dx_stride_c
    m_start = split * M_PER_SPLIT
    for m_off in range(0, M_PER_SPLIT, BLOCK_M):
        m = (m_start + m_off + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = c_mask[:, None] & (m < M)[None, :]
        dy = tl.load(dy_row[:, None] + m[None, :] * dy_stride_m, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if REDUCE or STATS_TERM:
            x = tl.load(x_row[:, None] + m[None, :] * x_stride_m, mask=mask, other=0.0)
            x = x.to(tl.float32)
        if REDUCE:
            acc_dy += dy
            acc_dyx += tl.where(mask, dy * (x - mean[:, None]), 0.0)
        if WRITE_DX:
            dx = dy * scale[:, None]
            if STATS_TERM:
                dx += coef[:, None] * (x - center[:, None]) + offset[:, None]
            tl.store(
                dx_row[:, None] + m[None, :] * dx_stride_m,
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask,
            )
    if REDUCE:
        if not FROM_STATS:
            rstd = tl.load(rstd_ptr + stat, mask=c_mask, other=0.0)
        out = per_sample * SPLITS + split
        tl.store(sdyx_ptr + out, tl.sum(acc_dyx, axis=1) * rstd, mask=c_mask)
        tl.store(sdy_ptr + out, tl.sum(acc_dy, axis=1), mask=c_mask)


def _check_input(name: str, x: Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} supports float32/float16/bfloat16 input, got {x.dtype}")


def _stat(t: Tensor, rows: int, c: int) -> tuple[Tensor, int]:
    """fp32 contiguous per-channel ``(C,)`` or per-row ``(rows, C)`` values and their row stride."""
    t = t.detach().to(torch.float32).contiguous()
    if t.shape == (c,):
        return t, 0
    if t.shape == (rows, c):
        return t, c
    raise ValueError(f"expected statistics of shape ({c},) or ({rows}, {c}), got {tuple(t.shape)}")


def _rows(n: int, group_size: int) -> int:
    """Rows of per-row statistics: one per consecutive group of ``group_size`` samples."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return triton.cdiv(n, group_size)


def normalize_forward(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    *,
    group_size: int = 1,
    num_splits: int | None = None,
) -> Tensor:
    """``y = x * scale + shift`` per channel, per (sample, channel) or per (group, channel).

    Args:
        x: ``(N, C, *S)`` float32/float16/bfloat16, any memory format (contiguous and
            channels-last run in place, others are copied).
        scale, shift: ``(C,)``, or ``(ceil(N / group_size), C)`` (one row per consecutive
            group of ``group_size`` samples; ``(N, C)`` for the default 1), any float dtype
            (used in fp32).
        group_size: samples per row of ``scale`` and ``shift``.
        num_splits: force this many spatial splits (tests).

    Returns:
        ``y`` of ``x``'s shape, dtype and memory format.
    """
    return _forward(x, scale, shift, None, None, None, group_size, num_splits)


def normalize_stats_forward(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    group_size: int = 1,
    num_splits: int | None = None,
) -> Tensor:
    """``y = (x - mean) / sqrt(var + eps) * weight + bias``, the coefficients formed in the
    kernel (no host-side operations). ``mean``, ``var`` as ``scale``, ``shift`` of
    :func:`normalize_forward`; ``weight``, ``bias`` ``(C,)`` or ``None``."""
    return _forward(x, mean, var, weight, bias, float(eps), group_size, num_splits)


def _forward(x, a, b, weight, bias, eps, group_size, num_splits) -> Tensor:
    _check_input("normalize_forward", x)
    n, c, m_size = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    rows = _rows(n, group_size)
    a, stat_stride = _stat(a, rows, c)
    b, b_stride = _stat(b, rows, c)
    if b_stride != stat_stride:
        a, b = a.expand(rows, c).contiguous(), b.expand(rows, c).contiguous()
        stat_stride = c
    x, x_strides = as_3d(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    _, y_strides = as_3d(y)
    t = tiling(n, c, m_size, x_strides, x.device, num_splits)
    dummy = a
    # One program: one sample, BLOCK_C channels, one spatial split.
    grid = (n * t.splits, triton.cdiv(c, t.block_c))
    _normalize_forward_kernel[grid](
        x,
        y,
        a,
        b,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        c,
        m_size,
        t.splits,
        t.m_per_split,
        *x_strides,
        *y_strides,
        stat_stride,
        group_size,
        0.0 if eps is None else eps,
        FROM_STATS=eps is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_C=t.block_c,
        BLOCK_M=t.block_m,
    )
    return y


def normalize_backward(
    grad_output: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor | None,
    scale: Tensor | None,
    coef: Tensor | None = None,
    center: Tensor | None = None,
    offset: Tensor | None = None,
    *,
    group_size: int = 1,
    num_splits: int | None = None,
    partials: bool = False,
    _frozen: tuple[Tensor | None, float] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of ``normalize_forward``: per-sample affine sums and/or the input gradient.

    Computes, in one pass over ``(grad_output, x)``:

    * if ``mean`` and ``rstd`` are given: ``sdyx[n, c] = sum_s dy * (x - mean) * rstd`` and
      ``sdy[n, c] = sum_s dy``;
    * if ``scale`` is given: ``dx = dy * scale [+ coef * (x - center) + offset]``, the bracket
      when ``coef``, ``center`` and ``offset`` (each ``(C,)`` or ``(N, C)``) are given.

    Args:
        grad_output: ``(N, C, *S)`` ``dy``, float32/float16/bfloat16, any memory format.
        x: ``(N, C, *S)`` the forward input (same shape as ``grad_output``).
        mean, rstd: ``(C,)`` or ``(rows, C)`` statistics of the forward, or ``None`` (no
            sums); ``rows = ceil(N / group_size)``, ``N`` for the default 1.
        scale: ``(C,)`` or ``(rows, C)`` ``rstd * weight``, or ``None`` (no ``dx``).
        coef, center, offset: ``(C,)``, ``(rows, C)`` or ``(N, C)`` gradient through the
            statistics (all three of one shape), or ``None``.
        group_size: samples per row of the statistics.
        num_splits: force this many spatial splits (tests).
        partials: return the sums unreduced, ``(N, C, splits)``, for a kernel that sums them.

    Returns:
        ``(dx, sdyx, sdy)``: ``dx`` in ``x``'s dtype and memory format (``None`` without
        ``scale``); ``sdyx`` and ``sdy`` ``(N, C)`` fp32 (``None`` without ``mean``/``rstd``;
        ``(N, C, splits)`` with ``partials``).
    """
    _check_input("normalize_backward", x)
    _check_input("normalize_backward", grad_output)
    if grad_output.shape != x.shape:
        raise ValueError(
            f"grad_output shape {tuple(grad_output.shape)} != input shape {tuple(x.shape)}"
        )
    reduce = mean is not None and rstd is not None
    write_dx = scale is not None or _frozen is not None
    stats_term = coef is not None and center is not None and offset is not None
    if not (reduce or write_dx):
        raise ValueError("normalize_backward: nothing to compute (give mean/rstd and/or scale)")
    if stats_term and not write_dx:
        raise ValueError("normalize_backward: coef/center/offset need scale")
    n, c, m_size = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    stats = {"mean": mean, "rstd": rstd, "scale": scale}
    weight, eps = _frozen if _frozen is not None else (None, 0.0)
    rows = _rows(n, group_size)
    term_stride, term_group = 0, 1
    if stats_term:
        term_rows, term_group = (n, 1) if coef.shape == (n, c) else (rows, group_size)
        terms = [_stat(t, term_rows, c) for t in (coef, center, offset)]
        term_stride = max(stride for _, stride in terms)
        coef, center, offset = (
            t if s == term_stride else t.expand(term_rows, c).contiguous() for t, s in terms
        )
    stats = {k: _stat(v, rows, c) for k, v in stats.items() if v is not None}
    # Per-channel statistics read with row stride 0; if any is per-row, broadcast all.
    stat_stride = max(stride for _, stride in stats.values())
    stats = {
        k: v if s == stat_stride else v.expand(rows, c).contiguous() for k, (v, s) in stats.items()
    }
    mean, rstd, scale = stats.get("mean"), stats.get("rstd"), stats.get("scale")
    x, x_strides = as_3d(x)
    grad_output, dy_strides = as_3d(grad_output)
    dx = torch.empty_like(x) if write_dx else None
    sdyx = sdy = None
    t = tiling(n, c, m_size, x_strides, x.device, num_splits)
    if reduce:  # a launch writes every (sample, channel, split) slot exactly once
        alloc = torch.empty if x.numel() > 0 else torch.zeros
        # One buffer: the totals of both can then be taken by one reduction.
        sdyx, sdy = alloc((2, n, c, t.splits), device=x.device, dtype=torch.float32).unbind(0)
    if x.numel() > 0:
        dx_strides = as_3d(dx)[1] if write_dx else x_strides
        # One program: one sample, BLOCK_C channels, one spatial split.
        grid = (n * t.splits, triton.cdiv(c, t.block_c))
        _normalize_backward_kernel[grid](
            grad_output,
            x,
            dx if write_dx else dummy,
            mean if reduce else dummy,
            rstd if reduce else dummy,
            scale if scale is not None else dummy,
            weight if weight is not None else dummy,
            coef if stats_term else dummy,
            center if stats_term else dummy,
            offset if stats_term else dummy,
            sdyx if reduce else dummy,
            sdy if reduce else dummy,
            c,
            m_size,
            t.splits,
            t.m_per_split,
            *dy_strides,
            *x_strides,
            *dx_strides,
            stat_stride,
            group_size,
            term_stride,
            term_group,
            float(eps),
            REDUCE=reduce,
            WRITE_DX=write_dx,
            STATS_TERM=stats_term,
            FROM_STATS=_frozen is not None,
            HAS_WEIGHT=weight is not None,
            BLOCK_C=t.block_c,
            BLOCK_M=t.block_m,
        )
    if reduce and not partials:
        # Combine the splits in a fixed order (deterministic).
        sdyx, sdy = sdyx.sum(dim=2), sdy.sum(dim=2)
    return dx, sdyx, sdy


def normalize_stats_backward(
    grad_output: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    eps: float,
    *,
    group_size: int = 1,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`normalize_stats_forward` with frozen statistics, in one pass (``rstd``
    and the scale formed in the kernel) and one reduction.

    Returns:
        ``(dx, totals)``: ``dx = dy * weight / sqrt(var + eps)`` in ``x``'s dtype and memory
        format; ``totals`` ``(2, C)`` fp32, ``sum dy * xhat`` (``dweight``) and ``sum dy``
        (``dbias``).
    """
    dx, sdyx, _ = normalize_backward(
        grad_output, x, mean, var, None, group_size=group_size, num_splits=num_splits,
        partials=True, _frozen=(weight, float(eps)),
    )  # fmt: skip
    return dx, sdyx._base.sum((1, 3))  # sdyx and sdy are the two halves of one buffer
