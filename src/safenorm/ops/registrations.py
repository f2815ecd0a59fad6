"""``torch.library`` custom ops with their fakes and autograd formulas: what ``torch.compile``
captures (``torch.ops.safenorm.*``), and the compiled layer paths built from them.

Every op has a PyTorch implementation (CPU and any device; the reference math) and runs the
Triton kernels where they run on its tensors (:mod:`safenorm.ops.primitives`); every op has a
fake (meta) implementation and an autograd formula, so ``torch.compile(fullgraph=True)``
captures the layers whole. Stage 2 is PyTorch here: the compiler fuses it. Random work (the DP
release with torch's global generator) is one op, opaque to the compiler, so compiled code draws
the noise at run time as eager code does.

* ghost / clipped: ``safenorm::batch_norm_train`` (stage 1 ``safenorm::moments``, stage 2,
  normalize) whose backward runs ``safenorm::affine_grad_sums``, the stage-2 vector-Jacobian
  product by ``torch.func.vjp`` through the very functions of :mod:`safenorm.functional` that
  made the statistics, and ``safenorm::normalize_backward``; without clipping on the kernels,
  ``safenorm::fused_batch_norm`` (:mod:`safenorm.kernels.batch_norm`) and its backward.
* DP: ``safenorm::dp_statistics`` (the release), ``safenorm::running_update`` (mutates the
  buffers), ``safenorm::normalize`` (frozen statistics) whose backward
  ``safenorm::frozen_normalize_backward`` writes ``dx`` and the per-sample affine sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from safenorm import functional as SF
from safenorm.ops import primitives as P
from safenorm.ops.backend import kernel_modules, use_kernels

__all__ = ["compiled_batch_norm_train", "compiled_normalize", "compiled_release"]


# ----------------------------------------------------------------------------------------------
# Ops: stage 1
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("safenorm::moments", mutates_args=())
def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample moments ``(m, w)`` of :func:`safenorm.functional.per_sample_moments`."""
    return P.moments_impl(x)


@_moments.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    shape = (x.shape[0], x.shape[1])
    return x.new_empty(shape, dtype=P.stat_dtype(x)), x.new_empty(shape, dtype=P.stat_dtype(x))


# ----------------------------------------------------------------------------------------------
# Ops: backward building blocks (also usable on their own)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("safenorm::affine_grad_sums", mutates_args=())
def _affine_grad_sums(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """``(sum_s dy * (x - mean) * rstd, sum_s dy)`` per (sample, channel), each ``(N, C)``."""
    return P.affine_grad_sums_impl(grad_output, x, mean, rstd)


@_affine_grad_sums.register_fake
def _(grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    shape = (x.shape[0], x.shape[1])
    return x.new_empty(shape, dtype=P.stat_dtype(x)), x.new_empty(shape, dtype=P.stat_dtype(x))


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
    return P.normalize_backward_impl(grad_output, x, scale, coef, center, offset)


@_normalize_backward.register_fake
def _(grad_output, x, scale, coef, center, offset):
    return torch.empty_like(x)


@torch.library.custom_op("safenorm::frozen_normalize_backward", mutates_args=())
def _frozen_normalize_backward(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass: ``dx = dy * scale`` and the per-sample affine sums of :func:`_affine_grad_sums`."""
    return P.frozen_normalize_backward_impl(grad_output, x, mean, rstd, scale)


@_frozen_normalize_backward.register_fake
def _(grad_output, x, mean, rstd, scale):
    shape = (x.shape[0], x.shape[1])
    stat = x.new_empty(shape, dtype=P.stat_dtype(x))
    return torch.empty_like(x), stat, torch.empty_like(stat)


def _vjp_traceable(fn: Callable, inputs: tuple[Tensor, Tensor], cotangents: tuple) -> tuple:
    """Vector-Jacobian product that compiled backward graphs can trace."""
    _, vjp = torch.func.vjp(fn, *inputs)
    return vjp(cotangents)


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
    return P.batch_norm_train_impl(
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
    count = P.group_count(x.shape[0], ghost_batch_size)
    dtype = P.stat_dtype(x)
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


def _batch_norm_train_grads(ctx: Any, dy: Tensor) -> tuple:
    x, weight, center, scale, mean, var, m, w = ctx.saved_tensors
    eps, ghost, clipped, clip_norm, var_clip_norm, detach = ctx.args
    groups = P.consecutive_groups(x.shape[0], ghost, x.device)
    mean_x, var_x = groups.normalization_statistics(mean, var)
    rstd, gain, _ = P.affine_coefficients(mean_x, var_x, weight, None, eps)
    dx = dweight = dbias = None
    if detach:
        dx, sdyx, sdy = _frozen_normalize_backward(dy, x, mean_x, rstd, gain)
    else:
        sdyx, sdy = _affine_grad_sums(dy, x, mean_x, rstd)
        d_mean = (-(gain * sdy)).to(m.dtype)
        d_var = (-0.5 * (gain * rstd) * sdyx).to(m.dtype)
        if clipped:  # stage-2 backward through the same functions that made the statistics

            def statistics(m_: Tensor, w_: Tensor) -> tuple[Tensor, Tensor]:
                mean_, var_ = P.group_statistics(
                    m_, w_, groups, clipped, clip_norm, var_clip_norm, center, scale
                )
                return groups.per_sample(mean_), groups.per_sample(var_)

            dm, dw = _vjp_traceable(statistics, (m, w), (d_mean, d_var))
        else:
            dm, dw = _batch_statistics_backward(m, groups, mean, d_mean, d_var)
        spatial = math.prod(x.shape[2:])
        dx = _normalize_backward(dy, x, gain, 2.0 * dw / spatial, m, dm / spatial)
    if weight is not None:
        dweight = sdyx.sum(0).to(weight.dtype)
    if ctx.bias_dtype is not None:
        dbias = sdy.sum(0).to(ctx.bias_dtype)
    return dx, dweight, dbias, None, None, None, None, None, None, None, None


def _batch_norm_train_backward(ctx: Any, dy: Tensor, *unused: Tensor) -> tuple:
    return _batch_norm_train_grads(ctx, dy)


torch.library.register_autograd(
    "safenorm::batch_norm_train",
    _batch_norm_train_backward,
    setup_context=_batch_norm_train_setup,
)


def _fused_kernels() -> Any:
    modules = kernel_modules()
    if modules is None:
        raise RuntimeError(
            "safenorm's fused batch norm needs Triton (pip install safenorm[triton])"
        )
    return modules.batch_norm


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
    stat = x.new_empty((P.group_count(x.shape[0], group_size), x.shape[1]), dtype=torch.float32)
    running = (
        (torch.empty_like(running_mean), torch.empty_like(running_var))
        if running_mean is not None and running_var is not None
        else (x.new_empty(0), x.new_empty(0))
    )
    return torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat), *running


@torch.library.custom_op("safenorm::fused_batch_norm_backward", mutates_args=())
def _fused_batch_norm_backward(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, group_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`_fused_batch_norm` (Triton only)."""
    return _fused_kernels().batch_norm_backward(
        grad_output, x, mean, rstd, scale, group_size=group_size
    )


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


def _fused_batch_norm_backward_formula(ctx: Any, dy: Tensor, *unused: Tensor) -> tuple:
    x, mean, rstd, scale = ctx.saved_tensors
    dx, dweight, dbias = _fused_batch_norm_backward(dy, x, mean, rstd, scale, ctx.group_size)
    dweight = None if ctx.weight_dtype is None else dweight.to(ctx.weight_dtype)
    dbias = None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)
    return dx, dweight, dbias, None, None, None, None, None


torch.library.register_autograd(
    "safenorm::fused_batch_norm",
    _fused_batch_norm_backward_formula,
    setup_context=_fused_batch_norm_setup,
)


def _fuses_batch_norm(x: Tensor, clipped: bool, detach: bool) -> bool:
    """Whether the layer can run the fused kernels (plain group statistics, Triton on ``x``)."""
    return not clipped and not detach and x.numel() > 0 and use_kernels(x)


# ----------------------------------------------------------------------------------------------
# Ops: normalization with frozen statistics (DP), running update
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("safenorm::normalize", mutates_args=())
def _normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """:func:`safenorm.functional.frozen_normalize`: no gradient into ``mean``/``var``."""
    return P.normalize_op_impl(x, mean, var, weight, bias, eps)


@_normalize.register_fake
def _(x, mean, var, weight, bias, eps):
    return torch.empty_like(x)


def _normalize_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _normalize_grads(ctx: Any, dy: Tensor) -> tuple:
    x, mean, var, weight = ctx.saved_tensors
    rstd, gain, _ = P.affine_coefficients(
        mean.to(P.stat_dtype(x)), var.to(P.stat_dtype(x)), weight, None, ctx.eps
    )
    dweight = dbias = None
    if weight is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
        dx, sdyx, sdy = _frozen_normalize_backward(dy, x, mean, rstd, gain)
        dweight = sdyx.sum(0).to(weight.dtype)
        dbias = sdy.sum(0).to(weight.dtype) if ctx.has_bias else None
    else:
        dx = _normalize_backward(dy, x, gain, None, None, None)
        if ctx.has_bias:
            dbias = P.spatial_sum(dy.to(P.stat_dtype(x))).sum(0)
    return dx, None, None, dweight, dbias, None


def _normalize_backward_formula(ctx: Any, dy: Tensor) -> tuple:
    return _normalize_grads(ctx, dy)


torch.library.register_autograd(
    "safenorm::normalize", _normalize_backward_formula, setup_context=_normalize_setup
)


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


# ----------------------------------------------------------------------------------------------
# The DP release as one op (noise from torch's global generator or the OS CSPRNG)
# ----------------------------------------------------------------------------------------------


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
    var_release: str,
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
        var_release=var_release,
    )
    return stats.mean, stats.var, stats.groups.index.clone(), stats.groups.size.clone()


@_dp_statistics.register_fake
def _(m, w, center, scale, clip_norm, var_clip_norm, sigma, denominator, ghost, floor, s, a, v):
    count = SF.dp_group_count(denominator, ghost if ghost > 0 else None)
    stat = m.new_empty((count, m.shape[1]))
    index = m.new_empty((m.shape[0],), dtype=torch.long)
    return stat, torch.empty_like(stat), index, m.new_empty((count,), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Compiled layer paths
# ----------------------------------------------------------------------------------------------


def compiled_batch_norm_train(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    stage2: P.Stage2,
) -> Tensor:
    """Training-mode ghost / clipped BN by the custom ops (buffers updated in place)."""
    update = running_mean is not None and running_var is not None
    ghost = 0 if stage2.ghost_batch_size is None else int(stage2.ghost_batch_size)
    if _fuses_batch_norm(input, stage2.clipped, stage2.detach_statistics):
        y, _, _, _, new_mean, new_var = _fused_batch_norm(
            input,
            weight,
            bias,
            running_mean if update else None,
            running_var if update else None,
            float(momentum),
            float(eps),
            ghost,
        )
        if update:
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return y
    center, scale = stage2.reference_tensors()
    y, mean, var, _, _ = _batch_norm_train(
        input,
        weight,
        bias,
        center,
        scale,
        float(eps),
        ghost,
        stage2.clipped,
        float(stage2.clip_norm),
        float(stage2.var_clip_norm),
        stage2.detach_statistics,
    )
    if update:
        groups = P.consecutive_groups(input.shape[0], ghost, input.device)
        spatial = math.prod(input.shape[2:])
        _running_update(running_mean, running_var, mean, var, groups.size, spatial, momentum)
    return y


def compiled_release(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    stage2: P.Stage2,
    *,
    normalize_with: str,
    generator: torch.Generator | None,
    secure_mode: bool,
) -> tuple[Tensor, Tensor]:
    """The DP release by the custom ops; with a seeded generator, the moments by the op and the
    release by :func:`safenorm.functional.dp_release` (traced, the generator's state with it)."""
    ghost = 0 if stage2.ghost_batch_size is None else int(stage2.ghost_batch_size)
    denominator = float(stage2.denominator)
    with torch.no_grad():
        m, w = _moments(input.detach())
    kwargs = dict(
        clip_norm=float(stage2.clip_norm),
        var_clip_norm=float(stage2.var_clip_norm),
        noise_multiplier=float(stage2.noise_multiplier),
        denominator=denominator,
        var_floor=float(stage2.var_floor),
        secure_mode=secure_mode,
        var_release=stage2.var_release,
    )
    if generator is not None:
        return SF.dp_release(
            input,
            running_mean,
            running_var,
            momentum,
            ghost_batch_size=ghost or None,
            reference=stage2.reference,
            normalize_with=normalize_with,
            generator=generator,
            moments=(m, w),
            **kwargs,
        )
    center, scale = stage2.reference_tensors()
    with torch.no_grad():
        mean, var, index, size = _dp_statistics(
            m,
            w,
            center,
            scale,
            kwargs["clip_norm"],
            kwargs["var_clip_norm"],
            kwargs["noise_multiplier"],
            denominator,
            ghost,
            kwargs["var_floor"],
            secure_mode,
            True,
            stage2.var_release,
        )
    stats = SF.PrivateStatistics(mean, var, SF.Groups(index=index, size=size))
    if running_mean is not None and running_var is not None:
        spatial = math.prod(input.shape[2:])
        _running_update(running_mean, running_var, mean, var, size, spatial, float(momentum))
    return SF.statistics_to_normalize_with(stats, running_mean, running_var, normalize_with)


def compiled_normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Normalization with frozen statistics by ``safenorm::normalize``."""
    return _normalize(x, mean.detach(), var.detach(), weight, bias, float(eps))


def affine_grad_sums(grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor):
    """``safenorm::affine_grad_sums`` (compiled code)."""
    return _affine_grad_sums(grad_output, x, mean, rstd)
