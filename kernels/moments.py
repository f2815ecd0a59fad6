"""Stage 1: per-(sample, channel) moments of an ``(N, C, *S)`` input in one pass.

One program owns a ``(sample, channel block, spatial split)`` tile and accumulates, in fp32,
the shifted sums ``sum (x - p)`` and ``sum (x - p)^2`` around a pivot ``p = x[n, c, 0]``
(shifted-data variance: no catastrophic cancellation as long as ``|mean - p|`` is a few
standard deviations, which the sample's own first value is). Every split of an ``(n, c)``
row uses the same pivot, so the partials of all splits add exactly; they go to an
``(N, C, splits)`` buffer that the host sums in a fixed order (deterministic, no float atomics).

The result is the pair ``(m, w)`` of :func:`safenorm.functional.per_sample_moments`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tiling import as_3d, autotuned, tiling

__all__ = ["moments_forward", "moments_partials"]


@autotuned
@triton.jit
def _moments_forward_kernel(
    x_ptr,  # (N, C, M) input, any float dtype, strided
    pivot_ptr,  # (N, C) fp32 out: the pivot of each row
    s1_ptr,  # (N, C, SPLITS) fp32 out: partial sum of (x - pivot)
    s2_ptr,  # (N, C, SPLITS) fp32 out: partial sum of (x - pivot)^2
    C,
    M,
    SPLITS,
    M_PER_SPLIT,
    x_stride_n,
    x_stride_c,
    x_stride_m,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Shifted partial sums of one (sample, channel block, spatial split).

    Args:
        x_ptr: input viewed as ``(N, C, M)`` with the given strides.
        pivot_ptr: ``(N, C)`` fp32 output, ``x[n, c, 0]`` (written by split 0).
        s1_ptr, s2_ptr: ``(N, C, SPLITS)`` fp32 outputs.
        C, M: channels and spatial size.
        SPLITS, M_PER_SPLIT: number of spatial splits and the extent of each.
        x_stride_n, x_stride_c, x_stride_m: strides of the view (elements).
        BLOCK_C, BLOCK_M: tile of one loop step.
    """
    pid_ns = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = pid_ns // SPLITS
    split = pid_ns % SPLITS
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    row = x_ptr + n.to(tl.int64) * x_stride_n + c.to(tl.int64) * x_stride_c
    pivot = tl.load(row, mask=c_mask, other=0.0).to(tl.float32)
    acc1 = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    m_start = split * M_PER_SPLIT
    for m_off in range(0, M_PER_SPLIT, BLOCK_M):
        m = m_start + m_off + tl.arange(0, BLOCK_M)
        mask = c_mask[:, None] & (m < M)[None, :]
        x = tl.load(row[:, None] + m.to(tl.int64)[None, :] * x_stride_m, mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) - pivot[:, None], 0.0)
        acc1 += d
        acc2 += d * d
    out = (n * C + c) * SPLITS + split
    tl.store(s1_ptr + out, tl.sum(acc1, axis=1), mask=c_mask)
    tl.store(s2_ptr + out, tl.sum(acc2, axis=1), mask=c_mask)
    if split == 0:
        tl.store(pivot_ptr + n * C + c, pivot, mask=c_mask)


def moments_forward(x: Tensor, *, num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and biased spatial variance of ``x``.

    Args:
        x: ``(N, C, *S)`` float32/float16/bfloat16, contiguous or channels-last (others are
            copied to contiguous first), on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        num_splits: force this many spatial splits (tests); default from the grid heuristic.

    Returns:
        ``(m, w)``, each ``(N, C)`` float32, as :func:`safenorm.functional.per_sample_moments`.
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"moments_forward supports float32/float16/bfloat16, got {x.dtype}")
    n, c, m_size = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if n == 0 or c == 0 or m_size == 0:
        # Nothing to read: empty rows, or NaN moments of empty rows (as torch.var_mean).
        mean = x.new_full((n, c), float("nan") if m_size == 0 else 0.0, dtype=torch.float32)
        return mean, mean.clone()
    pivot, s1, s2 = moments_partials(x, num_splits=num_splits)
    # Combine the splits (fixed order: deterministic) and undo the shift.
    d = s1.sum(dim=2) / m_size
    w = (s2.sum(dim=2) / m_size - d * d).clamp_min_(0.0)
    return pivot + d, w


def moments_partials(x: Tensor, *, num_splits: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The stage-1 launch alone: pivots and the per-split shifted sums, not yet combined.

    Args:
        x: ``(N, C, *S)`` as in :func:`moments_forward`, with ``N, C, prod(S) > 0``.
        num_splits: force this many spatial splits (tests).

    Returns:
        ``(pivot, s1, s2)``: ``pivot`` ``(N, C)`` fp32, ``x[n, c]``'s first element; ``s1``,
        ``s2`` ``(N, C, splits)`` fp32, the sums of ``x - pivot`` and ``(x - pivot)^2`` over
        each split of the spatial axis.
    """
    n, c, m_size = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    x, strides = as_3d(x)
    t = tiling(n, c, m_size, strides, x.device, num_splits)
    pivot = torch.empty((n, c), device=x.device, dtype=torch.float32)
    s1 = torch.empty((n, c, t.splits), device=x.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    # One program: one sample, BLOCK_C channels, one spatial split of M_PER_SPLIT elements.
    grid = (n * t.splits, triton.cdiv(c, t.block_c))
    _moments_forward_kernel[grid](
        x,
        pivot,
        s1,
        s2,
        c,
        m_size,
        t.splits,
        t.m_per_split,
        *strides,
        BLOCK_C=t.block_c,
        BLOCK_M=t.block_m,
    )
    return pivot, s1, s2
