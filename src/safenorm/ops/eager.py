"""Eager autograd Functions of the fused pipeline (:mod:`safenorm.ops.primitives`).

Eager code calls these rather than the custom ops of :mod:`safenorm.ops.registrations`: a
custom op's Python dispatch costs tens of microseconds per call, more than the kernels take on
a GPU. Each Function saves what its backward needs and calls the primitives' launchers only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from safenorm.ops import primitives as P
from safenorm.ops.backend import kernel_modules
from safenorm.ops.check import StatisticsCheck

__all__ = ["FrozenNormalize", "FusedBatchNormTrain"]


def _cast(grad: Tensor, like: Tensor | None, needed: bool) -> Tensor | None:
    return grad.to(like.dtype) if like is not None and needed else None


class FusedBatchNormTrain(torch.autograd.Function):
    """Ghost / clipped batch norm with gradients through the statistics: three launches each
    way (:func:`~safenorm.ops.primitives.train_forward`, ``train_backward``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        stage2: P.Stage2,
        check: StatisticsCheck | None,
    ) -> Tensor:
        batches = None if check is None else check.num_batches_tracked
        y, state = P.train_forward(
            x, weight, bias, running_mean, running_var, momentum, eps, stage2, batches
        )
        if check is not None:
            check.finite = state.combined.finite[0]
        ctx.save_for_backward(x, weight, bias)
        ctx.state, ctx.stage2 = state, stage2
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple:
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = P.train_backward(dy, x, ctx.state, ctx.stage2)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            _cast(dweight, weight, needs[1]),
            _cast(dbias, bias, needs[2]),
            *([None] * 6),
        )


class FrozenNormalize(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with constant statistics ``(C,)`` or
    ``(N, C)``: one launch forward, one pass backward (``dx`` and the affine sums)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.eps = eps
        return kernel_modules().normalize.normalize_stats_forward(x, mean, var, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple:
        x, mean, var, weight, bias = ctx.saved_tensors
        dx, totals = kernel_modules().normalize.normalize_stats_backward(
            dy, x, mean, var, weight, ctx.eps
        )
        needs = ctx.needs_input_grad
        dweight = _cast(totals[0], weight, needs[3])
        dbias = _cast(totals[1], bias, needs[4])
        return dx if needs[0] else None, None, None, dweight, dbias, None
