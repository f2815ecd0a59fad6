"""Opacus grad samplers and ghost-clipping norm samplers of the DP statistics layers.

A DP layer in training normalizes with released (detached) statistics, so its output for sample
``i`` is ``y_i = xhat_i * weight + bias`` with ``xhat_i = (x_i - mean) / sqrt(var + eps)``
depending only on ``x_i`` and released numbers. The per-sample gradients are then exactly

    grad_weight[i, c] = sum_s dy[i, c, s] * xhat[i, c, s]        grad_bias[i, c] = sum_s dy[i, c, s]

The statistics must be those of the forward that produced ``x_i``: the engine's forward hook
(:func:`record_statistics`) appends them to the activations Opacus stored for that forward, in
front of the input (Opacus reads the batch size from the last entry), so two forwards per step
each get their own. Without the hook, statistics that cannot change between forward and
backward (frozen mode, eval mode: the running buffers) are used; a releasing forward without the
hook raises rather than guess.

Registered for every concrete class (Opacus looks grad samplers up by exact type).
"""

from __future__ import annotations

from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from safenorm import ops
from safenorm.modules.dp import DPBatchNorm, DPBatchNorm1d, DPBatchNorm2d, DPBatchNorm3d

__all__ = [
    "DP_CLASSES",
    "compute_dp_batch_norm_grad_sample",
    "compute_dp_batch_norm_norm_sample",
    "record_statistics",
    "statistics_for_backward",
]

#: Every concrete DP class (Opacus matches exact types).
DP_CLASSES: tuple[type[DPBatchNorm], ...] = (
    DPBatchNorm,
    DPBatchNorm1d,
    DPBatchNorm2d,
    DPBatchNorm3d,
)

_STATS_MARK = "_safenorm_statistics_recorded"


def _statistics_used(layer: DPBatchNorm) -> tuple[Tensor, Tensor]:
    """The (detached) statistics ``layer`` normalized with in the forward that just ran."""
    if layer._uses_batch_statistics():
        if layer.last_statistics is None:
            raise RuntimeError(f"{layer._describe()}: no statistics recorded for this forward")
        mean, var = layer.last_statistics
        return mean.detach(), var.detach()
    return layer.running_mean.detach().clone(), layer.running_var.detach().clone()


def record_statistics(module: nn.Module) -> list[RemovableHandle]:
    """Make every DP layer of ``module`` store, with each forward's activations, the statistics
    it normalized with (needed when a DP layer releases: call it after Opacus added its hooks).

    Returns the hook handles.
    """
    handles: list[RemovableHandle] = []
    for layer in module.modules():
        if isinstance(layer, DPBatchNorm):
            handles.append(layer.register_forward_pre_hook(_count_activations))
            handles.append(layer.register_forward_hook(_record_used_statistics))
    return handles


# Module-level functions (not closures), so a model with these hooks still pickles.
def _count_activations(layer: nn.Module, _input) -> None:
    layer._safenorm_activation_count = len(getattr(layer, "activations", ()) or ())


def _record_used_statistics(layer: nn.Module, _input, _output) -> None:
    before = getattr(layer, "_safenorm_activation_count", None)
    activations = getattr(layer, "activations", None)
    if before is None or not activations or len(activations) != before + 1:
        return  # Opacus did not capture this forward (eval, no_grad, hooks disabled)
    mean, var = _statistics_used(layer)
    activations[-1][:0] = [mean, var, _STATS_MARK]


def statistics_for_backward(layer: DPBatchNorm, activations: list) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, mean, var)`` for the grad sampler from Opacus' activations of one forward."""
    if len(activations) == 4 and isinstance(activations[2], str) and activations[2] == _STATS_MARK:
        mean, var, _, x = activations
        return x, mean, var
    x = activations[-1]
    if layer._uses_batch_statistics():
        raise RuntimeError(
            f"{layer._describe()} released batch statistics in this forward, but the statistics "
            "were not recorded with the activations, so its per-sample gradients cannot be "
            "computed exactly. Use safenorm.opacus.PrivacyEngine (or call "
            "safenorm.opacus.record_statistics(model) after wrapping it)."
        )
    return x, layer.running_mean.detach(), layer.running_var.detach()


def _per_sample_terms(layer: DPBatchNorm, activations: list, backprops: Tensor):
    """``(sum_s dy * xhat, sum_s dy)`` per (sample, channel): one fused pass on CUDA."""
    x, mean, var = statistics_for_backward(layer, activations)
    return ops.per_sample_affine_grads(x, backprops, mean, var, layer.eps)


@register_grad_sampler(list(DP_CLASSES))
def compute_dp_batch_norm_grad_sample(
    layer: DPBatchNorm, activations: list, backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a DP layer's affine parameters (exact; see module docstring)."""
    grad_weight, grad_bias = _per_sample_terms(layer, activations, backprops)
    out: dict[nn.Parameter, Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        out[layer.weight] = grad_weight.to(layer.weight.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grad_bias.to(layer.bias.dtype)
    return out


@register_norm_sampler(list(DP_CLASSES))
def compute_dp_batch_norm_norm_sample(
    layer: DPBatchNorm, activations: list, backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norms for ghost clipping (the per-sample gradients are only ``(N, C)``,
    so they are formed and their norms taken)."""
    grads = compute_dp_batch_norm_grad_sample(layer, activations, backprops)
    return {p: g.norm(2, dim=-1) for p, g in grads.items()}  # g: (N, C)
