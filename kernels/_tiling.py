"""Layout and tiling helpers shared by the safenorm Triton launchers.

Every kernel sees its input as a 3-d strided view ``(N, C, M)`` with ``M = prod(S)``: the
spatial axes of an ``(N, C, *S)`` tensor collapse into one axis with a single stride whenever
they are laid out densely one inside the other, which holds for contiguous (NCHW / NCDHW) and
channels-last (NHWC / NDHWC) tensors alike. Other layouts are made contiguous first.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

__all__ = ["Tiling", "as_3d", "autotuned", "tiling"]

# Elements of x one program holds per loop step: 4096 fp32 values = 16 KiB of registers across
# 4 warps (32 per thread), enough loads in flight to saturate HBM without spilling.
_TILE_ELEMENTS = 4096
# Programs per SM worth launching: more splits of the spatial axis beyond that only add partials.
_PROGRAMS_PER_SM = 8
_FALLBACK_SMS = 132  # H200 / H100 SXM


def _spatial_stride(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """The single stride of the collapsed spatial axes, or ``None`` if they do not collapse."""
    dims = [
        (size, stride) for size, stride in zip(shape[2:], strides[2:], strict=True) if size != 1
    ]
    if not dims:
        return 1
    for (_, outer_stride), (inner_size, inner_stride) in itertools.pairwise(dims):
        if outer_stride != inner_size * inner_stride:
            return None
    return dims[-1][1]


def _dense(x: Tensor) -> bool:
    """Contiguous or channels-last: ``torch.empty_like`` then reproduces the strides."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def as_3d(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``x`` (made contiguous if needed) and its strides as an ``(N, C, M)`` view.

    Returns:
        ``(x, (stride_n, stride_c, stride_m))``. The returned tensor is ``x`` itself when its
        spatial axes collapse, else a contiguous copy; outputs allocated with
        ``torch.empty_like`` of it share these strides.
    """
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *S), got {tuple(x.shape)}")
    stride_m = _spatial_stride(tuple(x.shape), tuple(x.stride()))
    if stride_m is None or not _dense(x):
        x = x.contiguous()
        stride_m = 1
    return x, (x.stride(0), x.stride(1), stride_m)


@dataclass(frozen=True)
class Tiling:
    """Block sizes and spatial split of one launch.

    Attributes:
        block_c, block_m: tile of one loop step (powers of two).
        splits: programs per (sample, channel block) along ``M``.
        m_per_split: spatial extent of one split, a multiple of ``block_m``.
    """

    block_c: int
    block_m: int
    splits: int
    m_per_split: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _FALLBACK_SMS


def tiling(
    n: int,
    c: int,
    m: int,
    strides: tuple[int, int, int],
    device: torch.device,
    num_splits: int | None = None,
) -> Tiling:
    """Choose the tile and spatial split for an ``(N, C, M)`` view.

    The tile is long along the unit-stride axis (``M`` for NCHW, ``C`` for channels-last) so
    loads coalesce; the spatial axis is split until the grid fills the GPU (on CPU, under the
    interpreter, programs run one after another, so no split unless asked).

    Args:
        n, c, m: sizes of the view.
        strides: ``(stride_n, stride_c, stride_m)``.
        device: where the kernel runs.
        num_splits: force this many spatial splits (tests); clamped to ``[1, cdiv(M, block_m)]``.
    """
    _, stride_c, stride_m = strides
    channels_last = stride_c == 1 and stride_m != 1
    if channels_last or m == 1:
        block_c = min(triton.next_power_of_2(c), 256 if m > 1 else 1024)
        block_m = max(1, min(triton.next_power_of_2(m), _TILE_ELEMENTS // block_c))
    else:
        block_m = min(triton.next_power_of_2(m), 1024)
        block_c = max(1, min(triton.next_power_of_2(c), _TILE_ELEMENTS // block_m))
    m_blocks = triton.cdiv(m, block_m)
    if num_splits is None:
        if device.type == "cuda":
            base = n * triton.cdiv(c, block_c)
            target = _PROGRAMS_PER_SM * _sm_count(device)
            num_splits = max(1, math.ceil(target / max(base, 1)))
        else:
            num_splits = 1
    num_splits = max(1, min(num_splits, m_blocks))
    blocks_per_split = triton.cdiv(m_blocks, num_splits)
    splits = triton.cdiv(m_blocks, blocks_per_split)
    return Tiling(block_c, block_m, splits, blocks_per_split * block_m)


AUTOTUNE_WARPS = (2, 4, 8)
AUTOTUNE_KEY = ["C", "M", "BLOCK_C", "BLOCK_M"]


def autotuned(fn, *, warps: tuple[int, ...] | None = None, do_bench=None):
    """Time the streaming kernels with 2, 4 and 8 warps on first use of each tile and channel /
    spatial size (not the batch size, which Poisson sampling varies), and keep the fastest.

    The launchers fix the tile, so every candidate computes the same thing; the kernels write
    only their outputs, so the extra runs are harmless. Under the interpreter (tests on CPU,
    where no GPU timer exists) there is one candidate unless ``warps`` and a ``do_bench`` timer
    are given.
    """
    if warps is None:
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        warps = (4,) if interpreting else AUTOTUNE_WARPS
    configs = [triton.Config({}, num_warps=w) for w in warps]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY, do_bench=do_bench)(fn)
