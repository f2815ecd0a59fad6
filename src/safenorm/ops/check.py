"""The finite-statistics check folded into the combine kernel.

:class:`~safenorm.SafeBatchNormBase` verifies after each training forward that its running
statistics are finite. On the reference path that costs a copy of the buffers before the forward
and a dozen small operations after it. On the kernels the combine computes the new running
statistics anyway: it writes them only if they are all finite, undoes the forward's increment of
``num_batches_tracked`` otherwise, and returns a flag. A layer opens a :func:`statistics_check`
around its forward; the one combine that updates its buffers takes it (:func:`take_check`) and
leaves the flag in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from safenorm.ops.backend import routes

__all__ = ["StatisticsCheck", "checks_in_kernel", "statistics_check", "take_check"]


@dataclass
class StatisticsCheck:
    """One forward's check: the layer's counter, and the kernel's flag once it ran.

    Attributes:
        num_batches_tracked: the layer's counter, decremented by the kernel on failure.
        finite: ``()``-shaped int32 on the layer's device, 1 if the new running statistics were
            finite (and written); ``None`` until a combine has taken the check.
    """

    num_batches_tracked: Tensor
    finite: Tensor | None = None


_active: ContextVar[StatisticsCheck | None] = ContextVar("safenorm_statistics_check", default=None)


def checks_in_kernel(x: Tensor) -> bool:
    """Whether a training forward on ``x`` updates its buffers in the combine kernel (eager code
    on the kernels), so that the check can be folded into it."""
    return not torch.compiler.is_compiling() and routes(x)


@contextlib.contextmanager
def statistics_check(num_batches_tracked: Tensor) -> Iterator[StatisticsCheck]:
    """Ask the combine of the forward run in this block to check the running update."""
    check = StatisticsCheck(num_batches_tracked)
    token = _active.set(check)
    try:
        yield check
    finally:
        _active.reset(token)


def take_check() -> StatisticsCheck | None:
    """The open check not yet taken (one combine per forward updates the buffers), or ``None``."""
    check = _active.get()
    return check if check is not None and check.finite is None else None
