"""What safenorm's PrivacyEngine refuses before training, and why.

Opacus' own validator matches exact types and checks "trainable layer with buffers"; it rejects
the DP layers (they have running buffers, which hold only released values) and misses several
batch-coupling cases (``BatchNorm2d(affine=False)``, frozen BatchNorm left in train mode,
subclasses of BatchNorm). Here every layer that couples samples is rejected with the conversion
to apply (via :func:`safenorm.find_unsafe_layers`), every plain BatchNorm is rejected as Opacus
does, and the buffer check is kept for every other layer.
"""

from __future__ import annotations

from opacus.grad_sample import GradSampleHooks
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from safenorm.audit import find_unsafe_layers
from safenorm.modules import DPBatchNorm, SafeBatchNormBase

__all__ = ["CouplingLayerError", "check_functorch_coverage", "validate_model"]

_CONVERT = (
    'safenorm.convert_batchnorm(model, "dp") (DPBatchNorm: noised statistics, accounted by this '
    "engine)"
)
_FROZEN = (
    'safenorm.convert_batchnorm(model, "dp", frozen_statistics=True) (normalize with the '
    "pre-trained running statistics; no privacy cost)"
)


class CouplingLayerError(UnsupportedModuleError):
    """The model has layers that couple samples (or are otherwise unusable for DP-SGD)."""


def _coupling_messages(module: nn.Module) -> list[str]:
    messages = [
        f"{f.name or '<root>'} ({f.layer}): {f.reason} Convert it with {f.fix}."
        for f in find_unsafe_layers(module)
        if f.kind == "couples-samples"
    ]
    flagged = {m.split(" (", 1)[0] for m in messages}
    for name, layer in module.named_modules():
        if isinstance(layer, _BatchNorm) and (name or "<root>") not in flagged:
            messages.append(
                f"{name or '<root>'} ({type(layer).__name__}): a BatchNorm in eval mode still "
                "ships running statistics of unknown provenance and becomes sample-coupling as "
                f"soon as it is put in train mode. Convert it with {_FROZEN} if its statistics "
                f"come from public pre-training, or {_CONVERT}."
            )
    return messages


def _buffer_messages(module: nn.Module) -> list[str]:
    # Opacus' GradSampleHooks.validate, except that DP layers' buffers hold released values only.
    return [
        f"{name} ({type(layer).__name__}): a trainable layer with buffers, which Opacus does not "
        "support (its buffers are not private)"
        for name, layer in trainable_modules(module)
        if not isinstance(layer, DPBatchNorm)
        and any(
            True
            for sub in layer.modules()
            if not isinstance(sub, DPBatchNorm)
            for _ in sub.buffers(recurse=False)
        )
    ]


def validate_model(module: nn.Module) -> None:
    """Raise :class:`CouplingLayerError` listing every layer unusable for DP-SGD.

    Runs safenorm's coupling checks, Opacus' registered validators (``ModuleValidator``) and
    Opacus' buffer check with DP layers exempted.
    """
    messages = _coupling_messages(module)
    opacus_errors = [
        e
        for e in ModuleValidator.validate(module, strict=False)
        if "BatchNorm cannot support" not in str(e)  # reported above, with the conversion
    ]
    messages += [str(e) for e in opacus_errors]
    messages += _buffer_messages(module)
    if messages:
        raise CouplingLayerError(
            "safenorm.opacus.PrivacyEngine cannot train this model with DP-SGD:\n  - "
            + "\n  - ".join(messages)
        )


def check_functorch_coverage(module: nn.Module, force_functorch: bool = False) -> None:
    """Refuse normalization layers that Opacus would hand to its functorch fallback.

    Opacus computes per-sample gradients of a module without a registered grad sampler (and of
    everything inside it) by re-running it one sample at a time with functorch; for a DP or
    BatchNorm layer inside such a module that re-run would make extra, unaccounted releases (or
    compute batch statistics of one sample), so it is never allowed silently.
    """
    problems = []
    for name, layer in module.named_modules():
        if not any(p.requires_grad for p in layer.parameters(recurse=False)):
            continue
        if type(layer) in (DPRNN, DPLSTM, DPGRU):
            continue
        if not force_functorch and type(layer) in GradSampleHooks.GRAD_SAMPLERS:
            continue
        inner = [
            f"{name}.{sub}" if name else sub
            for sub, m in layer.named_modules()
            if isinstance(m, (SafeBatchNormBase, _BatchNorm)) and (sub or force_functorch)
        ]
        if inner:
            problems.append(
                f"{name or '<root>'} ({type(layer).__name__}) has no registered grad sampler, so "
                f"Opacus would compute it with functorch, including its normalization layers "
                f"{inner}; move its own parameters into a submodule or register a grad sampler"
            )
    if problems:
        raise CouplingLayerError(
            "per-sample gradients of these layers would silently go through functorch:\n  - "
            + "\n  - ".join(problems)
        )
