"""Normalization variants compared by the harness, registered by name.

A :class:`Variant` turns a model with ``nn.BatchNorm*d`` layers into the variant's model and
names the trainer that trains it. ``bn`` is the reference every other variant is reported
against. Register more with :func:`register_variant`.

Every variant's model is what its name says (``tests/test_eval_variants.py`` inspects them):

* ``groupnorm``: ``nn.GroupNorm`` with :attr:`VariantOptions.groupnorm_channels_per_group`
  channels per group (default 4) on every layer; see :func:`groupnorm_groups` for the rule.
* ``instancenorm``: ``nn.GroupNorm(C, C)`` (one channel per group, affine), i.e. InstanceNorm.
* ``layernorm``: ``nn.GroupNorm(1, C)`` (one group over all channels and positions).
* ``opacus-fix``: whatever Opacus' ``ModuleValidator.fix`` produces (``GroupNorm(min(32, C),
  C)``: InstanceNorm for C <= 32), trained with DP-SGD; ``dp-groupnorm`` is its old name.
* ``none``: the BatchNorm is replaced by a learnable per-channel bias (:class:`ChannelBias`),
  so "no normalization" is not confounded with "no bias" (the convolutions have none).

A swept setting of a variant is the variant's name, ``@`` and a value of its
:attr:`Variant.param` (``ghost@4``: ghost batches of 4; ``clipped@0.5``: both clip bounds at half
their defaults); :func:`ensure_variant` registers such a name on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safenorm.evaluation.config import EvalConfig
from safenorm.evaluation.registry import Registry
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import safenorm

__all__ = [
    "VARIANTS",
    "ChannelBias",
    "Variant",
    "describe_norm_layers",
    "ensure_variant",
    "get_variant",
    "groupnorm_groups",
    "register_variant",
    "replace_batchnorm",
]


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
        param: the :class:`VariantOptions` field a swept name ``<name>@<value>`` sets.
    """

    name: str
    description: str
    prepare: Callable[[nn.Module, EvalConfig], nn.Module]
    trainer: str = "sgd"
    dp: bool = False
    batch_coupled: bool = False
    requires: tuple[str, ...] = ()
    param: str | None = None

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
    """The registered variant ``name`` (or alias, or swept ``base@value``)."""
    return VARIANTS.get(ensure_variant(name))


def ensure_variant(name: str) -> str:
    """The canonical name of ``name``, registering a swept ``base@value`` on first use.

    ``base@value`` is ``base`` with its :attr:`Variant.param` option set to ``value``; unknown
    bases list the known variants, bases without a swept parameter say so.
    """
    if "@" not in name or name in VARIANTS:
        return VARIANTS.canonical(name)
    base_name, text = name.split("@", 1)
    base = VARIANTS.get(base_name)
    if base.param is None:
        swept = [n for n in VARIANTS.names() if VARIANTS.get(n).param]
        raise ValueError(f"variant {base.name!r} has no swept parameter; sweepable: {swept}")
    try:
        value = float(text)
    except ValueError as err:
        raise ValueError(f"variant {name!r}: {text!r} is not a number") from err
    if base.param == "ghost_batch_size":
        value = int(value)
    canonical = f"{base.name}@{value:g}"
    if canonical not in VARIANTS:

        def prepare(model: nn.Module, config: EvalConfig) -> nn.Module:
            options = dataclasses.replace(config.options, **{base.param: value})
            return base.prepare(model, dataclasses.replace(config, options=options))

        register_variant(
            dataclasses.replace(
                base,
                name=canonical,
                description=f"{base.description}; {base.param} = {value:g}",
                prepare=prepare,
                param=None,
            )
        )
    return canonical


def replace_batchnorm(model: nn.Module, factory: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    """Replace every ``nn.BatchNorm*d`` of ``model`` by ``factory(bn)``; returns the model."""
    if isinstance(model, _BatchNorm):
        return factory(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(module, child_name, factory(child))
    return model


class ChannelBias(nn.Module):
    """A learnable per-channel bias (dimension 1), zero-initialised: what ``none`` keeps of BN.

    BatchNorm's ``beta`` is the only bias of a ``Conv(bias=False)``-BN block; removing the layer
    without keeping it would compare "no normalization" with "no bias" at the same time.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, input: Tensor) -> Tensor:
        return input + self.bias.view(1, -1, *([1] * (input.dim() - 2)))

    def extra_repr(self) -> str:
        return f"{self.num_features}"


def groupnorm_groups(num_channels: int, channels_per_group: int, layer: str = "") -> int:
    """Groups of the ``groupnorm`` variant for a layer of ``num_channels`` channels.

    Rule: the largest divisor ``g`` of ``C`` with ``C / g >= channels_per_group`` and
    ``g >= 2``, so every group holds at least ``channels_per_group`` channels (exactly that
    many when ``C`` is divisible). Layers too narrow for that (``C < 2 * channels_per_group``)
    take the largest ``g >= 2`` with at least two channels per group. A layer that admits no
    GroupNorm distinct from InstanceNorm and LayerNorm (``C < 4`` or ``C`` prime) is an error:
    the variant would otherwise be mislabelled.
    """
    if channels_per_group < 2:
        raise ValueError(
            f"groupnorm_channels_per_group must be >= 2 (1 is the instancenorm variant), "
            f"got {channels_per_group}"
        )
    divisors = [g for g in range(2, num_channels // 2 + 1) if num_channels % g == 0]
    wide = [g for g in divisors if num_channels // g >= channels_per_group]
    if wide:
        return max(wide)
    if divisors:
        return max(divisors)
    where = f"layer {layer!r}" if layer else "a layer"
    raise ValueError(
        f"groupnorm variant: {where} has {num_channels} channels, which admit no GroupNorm with "
        "2 or more groups of 2 or more channels; use the instancenorm or layernorm variant, or "
        "a model whose normalized layers have a composite number of channels >= 4"
    )


def describe_norm_layers(model: nn.Module) -> str:
    """One line of the model's normalization layers, e.g. ``GroupNorm 4x4, 8x4`` (groups x
    channels per group), for reports; repeated layouts are counted (``3 x BatchNorm2d(32)``)."""
    parts: list[str] = []
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            c, g = module.num_channels, module.num_groups
            kind = "InstanceNorm" if g == c else "LayerNorm" if g == 1 else "GroupNorm"
            parts.append(f"{kind} {g}x{c // g}")
        elif isinstance(module, ChannelBias):
            parts.append(f"bias({module.num_features})")
        elif isinstance(module, (_BatchNorm, safenorm.SafeBatchNormBase)):
            parts.append(f"{type(module).__name__}({module.num_features})")
    if not parts:
        return "no normalization layers"
    counted: list[str] = []
    for part in dict.fromkeys(parts):
        n = parts.count(part)
        counted.append(f"{n} x {part}" if n > 1 else part)
    return ", ".join(counted)


def _identity(model: nn.Module, config: EvalConfig) -> nn.Module:
    return model


def _ghost(model: nn.Module, config: EvalConfig) -> nn.Module:
    return safenorm.convert_batchnorm(
        model, "ghost", ghost_batch_size=config.options.ghost_batch_size
    )


def _clipped(model: nn.Module, config: EvalConfig) -> nn.Module:
    from safenorm.convert import target_class
    from safenorm.modules.clipped import (
        DEFAULT_MEAN_CLIP_PER_CHANNEL,
        DEFAULT_VAR_CLIP_PER_CHANNEL,
    )

    o = config.options

    def bound(value: float | None, per_channel: float, c: int) -> float:
        # the layer's default (per_channel * sqrt(C)) when unset; clip_scale scales either
        return o.clip_scale * (value if value is not None else per_channel * math.sqrt(c))

    def convert(bn: _BatchNorm) -> nn.Module:
        c = bn.num_features
        return target_class(bn, "clipped").from_batchnorm(
            bn,
            clip_norm=bound(o.clip_norm, DEFAULT_MEAN_CLIP_PER_CHANNEL, c),
            var_clip_norm=bound(o.var_clip_norm, DEFAULT_VAR_CLIP_PER_CHANNEL, c),
        )

    return replace_batchnorm(model, convert)


def _dp(model: nn.Module, config: EvalConfig) -> nn.Module:
    # The statistics' noise is set by the trainer from config.dp.statistics_share.
    return safenorm.convert_batchnorm(model, "dp")


def _named_replace(model: nn.Module, factory: Callable[[_BatchNorm, str], nn.Module]) -> nn.Module:
    names = {id(m): n for n, m in model.named_modules()}
    return replace_batchnorm(model, lambda bn: factory(bn, names.get(id(bn), "")))


def _groupnorm(model: nn.Module, config: EvalConfig) -> nn.Module:
    cpg = config.options.groupnorm_channels_per_group
    return _named_replace(
        model,
        lambda bn, name: nn.GroupNorm(
            groupnorm_groups(bn.num_features, cpg, name), bn.num_features, eps=bn.eps
        ),
    )


def _instancenorm(model: nn.Module, config: EvalConfig) -> nn.Module:
    return replace_batchnorm(
        model, lambda bn: nn.GroupNorm(bn.num_features, bn.num_features, eps=bn.eps)
    )


def _layernorm(model: nn.Module, config: EvalConfig) -> nn.Module:
    return replace_batchnorm(model, lambda bn: nn.GroupNorm(1, bn.num_features, eps=bn.eps))


def _opacus_fix(model: nn.Module, config: EvalConfig) -> nn.Module:
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


def _none(model: nn.Module, config: EvalConfig) -> nn.Module:
    return replace_batchnorm(model, lambda bn: ChannelBias(bn.num_features))


register_variant(
    Variant("bn", "nn.BatchNorm (the reference)", _identity, batch_coupled=True),
    aliases=("batchnorm", "standard"),
)
register_variant(
    Variant(
        "ghost",
        "GhostBatchNorm: groups of ghost_batch_size",
        _ghost,
        batch_coupled=True,
        param="ghost_batch_size",
    ),
    aliases=("ghost-bn", "gbn"),
)
register_variant(
    Variant(
        "clipped",
        "ClippedBatchNorm: per-sample-clipped statistics",
        _clipped,
        batch_coupled=True,
        param="clip_scale",
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
        "opacus-fix",
        "DP-SGD after Opacus' ModuleValidator.fix (GroupNorm(min(32, C), C)), the DP baseline",
        _opacus_fix,
        trainer="dpsgd-opacus",
        dp=True,
        requires=("opacus",),
    ),
    aliases=("dp-groupnorm", "dp-gn", "opacus"),
)
register_variant(
    Variant(
        "groupnorm",
        "GroupNorm (groupnorm_channels_per_group channels per group), non-DP",
        _groupnorm,
    ),
    aliases=("gn",),
)
register_variant(
    Variant(
        "instancenorm", "InstanceNorm (GroupNorm, one channel per group), non-DP", _instancenorm
    ),
    aliases=("in", "instance-norm"),
)
register_variant(
    Variant("layernorm", "LayerNorm (GroupNorm, one group), non-DP", _layernorm),
    aliases=("ln", "layer-norm"),
)
register_variant(
    Variant("none", "no normalization (a per-channel bias where BN stood), non-DP", _none),
    aliases=("identity", "no-norm"),
)
