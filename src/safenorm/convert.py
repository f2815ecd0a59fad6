"""Swap every BatchNorm of a model for a safenorm layer."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from safenorm.modules import (
    ClippedBatchNorm,
    ClippedBatchNorm1d,
    ClippedBatchNorm2d,
    ClippedBatchNorm3d,
    DPBatchNorm,
    DPBatchNorm1d,
    DPBatchNorm2d,
    DPBatchNorm3d,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SafeBatchNormBase,
)
from safenorm.warnings import ConversionWarning

__all__ = ["KINDS", "convert_batchnorm", "target_class"]

#: kind -> (rank-agnostic class, {rank: class}); rank 0 is the rank-agnostic entry.
KINDS: dict[str, dict[int, type[SafeBatchNormBase]]] = {
    "ghost": {0: GhostBatchNorm, 1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d},
    "clipped": {
        0: ClippedBatchNorm,
        1: ClippedBatchNorm1d,
        2: ClippedBatchNorm2d,
        3: ClippedBatchNorm3d,
    },
    "dp": {0: DPBatchNorm, 1: DPBatchNorm1d, 2: DPBatchNorm2d, 3: DPBatchNorm3d},
}

# Torch classes whose rank is known; SyncBatchNorm and unknown subclasses map to rank 0.
_RANK_OF: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.BatchNorm1d, 1),
    (nn.LazyBatchNorm1d, 1),
    (GhostBatchNorm1d, 1),
    (ClippedBatchNorm1d, 1),
    (DPBatchNorm1d, 1),
    (nn.BatchNorm2d, 2),
    (nn.LazyBatchNorm2d, 2),
    (GhostBatchNorm2d, 2),
    (ClippedBatchNorm2d, 2),
    (DPBatchNorm2d, 2),
    (nn.BatchNorm3d, 3),
    (nn.LazyBatchNorm3d, 3),
    (GhostBatchNorm3d, 3),
    (ClippedBatchNorm3d, 3),
    (DPBatchNorm3d, 3),
)

_TORCH_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def _rank_of(module: nn.Module) -> int:
    return next((rank for cls, rank in _RANK_OF if isinstance(module, cls)), 0)


def target_class(module: nn.Module, kind: str) -> type[SafeBatchNormBase]:
    """The safenorm class that replaces ``module`` for ``kind`` (``"ghost"|"clipped"|"dp"``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known kinds: {sorted(KINDS)}")
    return KINDS[kind][_rank_of(module)]


def _is_convertible(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, SafeBatchNormBase))


def _convert_one(module: nn.Module, kind: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"layer '{name}' ({type(module).__name__}) is still uninitialized; run one forward "
            "pass before converting it"
        )
    if isinstance(module, _BatchNorm) and type(module).forward not in _TORCH_FORWARDS:
        warnings.warn(
            f"layer '{name}' is a {type(module).__name__}, a BatchNorm subclass with its own "
            "forward; the converted layer keeps its parameters and statistics but not that "
            "forward's extra behaviour",
            ConversionWarning,
            stacklevel=3,
        )
    new = target_class(module, kind).from_batchnorm(module, **kwargs)
    new.layer_name = name or None
    return new


def convert_batchnorm(model: nn.Module, kind: str, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm in ``model`` by the safenorm layer of ``kind``.

    Converts ``nn.BatchNorm1d/2d/3d``, their lazy versions, ``nn.SyncBatchNorm`` (to the
    family's rank-agnostic class), any subclass of them, and safenorm layers of another kind.
    The new layers share the original Parameter and buffer objects (weights, running statistics,
    device, dtype, ``requires_grad``) and keep the train/eval flag, so optimizers keep working.

    Args:
        model: the model, converted in place.
        kind: ``"ghost"``, ``"clipped"`` or ``"dp"``.
        **kwargs: keyword arguments of the target class (e.g. ``noise_multiplier=4.0``).

    Returns:
        The model; a new module if ``model`` itself is a BatchNorm.

    Example::

        >>> model = convert_batchnorm(torchvision_resnet, "dp", expected_batch_size=256)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known kinds: {sorted(KINDS)}")
    if _is_convertible(model):
        return _convert_one(model, kind, "", kwargs)
    for name, module in model.named_modules():
        for child_name, child in list(module.named_children()):
            if _is_convertible(child):
                full = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, _convert_one(child, kind, full, kwargs))
    return model
