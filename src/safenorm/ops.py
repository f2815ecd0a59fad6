"""Dispatch of the safenorm layer functions to fused Triton kernels.

The functions here have the signatures of their namesakes in :mod:`safenorm.functional`
(:func:`ghost_batch_norm`, :func:`clipped_batch_norm`, :func:`dp_batch_norm`,
:func:`dp_release`, :func:`frozen_normalize`) and compute the same thing. Under
``torch.compile`` they run as ``torch.library`` custom ops (``torch.ops.safenorm.*``); eager
code runs the same implementations through plain ``torch.autograd.Function`` twins, because a
custom op's Python dispatch costs more host time per call than the kernels take on a GPU.

* Ghost BN without clipping (one group or consecutive groups; ``nn.BatchNorm``'s math per group):
  ``safenorm::fused_batch_norm`` and its backward, five Triton launches per training step in
  all (``kernels/batch_norm.py``: the per-channel combine, affine coefficients and running
  update are one kernel each way).
* Clipped statistics, in three stages:

  * stage 1, per-(sample, channel) moments: ``safenorm::moments`` (``kernels/moments.py``);
  * stage 2, the per-channel combine (ghost groups, clipping, running update): PyTorch on
    ``(N, C)`` tensors, by the helpers of :mod:`safenorm.functional`;
  * stage 3, normalize + affine and its backward: ``safenorm::batch_norm_train`` (gradients
    through the statistics), with ``safenorm::affine_grad_sums`` and
    ``safenorm::normalize_backward`` in its backward.

* DP: stage 1 as above, the release by :mod:`safenorm.functional` (``safenorm::dp_statistics``
  when compiled: the noise comes from the global generator at run time), then
  ``safenorm::normalize`` (frozen statistics) whose backward ``safenorm::frozen_normalize_backward``
  writes ``dx`` and the per-sample affine gradients in one pass. ``safenorm::running_update``
  mutates the running buffers (``mutates_args``).

The ops of the three-stage paths have a PyTorch implementation too (CPU and any device; the
reference math); every op has a fake (meta) implementation and an autograd formula, so
``torch.compile(fullgraph=True)`` captures the layers whole.

Backend selection (:func:`set_backend`, or the environment variable ``SAFENORM_BACKEND``):

* ``"auto"`` (default): these paths on CUDA tensors when Triton is installed (float64 stays on
  PyTorch) and whenever ``torch.compile`` is tracing; otherwise (eager CPU) the functions of
  :mod:`safenorm.functional` directly.
* ``"torch"``: always :mod:`safenorm.functional` (the reference; nothing here is used).
* ``"triton"``: always these paths with the Triton kernels; on CPU only under
  ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests).

Multi-process statistics (``all_reduce``) always take the :mod:`safenorm.functional` path.

The backward of clipped statistics is two passes over ``(x, dy)``: the first gives the
per-sample sums ``sum_s dy * xhat`` and ``sum_s dy`` (the per-sample affine gradients), the
stage-2 backward runs by ``torch.func.vjp`` through the very functions of
:mod:`safenorm.functional` that made the statistics, and the second writes ``dx``. With frozen
statistics one pass does both.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from safenorm import functional as SF

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "clipped_batch_norm",
    "dp_batch_norm",
    "dp_release",
    "frozen_normalize",
    "get_backend",
    "ghost_batch_norm",
    "kernels_available",
    "per_sample_affine_grads",
    "set_backend",
    "use_backend",
]

BACKENDS = ("auto", "torch", "triton")
#: Environment variable read at import: the initial backend.
BACKEND_ENV = "SAFENORM_BACKEND"


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown safenorm backend {name!r}; expected one of {BACKENDS}")
    return name


_backend = _check_backend(os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"torch"`` or ``"triton"`` for every safenorm layer (process-wide)."""
    global _backend
    _backend = _check_backend(name)


def get_backend() -> str:
    """The backend selected by :func:`set_backend` (or ``SAFENORM_BACKEND``)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: select a backend for the duration of a block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.cache
def _kernel_modules() -> tuple[Any, Any, Any] | None:
    try:
        from safenorm.kernels import batch_norm, moments, normalize
    except ImportError:
        return None
    return moments, normalize, batch_norm


def kernels_available() -> bool:
    """Whether Triton and the safenorm kernels can be imported."""
    return _kernel_modules() is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel_dtype(x: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _use_kernels(x: Tensor) -> bool:
    """Inside an op implementation: run the Triton kernels on this tensor?"""
    if _backend == "torch" or not _kernel_dtype(x) or not kernels_available():
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _backend == "triton" and _interpreting()


def _dispatch(x: Tensor) -> bool:
    """In a layer function: go through the custom ops (else :mod:`safenorm.functional`)?"""
    if _backend == "torch":
        return False
    if _backend == "triton":
        if not kernels_available():
            raise RuntimeError(
                "safenorm backend 'triton' needs Triton (pip install safenorm[triton]); "
                "use set_backend('auto') or 'torch'"
            )
        if x.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"safenorm backend 'triton' runs on CUDA tensors, got a {x.device.type} tensor; "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
            )
        return True
    if torch.compiler.is_compiling():
        return True
    return x.device.type == "cuda" and _kernel_dtype(x) and kernels_available()


# ----------------------------------------------------------------------------------------------
# Small helpers (shapes, groups, views)
# ----------------------------------------------------------------------------------------------


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _view(t: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` or ``(N, C)`` values as a view broadcastable against ``x`` of ``(N, C, *S)``."""
    tail = [1] * (x.dim() - 2)
    return t.reshape(*t.shape, *tail) if t.dim() == 2 else t.reshape(1, -1, *tail)


def _spatial_sum(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.sum(dim=tuple(range(2, t.dim())))


def _group_count(n: int, ghost_batch_size: int) -> int:
    g = n if ghost_batch_size <= 0 or ghost_batch_size >= n else ghost_batch_size
    return max(1, -(-n // max(g, 1)))


def _consecutive_groups(n: int, ghost_batch_size: int, device: torch.device) -> SF.Groups:
    """:func:`safenorm.functional.consecutive_groups` without ``bincount`` (traceable)."""
    g = max(1, n if ghost_batch_size <= 0 or ghost_batch_size >= n else ghost_batch_size)
    count = _group_count(n, ghost_batch_size)
    size = torch.clamp(n - torch.arange(count, device=device) * g, max=g).to(torch.float32)
    return SF.Groups(index=torch.arange(n, device=device) // g, size=size)


_cached_groups = functools.lru_cache(maxsize=64)(_consecutive_groups)


def _eager_groups(n: int, ghost_batch_size: int, device: torch.device) -> SF.Groups:
    """:func:`_consecutive_groups` for eager code, which reuses the (read-only) tensors of a
    batch size: building them is five small kernel launches, three times per step otherwise.
    Not under inference mode, whose tensors autograd could not save later."""
    if torch.is_inference_mode_enabled() or not isinstance(n, int):
        return _consecutive_groups(n, ghost_batch_size, device)
    return _cached_groups(n, ghost_batch_size, torch.device(device))


def _group_statistics(
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


def _affine_coefficients(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(rstd, scale, shift)`` with ``y = x * scale + shift`` (as :func:`SF.normalize`)."""
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return rstd, scale, shift


def _normalize_impl(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if _use_kernels(x):
        _, scale, shift = _affine_coefficients(mean.float(), var.float(), weight, bias, eps)
        return _kernel_modules()[1].normalize_forward(x, scale, shift)
    return SF.normalize(x, mean, var, weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Implementations: plain functions run by the custom ops (compiled code) and by the eager
# autograd Functions below. Eager code calls them directly because a custom op's Python dispatch
# costs tens of microseconds per call, which on a GPU is more than the kernels take.
# ----------------------------------------------------------------------------------------------


def _moments_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    if _use_kernels(x):
        return _kernel_modules()[0].moments_forward(x)
    m, w = SF.per_sample_moments(x)
    if x.dim() == 2 or m.numel() == 0:  # outputs must not alias x or each other
        m, w = m.clone(), w.clone()
    return m, w


def _affine_grad_sums_reference(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    dtype = _stat_dtype(x)
    dy = grad_output.to(dtype)
    xhat = (x.to(dtype) - _view(mean.to(dtype), x)) * _view(rstd.to(dtype), x)
    sdy = _spatial_sum(dy)
    return _spatial_sum(dy * xhat), (sdy.clone() if sdy is grad_output else sdy)


def _affine_grad_sums_impl(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    if _use_kernels(x) and _kernel_dtype(grad_output):
        _, sdyx, sdy = _kernel_modules()[1].normalize_backward(grad_output, x, mean, rstd, None)
        return sdyx, sdy
    return _affine_grad_sums_reference(grad_output, x, mean, rstd)


def _normalize_backward_impl(
    grad_output: Tensor,
    x: Tensor,
    scale: Tensor,
    coef: Tensor | None,
    center: Tensor | None,
    offset: Tensor | None,
) -> Tensor:
    if _use_kernels(x) and _kernel_dtype(grad_output):
        dx, _, _ = _kernel_modules()[1].normalize_backward(
            grad_output, x, None, None, scale, coef, center, offset
        )
        return dx
    dtype = _stat_dtype(x)
    dx = grad_output.to(dtype) * _view(scale.to(dtype), x)
    if coef is not None and center is not None and offset is not None:
        dx = dx + _view(coef.to(dtype), x) * (x.to(dtype) - _view(center.to(dtype), x))
        dx = dx + _view(offset.to(dtype), x)
    return dx.to(x.dtype)


def _frozen_normalize_backward_impl(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    if _use_kernels(x) and _kernel_dtype(grad_output):
        return _kernel_modules()[1].normalize_backward(grad_output, x, mean, rstd, scale)
    dx = _normalize_backward_impl(grad_output, x, scale, None, None, None)
    sdyx, sdy = _affine_grad_sums_impl(grad_output, x, mean, rstd)
    return dx, sdyx, sdy


def _batch_norm_train_impl(
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
    make_groups: Callable[[int, int, torch.device], SF.Groups] = _consecutive_groups,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    m, w = _moments_impl(x)
    groups = make_groups(x.shape[0], ghost_batch_size, x.device)
    mean, var = _group_statistics(m, w, groups, clipped, clip_norm, var_clip_norm, center, scale)
    mean_x, var_x = groups.normalization_statistics(mean, var)
    y = _normalize_impl(x, mean_x, var_x, weight, bias, eps)
    return y, mean, var, m, w


def _normalize_op_impl(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if _use_kernels(x):
        return _normalize_impl(x, mean, var, weight, bias, eps)
    return SF.frozen_normalize(x, mean, var, weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Ops: stage 1
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("safenorm::moments", mutates_args=())
def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample moments ``(m, w)`` of :func:`safenorm.functional.per_sample_moments`."""
    return _moments_impl(x)


@_moments.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    shape = (x.shape[0], x.shape[1])
    return x.new_empty(shape, dtype=_stat_dtype(x)), x.new_empty(shape, dtype=_stat_dtype(x))


# ----------------------------------------------------------------------------------------------
# Ops: backward building blocks (also usable on their own)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("safenorm::affine_grad_sums", mutates_args=())
def _affine_grad_sums(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """``(sum_s dy * (x - mean) * rstd, sum_s dy)`` per (sample, channel), each ``(N, C)``."""
    return _affine_grad_sums_impl(grad_output, x, mean, rstd)


@_affine_grad_sums.register_fake
def _(grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    shape = (x.shape[0], x.shape[1])
    return x.new_empty(shape, dtype=_stat_dtype(x)), x.new_empty(shape, dtype=_stat_dtype(x))


@torch.library.custom_op("safenorm::normalize_backward", mutates_args=())
def _normalize_backward(
    grad_output: Tensor,
    x: Tensor,
    scale: Tensor,
    coef: Tensor | None,
    center: Tensor | None,
    offset: Tensor | None,
) -> Tensor:
    """``dx = dy * scale [+ coef * (x - center) + offset]`` (per-channel or per-sample values)."""
    return _normalize_backward_impl(grad_output, x, scale, coef, center, offset)


@_normalize_backward.register_fake
def _(grad_output, x, scale, coef, center, offset):
    return torch.empty_like(x)


@torch.library.custom_op("safenorm::frozen_normalize_backward", mutates_args=())
def _frozen_normalize_backward(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass: ``dx = dy * scale`` and the per-sample affine sums of :func:`_affine_grad_sums`."""
    return _frozen_normalize_backward_impl(grad_output, x, mean, rstd, scale)


@_frozen_normalize_backward.register_fake
def _(grad_output, x, mean, rstd, scale):
    shape = (x.shape[0], x.shape[1])
    stat = x.new_empty(shape, dtype=_stat_dtype(x))
    return torch.empty_like(x), stat, torch.empty_like(stat)


@dataclass(frozen=True)
class _BackwardOps:
    """The backward's building blocks: the custom ops (compiled code) or their plain impls."""

    affine_grad_sums: Callable[..., tuple[Tensor, Tensor]]
    normalize_backward: Callable[..., Tensor]
    frozen_normalize_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    groups: Callable[[int, int, torch.device], SF.Groups]
    vjp: Callable[..., tuple[Tensor, Tensor]]


def _vjp_traceable(fn: Callable, inputs: tuple[Tensor, Tensor], cotangents: tuple) -> tuple:
    """Vector-Jacobian product that compiled backward graphs can trace."""
    _, vjp = torch.func.vjp(fn, *inputs)
    return vjp(cotangents)


def _vjp_eager(fn: Callable, inputs: tuple[Tensor, Tensor], cotangents: tuple) -> tuple:
    """Vector-Jacobian product by plain autograd: about a third less host time than
    ``torch.func.vjp`` in eager code."""
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in inputs)
        return torch.autograd.grad(fn(*leaves), leaves, cotangents, materialize_grads=True)


_OP_BLOCKS = _BackwardOps(
    _affine_grad_sums,
    _normalize_backward,
    _frozen_normalize_backward,
    _consecutive_groups,
    _vjp_traceable,
)
_EAGER_BLOCKS = _BackwardOps(
    _affine_grad_sums_impl,
    _normalize_backward_impl,
    _frozen_normalize_backward_impl,
    _eager_groups,
    _vjp_eager,
)


# ----------------------------------------------------------------------------------------------
# Ops: normalization with batch statistics (ghost, clipped)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("safenorm::batch_norm_train", mutates_args=())
def _batch_norm_train(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode ghost / clipped BN: ``(y, mean (G, C), var (G, C), m (N, C), w (N, C))``.

    ``ghost_batch_size <= 0`` means one group. ``center``/``scale`` are the clipping reference
    (``clipped`` only). ``mean``/``var`` (for the running update) and ``m``/``w`` (kept for the
    backward) are not differentiable outputs.
    """
    return _batch_norm_train_impl(
        x,
        weight,
        bias,
        center,
        scale,
        eps,
        ghost_batch_size,
        clipped,
        clip_norm,
        var_clip_norm,
        detach_statistics,
    )


@_batch_norm_train.register_fake
def _(x, weight, bias, center, scale, eps, ghost_batch_size, clipped, clip_norm, var_clip_norm, d):
    count = _group_count(x.shape[0], ghost_batch_size)
    dtype = _stat_dtype(x)
    group = x.new_empty((count, x.shape[1]), dtype=dtype)
    sample = x.new_empty((x.shape[0], x.shape[1]), dtype=dtype)
    return torch.empty_like(x), group, torch.empty_like(group), sample, torch.empty_like(sample)


def _batch_norm_train_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _, center, scale, eps, ghost, clipped, clip_norm, var_clip_norm, detach = inputs
    _, mean, var, m, w = output
    ctx.save_for_backward(x, weight, center, scale, mean, var, m, w)
    ctx.args = (eps, ghost, clipped, clip_norm, var_clip_norm, detach)
    ctx.bias_dtype = None if inputs[2] is None else inputs[2].dtype
    ctx.mark_non_differentiable(mean, var, m, w)


def _batch_statistics_backward(
    m: Tensor, groups: SF.Groups, mean: Tensor, d_mean: Tensor, d_var: Tensor
) -> tuple[Tensor, Tensor]:
    """Vector-Jacobian product of :func:`SF.batch_statistics` broadcast back to the samples.

    With ``mean_g = sum_g m_n / n_g`` and ``var_g = sum_g (w_n + (m_n - mean_g)^2) / n_g``:
    ``dm_n = D_mean_g / n_g + 2 (m_n - mean_g) D_var_g / n_g`` and ``dw_n = D_var_g / n_g``,
    ``D_*_g`` the group sums of the per-sample gradients (the ``mean_g`` term of ``d var_g / d
    m_n`` vanishes since the deviations sum to zero). Closed form: no ``torch.func`` overhead.
    """
    size = groups.size.to(m.dtype).unsqueeze(1)
    g_mean = groups.per_sample(groups.sum(d_mean) / size)
    g_var = groups.per_sample(groups.sum(d_var) / size)
    return g_mean + 2.0 * g_var * (m - groups.per_sample(mean)), g_var


def _batch_norm_train_grads(blocks: _BackwardOps, ctx: Any, dy: Tensor) -> tuple:
    x, weight, center, scale, mean, var, m, w = ctx.saved_tensors
    eps, ghost, clipped, clip_norm, var_clip_norm, detach = ctx.args
    groups = blocks.groups(x.shape[0], ghost, x.device)
    mean_x, var_x = groups.normalization_statistics(mean, var)
    rstd, gain, _ = _affine_coefficients(mean_x, var_x, weight, None, eps)
    dx = dweight = dbias = None
    if detach:
        dx, sdyx, sdy = blocks.frozen_normalize_backward(dy, x, mean_x, rstd, gain)
    else:
        sdyx, sdy = blocks.affine_grad_sums(dy, x, mean_x, rstd)
        d_mean = (-(gain * sdy)).to(m.dtype)
        d_var = (-0.5 * (gain * rstd) * sdyx).to(m.dtype)
        if clipped:  # stage-2 backward through the same functions that made the statistics

            def statistics(m_: Tensor, w_: Tensor) -> tuple[Tensor, Tensor]:
                mean_, var_ = _group_statistics(
                    m_, w_, groups, clipped, clip_norm, var_clip_norm, center, scale
                )
                return groups.per_sample(mean_), groups.per_sample(var_)

            dm, dw = blocks.vjp(statistics, (m, w), (d_mean, d_var))
        else:
            dm, dw = _batch_statistics_backward(m, groups, mean, d_mean, d_var)
        spatial = math.prod(x.shape[2:])
        dx = blocks.normalize_backward(dy, x, gain, 2.0 * dw / spatial, m, dm / spatial)
    if weight is not None:
        dweight = sdyx.sum(0).to(weight.dtype)
    if ctx.bias_dtype is not None:
        dbias = sdy.sum(0).to(ctx.bias_dtype)
    return dx, dweight, dbias, None, None, None, None, None, None, None, None


def _batch_norm_train_backward(ctx: Any, dy: Tensor, *unused: Tensor) -> tuple:
    return _batch_norm_train_grads(_OP_BLOCKS, ctx, dy)


torch.library.register_autograd(
    "safenorm::batch_norm_train",
    _batch_norm_train_backward,
    setup_context=_batch_norm_train_setup,
)


class _BatchNormTrain(torch.autograd.Function):
    """Eager twin of ``safenorm::batch_norm_train``: the same impl and backward, no dispatch."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        output = _batch_norm_train_impl(*inputs, make_groups=_eager_groups)
        _batch_norm_train_setup(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics outputs
        return output

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *unused: Tensor) -> tuple:
        return _batch_norm_train_grads(_EAGER_BLOCKS, ctx, dy)


def _fused_kernels() -> Any:
    modules = _kernel_modules()
    if modules is None:
        raise RuntimeError(
            "safenorm's fused batch norm needs Triton (pip install safenorm[triton])"
        )
    return modules[2]


@torch.library.custom_op("safenorm::fused_batch_norm", mutates_args=())
def _fused_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    group_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Ghost BN without clipping by :mod:`safenorm.kernels.batch_norm` (Triton only).

    Returns ``(y, mean, rstd, scale, new_running_mean, new_running_var)``: ``mean``, ``rstd``,
    ``scale`` ``(G, C)`` fp32; the updated running statistics as new tensors (empty without
    running buffers), since an op with a gradient formula may not mutate its inputs. None but
    ``y`` is differentiable; ``group_size <= 0`` means one group.
    """
    new_mean, new_var = (
        (running_mean.clone(), running_var.clone())
        if running_mean is not None and running_var is not None
        else (x.new_empty(0), x.new_empty(0))
    )
    update = new_mean.numel() > 0
    outputs = _fused_kernels().batch_norm_forward(
        x,
        weight,
        bias,
        eps,
        new_mean if update else None,
        new_var if update else None,
        momentum,
        group_size=group_size,
    )
    return (*outputs, new_mean, new_var)


@_fused_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, group_size):
    stat = x.new_empty((_group_count(x.shape[0], group_size), x.shape[1]), dtype=torch.float32)
    running = (
        (torch.empty_like(running_mean), torch.empty_like(running_var))
        if running_mean is not None and running_var is not None
        else (x.new_empty(0), x.new_empty(0))
    )
    return torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat), *running


def _fused_backward_impl(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, group_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    return _fused_kernels().batch_norm_backward(dy, x, mean, rstd, scale, group_size=group_size)


@torch.library.custom_op("safenorm::fused_batch_norm_backward", mutates_args=())
def _fused_batch_norm_backward(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, group_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`_fused_batch_norm` (Triton only)."""
    return _fused_backward_impl(grad_output, x, mean, rstd, scale, group_size)


@_fused_batch_norm_backward.register_fake
def _(grad_output, x, mean, rstd, scale, group_size):
    channel = x.new_empty((x.shape[1],), dtype=torch.float32)
    return torch.empty_like(x), channel, torch.empty_like(channel)


def _fused_batch_norm_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, *_, group_size = inputs
    _, mean, rstd, scale, *running = output
    ctx.save_for_backward(x, mean, rstd, scale)
    ctx.group_size = group_size
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd, scale, *running)


def _fused_batch_norm_grads(backward: Callable[..., tuple], ctx: Any, dy: Tensor) -> tuple:
    x, mean, rstd, scale = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, mean, rstd, scale, ctx.group_size)
    dweight = None if ctx.weight_dtype is None else dweight.to(ctx.weight_dtype)
    dbias = None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)
    return dx, dweight, dbias, None, None, None, None, None


def _fused_batch_norm_backward_formula(ctx: Any, dy: Tensor, *unused: Tensor) -> tuple:
    return _fused_batch_norm_grads(_fused_batch_norm_backward, ctx, dy)


torch.library.register_autograd(
    "safenorm::fused_batch_norm",
    _fused_batch_norm_backward_formula,
    setup_context=_fused_batch_norm_setup,
)


class _FusedBatchNorm(torch.autograd.Function):
    """Eager twin of ``safenorm::fused_batch_norm``: ghost BN without clipping (``nn.BatchNorm``'s
    math per group) in five launches. :mod:`safenorm.kernels.batch_norm` folds the combine of the
    statistics, the affine coefficients and the running update into one kernel each way."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, weight, bias, running_mean, running_var, momentum, eps, group_size = inputs
        output = _fused_kernels().batch_norm_forward(
            x, weight, bias, eps, running_mean, running_var, momentum, group_size=group_size
        )
        _fused_batch_norm_setup(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics outputs
        return output

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *unused: Tensor) -> tuple:
        return _fused_batch_norm_grads(_fused_backward_impl, ctx, dy)


def _fuses_batch_norm(x: Tensor, clipped: bool, detach: bool) -> bool:
    """Whether the layer can run the fused kernels (plain group statistics, Triton on ``x``)."""
    return not clipped and not detach and x.numel() > 0 and _use_kernels(x)


# ----------------------------------------------------------------------------------------------
# Ops: normalization with frozen statistics (DP), running update
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("safenorm::normalize", mutates_args=())
def _normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """:func:`safenorm.functional.frozen_normalize`: no gradient into ``mean``/``var``."""
    return _normalize_op_impl(x, mean, var, weight, bias, eps)


@_normalize.register_fake
def _(x, mean, var, weight, bias, eps):
    return torch.empty_like(x)


def _normalize_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _normalize_grads(blocks: _BackwardOps, ctx: Any, dy: Tensor) -> tuple:
    x, mean, var, weight = ctx.saved_tensors
    rstd, gain, _ = _affine_coefficients(
        mean.to(_stat_dtype(x)), var.to(_stat_dtype(x)), weight, None, ctx.eps
    )
    dweight = dbias = None
    if weight is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
        dx, sdyx, sdy = blocks.frozen_normalize_backward(dy, x, mean, rstd, gain)
        dweight = sdyx.sum(0).to(weight.dtype)
        dbias = sdy.sum(0).to(weight.dtype) if ctx.has_bias else None
    else:
        dx = blocks.normalize_backward(dy, x, gain, None, None, None)
        if ctx.has_bias:
            dbias = _spatial_sum(dy.to(_stat_dtype(x))).sum(0)
    return dx, None, None, dweight, dbias, None


def _normalize_backward_formula(ctx: Any, dy: Tensor) -> tuple:
    return _normalize_grads(_OP_BLOCKS, ctx, dy)


torch.library.register_autograd(
    "safenorm::normalize", _normalize_backward_formula, setup_context=_normalize_setup
)


class _Normalize(torch.autograd.Function):
    """Eager twin of ``safenorm::normalize``: the same impl and backward, no dispatch."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        output = _normalize_op_impl(*inputs)
        _normalize_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:
        return _normalize_grads(_EAGER_BLOCKS, ctx, dy)


@torch.library.custom_op("safenorm::running_update", mutates_args=("running_mean", "running_var"))
def _running_update(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    group_size: Tensor,
    spatial: int,
    momentum: float,
) -> None:
    """:func:`safenorm.functional.pooled_running_update` as an op (opaque to the compiler)."""
    SF.pooled_running_update(running_mean, running_var, mean, var, group_size, spatial, momentum)


@_running_update.register_fake
def _(running_mean, running_var, mean, var, group_size, spatial, momentum):
    return None


def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    groups: SF.Groups,
    single_group_size: float,
    spatial: int,
    momentum: float,
) -> None:
    """The running update: the op when compiling, else the function itself, which for a single
    group takes its size (``single_group_size``, known on the host) as a number."""
    if torch.compiler.is_compiling():
        _running_update(running_mean, running_var, mean, var, groups.size, spatial, momentum)
        return
    size = single_group_size if groups.count == 1 else groups.size
    SF.pooled_running_update(running_mean, running_var, mean, var, size, spatial, momentum)


# ----------------------------------------------------------------------------------------------
# Layer functions (same signatures as safenorm.functional)
# ----------------------------------------------------------------------------------------------


def _batch_norm_train_layer(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    ghost_batch_size: int | None,
    clipped: bool,
    clip_norm: float,
    var_clip_norm: float,
    reference: SF.ClipReference | None,
    detach_statistics: bool,
) -> Tensor:
    reference = reference or SF.ClipReference()
    center = None if reference.center is None else reference.center.detach()
    scale = None if reference.scale is None else reference.scale.detach()
    ghost = 0 if ghost_batch_size is None else int(ghost_batch_size)
    if _fuses_batch_norm(input, clipped, detach_statistics):
        update = running_mean is not None and running_var is not None
        args = (
            input,
            weight,
            bias,
            running_mean if update else None,
            running_var if update else None,
            float(momentum),
            float(eps),
            ghost,
        )
        if not torch.compiler.is_compiling():
            return _FusedBatchNorm.apply(*args)[0]  # updates the buffers in place
        y, _, _, _, new_mean, new_var = _fused_batch_norm(*args)
        if update:
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return y
    compiling = torch.compiler.is_compiling()
    train = _batch_norm_train if compiling else _BatchNormTrain.apply
    y, mean, var, _, _ = train(
        input,
        weight,
        bias,
        center,
        scale,
        float(eps),
        ghost,
        clipped,
        float(clip_norm),
        float(var_clip_norm),
        detach_statistics,
    )
    if running_mean is not None and running_var is not None:
        groups = (_consecutive_groups if compiling else _eager_groups)(
            input.shape[0], ghost, input.device
        )
        _update_running(
            running_mean,
            running_var,
            mean,
            var,
            groups,
            float(input.shape[0]),
            math.prod(input.shape[2:]),
            float(momentum),
        )
    return y


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
    """:func:`safenorm.functional.ghost_batch_norm`, dispatched (see the module docstring).

    With the kernels, one group (``ghost_batch_size`` ``None`` or ``>= N``) is standard BN by
    the fused kernels rather than ``F.batch_norm``.
    """
    if not training or not _dispatch(input):
        return SF.ghost_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            ghost_batch_size,
        )
    return _batch_norm_train_layer(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        momentum,
        eps,
        ghost_batch_size,
        False,
        math.inf,
        math.inf,
        None,
        False,
    )


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
    reference: SF.ClipReference | None = None,
    detach_statistics: bool = False,
    all_reduce: SF.AllReduce | None = None,
) -> Tensor:
    """:func:`safenorm.functional.clipped_batch_norm`, dispatched (see the module docstring)."""
    if not training or all_reduce is not None or not _dispatch(input):
        return SF.clipped_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            clip_norm=clip_norm,
            var_clip_norm=var_clip_norm,
            ghost_batch_size=ghost_batch_size,
            reference=reference,
            detach_statistics=detach_statistics,
            all_reduce=all_reduce,
        )
    return _batch_norm_train_layer(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        momentum,
        eps,
        ghost_batch_size,
        True,
        clip_norm,
        var_clip_norm,
        reference,
        detach_statistics,
    )


@torch.library.custom_op("safenorm::dp_statistics", mutates_args=())
def _dp_statistics(
    m: Tensor,
    w: Tensor,
    center: Tensor | None,
    scale: Tensor | None,
    clip_norm: float,
    var_clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    ghost_batch_size: int,
    var_floor: float,
    secure_mode: bool,
    add_noise: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The DP release from moments, noise from torch's global generator (or the OS CSPRNG).

    Returns ``(mean (G, C), var (G, C), group index (N,), group denominators (G,))``; random
    (noise, and the group draw with ghost groups), hence an op: compiled code runs it as is.
    """
    stats = SF.dp_statistics_from_moments(
        m,
        w,
        clip_norm=clip_norm,
        var_clip_norm=var_clip_norm,
        noise_multiplier=noise_multiplier,
        denominator=denominator,
        ghost_batch_size=ghost_batch_size or None,
        reference=SF.ClipReference(center=center, scale=scale),
        var_floor=var_floor,
        secure_mode=secure_mode,
        add_noise=add_noise,
    )
    return stats.mean, stats.var, stats.groups.index.clone(), stats.groups.size.clone()


@_dp_statistics.register_fake
def _(m, w, center, scale, clip_norm, var_clip_norm, sigma, denominator, ghost, floor, s, a):
    count = 1 if ghost <= 0 else max(1, round(denominator / ghost))
    stat = m.new_empty((count, m.shape[1]))
    index = m.new_empty((m.shape[0],), dtype=torch.long)
    return stat, torch.empty_like(stat), index, m.new_empty((count,), dtype=torch.float32)


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
    reference: SF.ClipReference | None = None,
    var_floor: float = 0.0,
    normalize_with: str = "batch",
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    all_reduce: SF.AllReduce | None = None,
    add_noise: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`safenorm.functional.dp_release` with the moments from the stage-1 kernel.

    The clipping, noise (host-side, ``2 C`` numbers per group) and group draw are those of
    :mod:`safenorm.functional`, with the same generator calls in the same order.
    """
    dispatch = all_reduce is None and _dispatch(input)
    compiling = torch.compiler.is_compiling()
    if not dispatch or not compiling or generator is not None:
        moments = None
        if dispatch:
            with torch.no_grad():
                moments = (_moments if compiling else _moments_impl)(input.detach())
        return SF.dp_release(
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
            moments=moments,
        )
    # Compiled, global generator: the release is one op (opaque to torch.compile), so compiled
    # code draws the noise at run time as eager code does.
    reference = reference or SF.ClipReference()
    with torch.no_grad():
        mean, var, index, size = _dp_statistics(
            *_moments(input.detach()),
            reference.center,
            reference.scale,
            float(clip_norm),
            float(var_clip_norm),
            float(noise_multiplier),
            float(denominator),
            0 if ghost_batch_size is None else int(ghost_batch_size),
            float(var_floor),
            secure_mode,
            add_noise,
        )
    stats = SF.PrivateStatistics(mean, var, SF.Groups(index=index, size=size))
    if running_mean is not None and running_var is not None:
        _running_update(
            running_mean,
            running_var,
            mean,
            var,
            size,
            math.prod(input.shape[2:]),
            float(momentum),
        )
    return SF.statistics_to_normalize_with(stats, running_mean, running_var, normalize_with)


def frozen_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """:func:`safenorm.functional.frozen_normalize`, dispatched (see the module docstring)."""
    if not _dispatch(x):
        return SF.frozen_normalize(x, mean, var, weight, bias, eps)
    normalize = _normalize if torch.compiler.is_compiling() else _Normalize.apply
    return normalize(x, mean.detach(), var.detach(), weight, bias, float(eps))


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
    reference: SF.ClipReference | None = None,
    var_floor: float = 0.0,
    normalize_with: str = "batch",
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    all_reduce: SF.AllReduce | None = None,
    add_noise: bool = True,
) -> Tensor:
    """:func:`safenorm.functional.dp_batch_norm`, dispatched (see the module docstring)."""
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
    )
    return frozen_normalize(input, mean, var, weight, bias, eps)


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
    dtype = _stat_dtype(input)
    mean = mean.detach().to(dtype)
    rstd = torch.rsqrt(var.detach().to(dtype) + eps)
    if not _dispatch(input):
        return _affine_grad_sums_reference(grad_output, input, mean, rstd)
    if torch.compiler.is_compiling():
        return _affine_grad_sums(grad_output, input, mean, rstd)
    return _affine_grad_sums_impl(grad_output, input, mean, rstd)
