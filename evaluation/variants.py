"""Normalization variants compared by the harness, registered by name.

A :class:`Variant` turns a model with ``nn.BatchNorm*d`` layers into the variant's model and
names the trainer that trains it. ``bn`` is the reference every other variant is reported
against. Register more with :func:`register_variant`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from safenorm.evaluation.config import EvalConfig
from safenorm.evaluation.registry import Registry
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import safenorm

__all__ = ["VARIANTS", "Variant", "get_variant", "register_variant", "replace_batchnorm"]


@dataclass(frozen=True)
class Variant:
    """One normalization choice and how to train it.

    Attributes:
        name: canonical name.
        description: one line for reports.
        prepare: ``(model with BatchNorm, config) -> model of this variant``.
        trainer: a registered trainer (``sgd``, ``dpsgd-opacus``, ``dpsgd-safenorm``).
        dp: trained with DP-SGD (an accountant epsilon and an audit bound are reported).
        batch_coupled: training-mode outputs depend on other samples of the batch.
        requires: modules that must import for the variant to run.
    """

    name: str
    description: str
    prepare: Callable[[nn.Module, EvalConfig], nn.Module]
    trainer: str = "sgd"
    dp: bool = False
    batch_coupled: bool = False
    requires: tuple[str, ...] = ()

    def unavailable_reason(self) -> str | None:
        """``None`` if the variant can run here, else why not."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as err:
                return f"variant {self.name!r} needs {module} ({err})"
        return None


VARIANTS: Registry[Variant] = Registry("variant")


def register_variant(
    variant: Variant, *, aliases: tuple[str, ...] = (), overwrite: bool = False
) -> Variant:
    """Register a variant (usable by name in configs and on the command line)."""
    return VARIANTS.register(variant.name, variant, aliases=aliases, overwrite=overwrite)


def get_variant(name: str) -> Variant:
    """The registered variant ``name`` (or alias); unknown names list the known ones."""
    return VARIANTS.get(name)


def replace_batchnorm(model: nn.Module, factory: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    """Replace every ``nn.BatchNorm*d`` of ``model`` by ``factory(bn)``; returns the model."""
    if isinstance(model, _BatchNorm):
        return factory(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(module, child_name, factory(child))
    return model


def _identity(model: nn.Module, config: EvalConfig) -> nn.Module:
    return model


def _ghost(model: nn.Module, config: EvalConfig) -> nn.Module:
    return safenorm.convert_batchnorm(
        model, "ghost", ghost_batch_size=config.options.ghost_batch_size
    )


def _clipped(model: nn.Module, config: EvalConfig) -> nn.Module:
    return safenorm.convert_batchnorm(
        model,
        "clipped",
        clip_norm=config.options.clip_norm,
        var_clip_norm=config.options.var_clip_norm,
    )


def _dp(model: nn.Module, config: EvalConfig) -> nn.Module:
    # The statistics' noise is set by the trainer from config.dp.statistics_share.
    return safenorm.convert_batchnorm(model, "dp")


def _groupnorm(model: nn.Module, config: EvalConfig) -> nn.Module:
    groups = config.options.groupnorm_groups
    return replace_batchnorm(
        model, lambda bn: nn.GroupNorm(min(groups, bn.num_features), bn.num_features)
    )


def _opacus_fix(model: nn.Module, config: EvalConfig) -> nn.Module:
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


def _none(model: nn.Module, config: EvalConfig) -> nn.Module:
    return replace_batchnorm(model, lambda bn: nn.Identity())


register_variant(
    Variant("bn", "nn.BatchNorm (the reference)", _identity, batch_coupled=True),
    aliases=("batchnorm", "standard"),
)
register_variant(
    Variant("ghost", "GhostBatchNorm: groups of ghost_batch_size", _ghost, batch_coupled=True),
    aliases=("ghost-bn", "gbn"),
)
register_variant(
    Variant(
        "clipped", "ClippedBatchNorm: per-sample-clipped statistics", _clipped, batch_coupled=True
    ),
    aliases=("clipped-bn", "cbn"),
)
register_variant(
    Variant(
        "dp",
        "DP-SGD with DPBatchNorm (safenorm.opacus.PrivacyEngine)",
        _dp,
        trainer="dpsgd-safenorm",
        dp=True,
        batch_coupled=True,
        requires=("opacus", "safenorm.opacus"),
    ),
    aliases=("dp-bn", "dpbatchnorm", "dpbn"),
)
register_variant(
    Variant(
        "dp-groupnorm",
        "DP-SGD after Opacus' ModuleValidator.fix (GroupNorm), the DP baseline",
        _opacus_fix,
        trainer="dpsgd-opacus",
        dp=True,
        requires=("opacus",),
    ),
    aliases=("dp-gn", "opacus", "opacus-fix"),
)
register_variant(
    Variant("groupnorm", "GroupNorm (no batch coupling), non-DP", _groupnorm),
    aliases=("gn",),
)
register_variant(
    Variant("none", "no normalization (BatchNorm removed), non-DP", _none),
    aliases=("identity", "no-norm"),
)
