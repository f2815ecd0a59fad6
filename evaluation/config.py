"""Typed configuration of an evaluation run, and the named profiles (``quick``, ``full``...).

Every field has a default; a profile is a function returning an :class:`EvalConfig`. Configs
round-trip through JSON (``to_dict`` / ``from_dict``), which is how a run records what it did and
how ``--set section.field=value`` overrides reach a typed field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from safenorm.evaluation.registry import Registry

__all__ = [
    "PROFILES",
    "AnalysisConfig",
    "AttackConfig",
    "CanaryConfig",
    "DPConfig",
    "DataConfig",
    "EvalConfig",
    "TrainConfig",
    "VariantOptions",
    "apply_overrides",
    "get_profile",
]


@dataclass
class DataConfig:
    """Which data, and how it is split.

    Attributes:
        dataset: a registered dataset (``digits``, ``cifar10``, ``synthetic``).
        root: directory of on-disk datasets (CIFAR-10 python-pickle batches).
        pool_size: candidate training examples; each model trains on a random half.
        test_size: held-out examples (test accuracy, RMIA population, batch mates).
        synthetic_size, synthetic_classes, synthetic_shape: the synthetic dataset's size.
    """

    dataset: str = "digits"
    root: str | None = None
    pool_size: int = 1000
    test_size: int = 500
    synthetic_size: int = 1200
    synthetic_classes: int = 4
    synthetic_shape: tuple[int, int, int] = (1, 8, 8)


@dataclass
class CanaryConfig:
    """Out-of-distribution canaries, each inserted in about half of the models.

    Attributes:
        types: registered canary types (``mislabeled``, ``noise``, ``blank``, ``ood``).
        per_type: inserted canaries of each type.
        references_per_type: never-inserted reference canaries of each type (exposure ranks).
    """

    types: tuple[str, ...] = ("mislabeled", "noise", "blank", "ood")
    per_type: int = 8
    references_per_type: int = 63


@dataclass
class TrainConfig:
    """The (non-DP) training schedule, shared by every variant.

    Attributes:
        epochs: passes over each model's training set.
        batch_size: batch size (the expected batch size under DP-SGD's Poisson sampling).
        lr, momentum, weight_decay: SGD hyper-parameters (cosine learning-rate decay).
        augment: random crops and horizontal flips (CIFAR-style images only).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False


@dataclass
class DPConfig:
    """DP-SGD settings of the DP variants.

    Attributes:
        noise_multiplier: gradient noise multiplier.
        max_grad_norm: per-sample clipping bound.
        delta: the delta of the reported epsilon and of the audit.
        lr: learning rate of DP-SGD (usually larger than the non-DP one).
        momentum: SGD momentum of DP-SGD.
        epochs: DP-SGD epochs (``None``: the non-DP ``epochs``).
        statistics_share: share of each step's privacy budget (``1 / noise_multiplier^2``)
            given to DPBatchNorm's statistics releases; the gradient noise is raised so that the
            step's ``sigma_eff`` is ``noise_multiplier``, so ``dp`` and ``dp-groupnorm`` spend the
            same epsilon.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    lr: float = 1.0
    momentum: float = 0.0
    epochs: int | None = None
    statistics_share: float = 0.1


@dataclass
class VariantOptions:
    """Per-variant layer arguments.

    Attributes:
        ghost_batch_size: group size of the ``ghost`` variant.
        clip_norm, var_clip_norm: bounds of the ``clipped`` variant (``None``: the layer
            defaults, ``2 sqrt(C)`` and ``4 sqrt(C)``).
        clip_scale: factor on both bounds of the ``clipped`` variant (the frontier sweep's
            ``clipped@0.5`` is half the bounds).
        groupnorm_channels_per_group: channels in each group of the ``groupnorm`` variant
            (the rule for layers not divisible by it: :func:`~safenorm.evaluation.variants.
            groupnorm_groups`); 1 would be InstanceNorm, which is its own variant.
    """

    ghost_batch_size: int = 16
    clip_norm: float | None = None
    var_clip_norm: float | None = None
    clip_scale: float = 1.0
    groupnorm_channels_per_group: int = 4


@dataclass
class AttackConfig:
    """Membership-inference attacks, their metrics and the DP audit.

    Attributes:
        attacks: registered attacks to run (``loss``, ``lira-offline``, ``lira-online``, ``rmia``,
            ``rmia-offline``).
        headline: the attack shown in the summary table.
        fprs: false-positive rates at which TPR is reported.
        ci: confidence-interval method (``bootstrap``: resample whole examples and whole models,
            the one that covers in the harness's design; ``examples``, ``pairs`` and ``analytic``
            assume more, see ``safenorm.evaluation.metrics.CI_METHODS``).
        confidence: coverage of the intervals.
        bootstrap: replicates of the resampling interval methods.
        rmia_gamma: RMIA's likelihood-ratio threshold.
        audit_confidence: confidence of the one-run audit's lower bound.
        audit_guess_fractions: fractions of audit examples guessed "in" (and as many "out");
            the bound is Bonferroni-corrected over these and over the models. The audit
            examples are all candidates (pool plus inserted canaries): more audit canaries come
            from ``canaries.per_type``; the report shows the largest bound the audit could
            reach with its m (see ``safenorm.evaluation.audit``: at ``dp.delta = 1e-5`` more
            canaries lower that ceiling, a smaller ``dp.delta`` lifts it).
        train_mode_queries: also attack train-mode (batch-statistics) queries, reported as a
            separate threat model.
    """

    attacks: tuple[str, ...] = ("loss", "lira-offline", "lira-online", "rmia", "rmia-offline")
    headline: str = "lira-online"
    fprs: tuple[float, ...] = (0.01, 0.001)
    ci: str = "bootstrap"
    confidence: float = 0.95
    bootstrap: int = 200
    rmia_gamma: float = 1.0
    audit_confidence: float = 0.95
    audit_guess_fractions: tuple[float, ...] = (0.01, 0.03, 0.1)
    train_mode_queries: bool = True


@dataclass
class AnalysisConfig:
    """Per-model measurements beyond the scores.

    Attributes:
        grad_models: models (the first ones of each variant) whose per-sample gradient norms and
            batch-statistics influence are measured.
        grad_typical: typical pool examples measured beside all canaries.
        batch_mates: size of the batch a queried sample is placed in (train-mode gradients,
            influence, train-mode queries).
    """

    grad_models: int = 2
    grad_typical: int = 128
    batch_mates: int = 32


@dataclass
class EvalConfig:
    """One evaluation run.

    Attributes:
        profile: the profile it came from (informational).
        seed: master seed: split, canaries, membership masks, model initialisations, data
            order, noise.
        seeds: repeat the whole protocol over these master seeds (empty: ``seed`` only); a
            multi-seed run is a :class:`~safenorm.evaluation.study.Study` reporting means with
            intervals over seeds and paired differences to ``bn``.
        models: repeat it over these registered models too (empty: ``model`` only).
        variants: registered variant names, in report order (``bn`` is the reference).
        num_models: models per variant; each is the target once, the others its shadows.
        model: a registered model name (``auto``: ``small-cnn`` for 8x8 inputs, else ``resnet``).
        device: ``auto``, ``cpu``, ``cuda``...
        threads: torch CPU threads while training and scoring (0: torch's default). Default 1:
            the models are small, and several threads on a busy machine are up to 10x slower.
    """

    profile: str = "custom"
    seed: int = 0
    seeds: tuple[int, ...] = ()
    models: tuple[str, ...] = ()
    variants: tuple[str, ...] = (
        "bn",
        "ghost",
        "clipped",
        "dp",
        "opacus-fix",
        "groupnorm",
        "instancenorm",
        "layernorm",
        "none",
    )
    num_models: int = 16
    model: str = "auto"
    device: str = "auto"
    threads: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    canaries: CanaryConfig = field(default_factory=CanaryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    options: VariantOptions = field(default_factory=VariantOptions)
    attacks: AttackConfig = field(default_factory=AttackConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``KeyError``."""
        return _from_dict(cls, data)

    def model_fingerprint(self, variant: str) -> str:
        """Hash of everything that determines the trained models and their scores.

        Excludes ``num_models`` (adding models reuses the cached ones), the variant list, the
        attack settings (recomputed from the raw scores), ``device``, ``threads`` and the
        multi-seed lists (a cell of a study has its own ``seed`` and ``model``).
        """
        d = self.to_dict()
        for k in (
            "profile",
            "variants",
            "num_models",
            "device",
            "threads",
            "attacks",
            "seeds",
            "models",
        ):
            d.pop(k)
        d["variant"] = variant
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise KeyError(
            f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, tuple):
        items = [t for t in text.split(",") if t]
        if current:
            return tuple(type(current[0])(t) for t in items)
        return tuple(_scalar(t) for t in items)  # an empty default: numbers stay numbers
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float) or current is None:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def _scalar(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def apply_overrides(config: EvalConfig, overrides: list[str]) -> EvalConfig:
    """Apply ``section.field=value`` (or ``field=value``) strings; returns a new config.

    Tuple fields take comma-separated values (``attacks.fprs=0.01,0.001``).
    """
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        node: Any = config
        parent = data
        for part in path[:-1]:
            if not hasattr(node, part):
                raise KeyError(f"unknown config section {part!r} in {key!r}")
            node = getattr(node, part)
            parent = parent[part]
        leaf = path[-1]
        if not hasattr(node, leaf):
            raise KeyError(f"unknown config field {leaf!r} in {key!r}")
        value = _parse_value(text.strip(), getattr(node, leaf))
        parent[leaf] = list(value) if isinstance(value, tuple) else value
    return EvalConfig.from_dict(data)


Profile = Callable[[], EvalConfig]
PROFILES: Registry[Profile] = Registry("profile")


def _quick() -> EvalConfig:
    """Every variant on digits, 18 models each, on a 2-core CPU in under 10 minutes."""
    return EvalConfig(
        profile="quick",
        num_models=18,  # each target is attacked with 17 shadow models
        device="cpu",
        data=DataConfig(dataset="digits", pool_size=1000, test_size=500),
        canaries=CanaryConfig(per_type=8, references_per_type=63),
        train=TrainConfig(epochs=24, batch_size=64, lr=0.05),
        dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, lr=1.0, epochs=12),
    )


def _full() -> EvalConfig:
    """The GPU protocol: CIFAR-10, a ResNet, 32 models per variant (shard with --shard)."""
    return EvalConfig(
        profile="full",
        num_models=32,
        device="cuda",
        model="resnet",
        data=DataConfig(
            dataset="cifar10", root="data/cifar-10-batches-py", pool_size=50000, test_size=5000
        ),
        canaries=CanaryConfig(per_type=250, references_per_type=999),
        train=TrainConfig(epochs=60, batch_size=256, lr=0.1, weight_decay=5e-4, augment=True),
        dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, lr=2.0, epochs=30),
        options=VariantOptions(ghost_batch_size=32),
        analysis=AnalysisConfig(grad_models=2, grad_typical=512, batch_mates=64),
    )


def _tiny() -> EvalConfig:
    """Seconds: synthetic data, few models, for tests and smoke runs."""
    return EvalConfig(
        profile="tiny",
        num_models=4,
        device="cpu",
        variants=("bn", "groupnorm"),
        data=DataConfig(dataset="synthetic", pool_size=200, test_size=100, synthetic_size=400),
        canaries=CanaryConfig(per_type=4, references_per_type=15),
        train=TrainConfig(epochs=4, batch_size=32),
        dp=DPConfig(epochs=2),
        analysis=AnalysisConfig(grad_models=1, grad_typical=16, batch_mates=8),
        attacks=AttackConfig(audit_guess_fractions=(0.05,)),
    )


#: The variants the three findings are called against, and the batch-coupled safenorm layers.
_STANDARD_VARIANTS = ("bn", "ghost", "clipped", "groupnorm", "instancenorm", "layernorm", "none")


def _standard() -> EvalConfig:
    """The quick protocol over 3 seeds x 2 widths, reported over seeds (2-core CPU, ~45 min).

    Non-DP variants only (the DP ones are in ``quick`` and the ``utility`` study); 16 models
    per variant and cell. Resumable; ``--shard 0/2`` and ``1/2`` split every cell.
    """
    config = _quick()
    return dataclasses.replace(
        config,
        profile="standard",
        seeds=(0, 1, 2),
        models=("small-cnn", "small-cnn-wide"),
        num_models=16,
        variants=_STANDARD_VARIANTS,
    )


def _frontier() -> EvalConfig:
    """The standard protocol's narrow cells plus the ghost_batch_size and clip-bound sweep.

    Shares the ``small-cnn`` cells (and their cache) with ``standard``: copy a standard output
    directory and run this profile on the copy to train only the swept settings.
    """
    config = _standard()
    return dataclasses.replace(
        config,
        profile="frontier",
        models=("small-cnn",),
        variants=(
            "bn",
            "groupnorm",
            "instancenorm",
            "layernorm",
            "none",
            "ghost@2",
            "ghost@4",
            "ghost@8",
            "ghost",
            "ghost@32",
            "clipped@0.0625",
            "clipped@0.125",
            "clipped@0.25",
            "clipped@0.5",
            "clipped",
            "clipped@2",
        ),
    )


PROFILES.register("quick", _quick, aliases=("default", "cpu"))
PROFILES.register("standard", _standard, aliases=("seeds",))
PROFILES.register("frontier", _frontier, aliases=("sweep",))
PROFILES.register("full", _full, aliases=("gpu", "cifar10"))
PROFILES.register("tiny", _tiny, aliases=("smoke", "test"))


def get_profile(name: str) -> EvalConfig:
    """A fresh config of the registered profile ``name``."""
    return PROFILES.get(name)()
