"""Swap every BatchNorm of a model for a safenorm layer."""

from __future__ import annotations

import warnings
from typing import Any

import torch
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
from safenorm.warnings import ConversionWarning, PrivacyWarning

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


def _convert_one(
    module: nn.Module,
    kind: str,
    name: str,
    kwargs: dict[str, Any],
    statistics_are_public: bool = False,
) -> nn.Module:
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
    if isinstance(new, DPBatchNorm) and not statistics_are_public:
        _reset_private_statistics(new, module)
    return new


def _holds_data(module: nn.Module) -> bool:
    """Whether ``module``'s running statistics moved from their initial values."""
    tracked = module.num_batches_tracked
    return bool(
        (tracked is not None and int(tracked) > 0)
        or module.running_mean.count_nonzero() > 0
        or (module.running_var != 1).any()
    )


def _reset_private_statistics(new: DPBatchNorm, source: nn.Module) -> None:
    """Give a DP layer converted from a trained non-DP layer fresh running statistics.

    A trained BatchNorm's buffers are a raw summary of its training data; in the DP layer they
    would seed the running EMA, the clip reference and the variance floor of every release and
    ship in the checkpoint. New tensors are assigned (the source layer keeps its own).
    """
    if new.frozen_statistics or new.running_mean is None:
        return  # frozen: the caller declared them public (they are used as they are)
    if isinstance(source, DPBatchNorm) and not source.frozen_statistics:
        return  # already released values
    if _holds_data(source):
        warnings.warn(
            f"{new._describe()}: the converted layer's running statistics (a raw summary of the "
            "data it was trained on) were reset to their initial values, since the DP layer's "
            "releases would start from them. Pass frozen_statistics=True to normalize with "
            "them as public statistics, or statistics_are_public=True to keep them as the "
            "starting point of the DP running statistics.",
            PrivacyWarning,
            stacklevel=4,
        )
    new._buffers["running_mean"] = torch.zeros_like(new.running_mean)
    new._buffers["running_var"] = torch.ones_like(new.running_var)
    new._buffers["num_batches_tracked"] = torch.zeros_like(new.num_batches_tracked)


def convert_batchnorm(
    model: nn.Module, kind: str, *, statistics_are_public: bool = False, **kwargs: Any
) -> nn.Module:
    """Replace every BatchNorm in ``model`` by the safenorm layer of ``kind``.

    Converts ``nn.BatchNorm1d/2d/3d``, their lazy versions, ``nn.SyncBatchNorm`` (to the
    family's rank-agnostic class), any subclass of them, and safenorm layers of another kind.
    The new layers share the original Parameter and buffer objects (weights, running statistics,
    device, dtype, ``requires_grad``) and keep the train/eval flag, so optimizers keep working.

    Converting to ``"dp"`` resets the running statistics of every layer that is not already a
    DP layer (new buffers: zeros, ones, 0; a :class:`~safenorm.warnings.PrivacyWarning` when
    they held data): a trained BatchNorm's statistics are a raw summary of its training data
    and would seed the DP layer's releases. They are kept with ``frozen_statistics=True``
    (normalize with them, as public, e.g. pre-trained, statistics) or
    ``statistics_are_public=True`` (start the DP running statistics from them).

    Args:
        model: the model, converted in place.
        kind: ``"ghost"``, ``"clipped"`` or ``"dp"``.
        statistics_are_public: ``"dp"`` only: the existing running statistics come from public
            data; keep them. Default: ``False``
        **kwargs: keyword arguments of the target class (e.g. ``noise_multiplier=4.0``).

    Returns:
        The model; a new module if ``model`` itself is a BatchNorm.

    Example::

        >>> model = convert_batchnorm(torchvision_resnet, "dp", expected_batch_size=256)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known kinds: {sorted(KINDS)}")
    if statistics_are_public and kind != "dp":
        raise ValueError("statistics_are_public applies to kind='dp' only")
    if _is_convertible(model):
        return _convert_one(model, kind, "", kwargs, statistics_are_public)
    for name, module in model.named_modules():
        for child_name, child in list(module.named_children()):
            if _is_convertible(child):
                full = f"{name}.{child_name}" if name else child_name
                new = _convert_one(child, kind, full, kwargs, statistics_are_public)
                setattr(module, child_name, new)
    return model
