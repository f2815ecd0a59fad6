"""Primitives of the safenorm layers, dispatched to fused Triton kernels or PyTorch.

The layer functions exist once, in :mod:`safenorm.functional`, as ``torch.nn.functional``'s
exist once above aten: each hands its work to the primitives here when
:func:`~safenorm.ops.backend.routes` says so (the kernels run on the input, or ``torch.compile``
is tracing) and runs the reference math otherwise. One file per concern:

* :mod:`~safenorm.ops.backend`: which implementation runs (:func:`set_backend`);
* :mod:`~safenorm.ops.primitives`: the kernel-backed primitives (stage 1 moments, the stage-2
  combine, normalize, their backward) and the fused pipeline eager code runs;
* :mod:`~safenorm.ops.eager`: the autograd Functions of that pipeline;
* :mod:`~safenorm.ops.registrations`: the ``torch.library`` custom ops, their fakes and
  autograd formulas (what ``torch.compile`` captures);
* :mod:`~safenorm.ops.check`: the finite-statistics check folded into the combine kernel.

Launches per training step on the kernels (forward + backward, the check included): three
Triton kernels each way for ghost and clipped BN (moments, combine, normalize; reduce, combine
backward, ``dx``); the DP release is the noise draw, moments and combine, then one normalize
launch and a one-pass backward. ``benchmarks/count_launches.py`` counts them.

Multi-process statistics (``all_reduce``) always run the reference math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from safenorm.ops import registrations as _registrations
from safenorm.ops.backend import (
    BACKEND_ENV,
    BACKENDS,
    get_backend,
    kernels_available,
    routes,
    set_backend,
    use_backend,
    use_kernels,
)
from safenorm.ops.check import checks_in_kernel, statistics_check, take_check
from safenorm.ops.eager import FrozenNormalize, FusedBatchNormTrain
from safenorm.ops.primitives import (
    RunningReference,
    Stage2,
    affine_grad_sums_impl,
    affine_grad_sums_reference,
    stat_dtype,
)
from safenorm.ops.primitives import release as _release

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "RunningReference",
    "Stage2",
    "batch_norm_train",
    "checks_in_kernel",
    "get_backend",
    "kernels_available",
    "normalize",
    "per_sample_affine_grads",
    "release",
    "routes",
    "set_backend",
    "statistics_check",
    "use_backend",
]


def _eager_kernels(x: Tensor) -> bool:
    return not torch.compiler.is_compiling() and use_kernels(x)


def batch_norm_train(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    stage2: Stage2,
) -> Tensor:
    """Training-mode batch norm with batch statistics combined as ``stage2`` says (ghost and
    clipped BN); the running buffers, if given, are updated in place."""
    if not _eager_kernels(input) or input.numel() == 0:
        return _registrations.compiled_batch_norm_train(
            input, running_mean, running_var, weight, bias, momentum, eps, stage2
        )
    tracked = running_mean is not None and running_var is not None
    check = take_check() if tracked else None
    return FusedBatchNormTrain.apply(
        input, weight, bias, running_mean, running_var, float(momentum), float(eps), stage2, check
    )


def release(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    stage2: Stage2,
    *,
    normalize_with: str,
    generator: torch.Generator | None,
    secure_mode: bool,
) -> tuple[Tensor, Tensor]:
    """The DP release of ``input`` (``stage2.denominator`` public, ``stage2.noise_multiplier``),
    the running update from it, and the detached statistics to normalize with."""
    options = {"normalize_with": normalize_with, "generator": generator, "secure_mode": secure_mode}
    if not _eager_kernels(input):
        return _registrations.compiled_release(
            input, running_mean, running_var, momentum, stage2, **options
        )
    tracked = running_mean is not None and running_var is not None
    check = take_check() if tracked else None
    batches = None if check is None else check.num_batches_tracked
    mean, var, finite = _release(
        input, running_mean, running_var, float(momentum), stage2, **options,
        num_batches_tracked=batches,
    )  # fmt: skip
    if check is not None:
        check.finite = finite[0]
    return mean, var


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Normalization with constant (frozen or released) statistics ``(C,)`` or ``(N, C)``."""
    if not _eager_kernels(x):
        return _registrations.compiled_normalize(x, mean, var, weight, bias, eps)
    return FrozenNormalize.apply(x, mean.detach(), var.detach(), weight, bias, float(eps))


def per_sample_affine_grads(
    input: Tensor, grad_output: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of an affine normalization's ``weight`` and ``bias``.

    For ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with statistics that do not depend
    on other samples (frozen / released statistics, as in :class:`~safenorm.DPBatchNorm2d`):
    ``grad_weight[n, c] = sum_s dy * xhat`` and ``grad_bias[n, c] = sum_s dy``, computed in one
    fused pass over ``(x, dy)`` by the Triton backend (what an Opacus grad sampler needs).

    Args:
        input: ``(N, C, *S)`` the layer's input.
        grad_output: ``(N, C, *S)`` gradient of the loss with respect to the layer's output.
        mean, var: ``(C,)`` or ``(N, C)`` statistics the forward normalized with (biased var).
        eps: added to the variance.

    Returns:
        ``(grad_weight, grad_bias)``, each ``(N, C)`` float32 (float64 for float64 input).
    """
    if input.shape != grad_output.shape:
        raise ValueError(
            f"input shape {tuple(input.shape)} != grad_output shape {tuple(grad_output.shape)}"
        )
    dtype = stat_dtype(input)
    mean = mean.detach().to(dtype)
    rstd = torch.rsqrt(var.detach().to(dtype) + eps)
    if not routes(input):
        return affine_grad_sums_reference(grad_output, input, mean, rstd)
    if torch.compiler.is_compiling():
        return _registrations.affine_grad_sums(grad_output, input, mean, rstd)
    return affine_grad_sums_impl(grad_output, input, mean, rstd)
