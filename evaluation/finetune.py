"""DP fine-tuning study: a BatchNorm model pretrained on public data, fine-tuned with DP-SGD.

The use case BatchNorm users actually have: a BN network trained (non-privately) on public data
is adapted to a private task with DP-SGD. Does safenorm beat what users do today?

Protocol (fixed before any run):

* Data: digits (8x8). **Public** = classes 0-4 (all their images): pretraining, non-private
  (Adam, ``pretrain_epochs``), of the study's BatchNorm CNN (:func:`digits_dp_cnn`) and of the
  same CNN with ``GroupNorm(C / 4, C)`` (4 channels per group). Pretraining is seeded by the
  run's seed. **Private** = classes 5-9 (relabelled 0-4) with a new, freshly initialized head;
  a stratified test split, and a validation split carved out of the training split, as in
  :mod:`safenorm.evaluation.utility`. Inputs are standardized with the *public* pixel mean and
  std (the private ones would be an unaccounted release).
* Tasks: ``plain`` (the private images as they are) and ``rotated`` (every private image
  rotated by 90 degrees). Rotation is the harder shift chosen because it keeps the pixel
  histogram (so the first layer's public statistics stay roughly valid, and the shift is one of
  *features*, not of input scale) while making the pretrained features a poor fit: a linear
  probe can no longer read the classes off them and the whole network must adapt, while
  pretrained low-level filters were expected to still help at every epsilon. Contrast
  inversion was not chosen: it flips the sign of every first-layer response, which mostly
  tests how fast the statistics re-estimate.
  ``rotated-scarce``: the same rotation with only 30% of the private training split (stratified;
  the test split unchanged), added after the first pass over ``plain`` and ``rotated`` showed
  that DP training *from scratch* (``scratch-groupnorm``) matches the pretrained methods on
  both (about 720 private samples make these 5 classes easy even under DP noise): with fewer
  samples each one carries more noise, which is where a pretrained network can matter.
* Methods (each a registry entry, :data:`METHODS`); full fine-tuning unless said otherwise:

  - ``opacus-fix`` (anchor): the BN-pretrained model through Opacus' ``ModuleValidator.fix``
    (BatchNorm -> fresh ``GroupNorm(min(32, C), C)``, i.e. InstanceNorm here), plain
    ``opacus.PrivacyEngine``: what users do today;
  - ``groupnorm-pretrained`` (anchor): the GroupNorm(4 channels/group)-pretrained model;
  - ``linear-probe`` (anchor): DP-SGD on the new head only, over the frozen BN-pretrained
    features (BatchNorm in eval mode with its public statistics);
  - ``frozen-stats`` (safenorm): ``convert_batchnorm(model, "dp", frozen_statistics=True)``:
    normalize with the public statistics, nothing released;
  - ``frozen-stats-bitfit`` (safenorm): as ``frozen-stats``, training only the normalization
    affine parameters and the head (DP-BiTFiT style: few parameters, little noise);
  - ``released-stats`` (safenorm): ``convert_batchnorm(model, "dp", statistics_are_public=True)``:
    DP-released statistics seeded from the public ones, with ``momentum = released_momentum``
    (0.01). A finite momentum on purpose: with ``momentum=None`` the cumulative average would
    continue from the pretrained ``num_batches_tracked`` (weight ``1 / (n + t)``), so the
    statistics would barely move while every release still spends budget. The statistics get
    ``statistics_share`` (10%) of the budget;
  - ``frozen-stats-projection``, ``released-stats-projection`` (safenorm, added after the
    first two passes, with the from-scratch study's ``project_gradient=True``): as
    ``frozen-stats`` / ``released-stats`` with the per-sample projected backward (InstanceNorm's
    backward direction, which Opacus' fix has);
  - ``released-stats-fast`` (safenorm, added with them): ``released-stats`` with BatchNorm's
    momentum 0.1. With 0.01 the running statistics move only ``1 - 0.99^T`` of the way to the
    private data in ``T`` steps (30% in the ~35 steps of ``rotated-scarce``), so a shifted task
    keeps normalizing with mostly public statistics; 0.1 follows within ~20 steps, with ~3x the
    noise std in the averaged statistics (``sqrt(m / (2 - m))``);
  - ``scratch-groupnorm`` (reference, not an anchor): the GroupNorm(4 channels/group) CNN
    trained from scratch on the private data: shows whether pretraining matters at an epsilon.

* Privacy: epsilon 1, 3, 8 at delta 1e-5; every method is calibrated with
  ``make_private_with_epsilon`` (Poisson sampling, per-sample clipping at ``max_grad_norm``).
  Only the private fine-tuning is accounted (pretraining touches public data only).
* Tuning (lr per cell on the validation split, the grid widened past a winning end point),
  report (paired differences to the best anchor), decision rule and the goal's verdict: the
  shared protocol of :mod:`safenorm.evaluation.dpstudy` (goal margin 0: at or above the best
  anchor; ``validation_repeats`` was 1 in the first study).

Runs are cached one JSON line per run in ``runs.jsonl`` (:mod:`~safenorm.evaluation.dpstudy`),
so an interrupted study resumes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safenorm.evaluation.dpstudy import (
    Method,
    Study,
    dp_train_and_score,
    method_of,
    report,
    run_study,
    schedule_text,
    train_and_evaluation_data,
)
from safenorm.evaluation.dpstudy import widen_grid as widen_grid
from safenorm.evaluation.models import digits_dp_cnn, swap_batchnorm
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "TASKS",
    "FinetuneConfig",
    "FinetuneMethod",
    "Task",
    "build_method",
    "finetune_report",
    "run_finetune_study",
    "train_and_score",
]

#: Private classes (the public ones are the others).
PRIVATE_CLASSES = (5, 6, 7, 8, 9)


@dataclass
class FinetuneConfig:
    """The study's protocol (see the module docstring).

    Attributes:
        tasks: private tasks, keys of :data:`TASKS`.
        methods: keys of :data:`METHODS`.
        epsilons, delta: privacy targets of the fine-tuning.
        seeds: seeds of the final runs (pretraining, head initialization and DP noise).
        lrs: initial learning-rate grid (widened past an end point chosen on validation).
        max_lr_extensions: how many times one (task, method, epsilon) grid may be widened.
        epochs, batch_size, max_grad_norm: DP-SGD schedule (expected batch size, Poisson).
        statistics_share: budget share of the released statistics (``released-stats``).
        released_momentum: running-statistics momentum of ``released-stats``.
        pretrain_epochs, pretrain_lr, pretrain_batch_size: public, non-private pretraining (Adam).
        test_fraction, validation_fraction: stratified splits of the private data.
        validation_seed: seed of the (first) lr-selection run.
        validation_repeats: lr-selection runs per grid point (seeds ``validation_seed + k``),
            averaged: one run on a small validation split makes a noisy choice.
        workers: parallel training processes (one torch thread each; 1 runs in this process).
    """

    tasks: tuple[str, ...] = ("plain", "rotated", "rotated-scarce")
    methods: tuple[str, ...] = (
        "opacus-fix",
        "groupnorm-pretrained",
        "linear-probe",
        "frozen-stats",
        "frozen-stats-bitfit",
        "released-stats",
        "frozen-stats-projection",
        "released-stats-projection",
        "released-stats-fast",
        "scratch-groupnorm",
    )
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    delta: float = 1e-5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lrs: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    max_lr_extensions: int = 3
    epochs: int = 10
    batch_size: int = 64
    max_grad_norm: float = 1.0
    statistics_share: float = 0.1
    released_momentum: float = 0.01
    pretrain_epochs: int = 15
    pretrain_lr: float = 0.01
    pretrain_batch_size: int = 64
    test_fraction: float = 0.2
    validation_fraction: float = 0.2
    validation_seed: int = 1000
    validation_repeats: int = 1
    workers: int = 2


# ----------------------------------------------------------------------------- data


def _rotate(x: Tensor) -> Tensor:
    return torch.rot90(x, 1, dims=(2, 3))


@dataclass(frozen=True)
class Task:
    """A private task: a transform of the private images and the share of the training split kept.

    ``train_fraction < 1`` keeps a stratified subset of the private training split (the test
    split is unchanged): fewer private samples, so more noise per sample under DP-SGD.
    """

    transform: Callable[[Tensor], Tensor]
    train_fraction: float = 1.0


#: The private tasks (applied to the private images before standardization).
TASKS: dict[str, Task] = {
    "plain": Task(lambda x: x),
    "rotated": Task(_rotate),
    "rotated-scarce": Task(_rotate, train_fraction=0.3),
}


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _splits(task: str, test_fraction: float, validation_fraction: float) -> dict[str, Any]:
    """``public``, and the private ``train``, ``fit`` + ``validation`` (of train), ``test``."""
    from sklearn.model_selection import train_test_split

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    x, y = _digits()
    private = torch.isin(y, torch.tensor(PRIVATE_CLASSES))
    x_pub, y_pub = x[~private], y[~private]
    spec = TASKS[task]
    x_priv, y_priv = spec.transform(x[private]), y[private] - min(PRIVATE_CLASSES)
    mean, std = x_pub.mean(), x_pub.std()  # public statistics: no release needed
    norm = lambda t: (t - mean) / std  # noqa: E731
    x_tr, x_te, y_tr, y_te = train_test_split(
        x_priv, y_priv, test_size=test_fraction, random_state=0, stratify=y_priv
    )
    if spec.train_fraction < 1:
        x_tr, _, y_tr, _ = train_test_split(
            x_tr, y_tr, train_size=spec.train_fraction, random_state=2, stratify=y_tr
        )
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_tr, y_tr, test_size=validation_fraction, random_state=1, stratify=y_tr
    )
    return {
        "public": (norm(x_pub), y_pub),
        "train": (norm(x_tr), y_tr),
        "fit": (norm(x_fit), y_fit),
        "validation": (norm(x_val), y_val),
        "test": (norm(x_te), y_te),
    }


# ----------------------------------------------------------------------------- pretraining


def groupnorm_dp_cnn(num_classes: int = 10, channels_per_group: int = 4) -> nn.Module:
    """:func:`digits_dp_cnn` with ``GroupNorm(C / channels_per_group, C)`` for each BatchNorm."""
    return swap_batchnorm(
        digits_dp_cnn(num_classes), lambda c: nn.GroupNorm(c // channels_per_group, c)
    )


_ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "batchnorm": digits_dp_cnn,
    "groupnorm": groupnorm_dp_cnn,
}


@functools.lru_cache(maxsize=64)
def _pretrained_state(arch: str, seed: int, config_items: tuple) -> dict[str, Tensor]:
    """The state of ``arch`` pretrained (non-privately) on the public classes."""
    config = FinetuneConfig(**dict(config_items))
    x, y = _splits("plain", config.test_fraction, config.validation_fraction)["public"]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _ARCHITECTURES[arch](len(PRIVATE_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.pretrain_lr)
    model.train()
    for _ in range(config.pretrain_epochs):
        order = torch.randperm(len(y), generator=generator)
        for idx in order.split(config.pretrain_batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained(arch: str, seed: int, config: FinetuneConfig) -> nn.Module:
    """A fresh copy of the public-data pretrained ``arch`` (``"batchnorm"``/``"groupnorm"``)."""
    model = _ARCHITECTURES[arch](len(PRIVATE_CLASSES))
    model.load_state_dict(_pretrained_state(arch, seed, tuple(sorted(asdict(config).items()))))
    return model


def _new_head(model: nn.Sequential) -> nn.Sequential:
    """Replace the public head by a freshly initialized one for the private classes."""
    old = model[-1]
    model[-1] = nn.Linear(old.in_features, len(PRIVATE_CLASSES))
    return model


# ----------------------------------------------------------------------------- methods


class FrozenFeatures(nn.Module):
    """A feature extractor used as a constant function: eval mode, no gradient, no parameters.

    The body is held outside the module tree, so DP-SGD (and its validator) see only the head:
    its BatchNorm stays in eval mode with the public statistics whatever ``train()`` is called.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "body", body.eval().requires_grad_(False))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.body.eval()(x)


FinetuneMethod = Method  # one method of the study (:class:`dpstudy.Method`)


def _opacus_fix(seed: int, config: FinetuneConfig) -> nn.Module:
    from opacus.validators import ModuleValidator

    return _new_head(ModuleValidator.fix(pretrained("batchnorm", seed, config)))


def _groupnorm_pretrained(seed: int, config: FinetuneConfig) -> nn.Module:
    return _new_head(pretrained("groupnorm", seed, config))


def _scratch(seed: int, config: FinetuneConfig) -> nn.Module:
    torch.manual_seed(seed)
    return groupnorm_dp_cnn(len(PRIVATE_CLASSES))


def _linear_probe(seed: int, config: FinetuneConfig) -> nn.Module:
    model = pretrained("batchnorm", seed, config)
    head = nn.Linear(model[-1].in_features, len(PRIVATE_CLASSES))
    return nn.Sequential(FrozenFeatures(model[:-1]), head)


def _frozen_stats(seed: int, config: FinetuneConfig, **options: Any) -> nn.Module:
    import safenorm

    model = pretrained("batchnorm", seed, config)
    return _new_head(safenorm.convert_batchnorm(model, "dp", frozen_statistics=True, **options))


def _frozen_stats_bitfit(seed: int, config: FinetuneConfig) -> nn.Module:
    import safenorm

    model = _frozen_stats(seed, config)
    model.requires_grad_(False)
    for layer in model.modules():
        if isinstance(layer, safenorm.DPBatchNorm):
            layer.requires_grad_(True)
    model[-1].requires_grad_(True)
    return model


def _released_stats(
    seed: int, config: FinetuneConfig, momentum: float | None = None, **options: Any
) -> nn.Module:
    import safenorm

    model = pretrained("batchnorm", seed, config)
    momentum = config.released_momentum if momentum is None else momentum
    model = safenorm.convert_batchnorm(
        model, "dp", statistics_are_public=True, momentum=momentum, **options
    )
    return _new_head(model)


#: ``released-stats-fast``'s momentum: BatchNorm's default, for short fine-tuning runs.
FAST_MOMENTUM = 0.1


def _projected(build: Callable[..., nn.Module]) -> Callable[[int, FinetuneConfig], nn.Module]:
    return lambda seed, config: build(seed, config, project_gradient=True)


#: The study's methods (see the module docstring).
METHODS: dict[str, FinetuneMethod] = {
    "opacus-fix": FinetuneMethod(_opacus_fix, False, "opacus", anchor=True),
    "groupnorm-pretrained": FinetuneMethod(_groupnorm_pretrained, False, "opacus", anchor=True),
    "linear-probe": FinetuneMethod(_linear_probe, False, "opacus", anchor=True),
    "scratch-groupnorm": FinetuneMethod(_scratch, False, "opacus"),
    "frozen-stats": FinetuneMethod(_frozen_stats, safenorm=True, engine="safenorm"),
    "frozen-stats-bitfit": FinetuneMethod(_frozen_stats_bitfit, safenorm=True, engine="safenorm"),
    "released-stats": FinetuneMethod(_released_stats, safenorm=True, engine="safenorm"),
    "frozen-stats-projection": FinetuneMethod(
        _projected(_frozen_stats), safenorm=True, engine="safenorm"
    ),
    "released-stats-projection": FinetuneMethod(
        _projected(_released_stats), safenorm=True, engine="safenorm"
    ),
    "released-stats-fast": FinetuneMethod(
        lambda seed, config: _released_stats(seed, config, momentum=FAST_MOMENTUM),
        safenorm=True,
        engine="safenorm",
    ),
}


def build_method(method: str, seed: int, config: FinetuneConfig) -> nn.Module:
    """The model of ``method`` (pretrained, with a new head, seeded by ``seed``)."""
    return method_of("fine-tuning", METHODS, method).build(seed, config)


# ----------------------------------------------------------------------------- training


def train_and_score(
    method: str,
    task: str,
    epsilon: float,
    lr: float,
    seed: int,
    split: str,
    config: FinetuneConfig,
) -> dict[str, Any]:
    """Fine-tune ``method`` with DP-SGD at ``(epsilon, delta)``; score on validation or test.

    ``split="validation"`` trains on ``fit`` and scores ``validation``; ``"test"`` trains on
    ``train`` and scores ``test``. After pretraining, ``torch.manual_seed(seed)``: the same
    noise stream for every method (:func:`~safenorm.evaluation.dpstudy.dp_train_and_score`).
    """
    train, evaluate = train_and_evaluation_data(
        _splits(task, config.test_fraction, config.validation_fraction), split
    )
    model = build_method(method, seed, config)
    return dp_train_and_score(model, METHODS[method], train, evaluate, epsilon, lr, seed, config)


# ----------------------------------------------------------------------------- study


def _intro(config: dict[str, Any]) -> str:
    return (
        "Public classes 0-4 (non-private pretraining), private classes 5-9 with a new head; "
        f"{schedule_text(config)}; lr per (task, method, epsilon) from validation over "
        f"{config['lrs']} (widened past an end point when one wins). Test accuracy: mean ± 95% "
        "t-interval over seeds. "
        "`released-stats` gives its statistics "
        f"{config['statistics_share']:.0%} of the budget, momentum {config['released_momentum']}."
        " (S) marks safenorm's methods."
    )


#: The fine-tuning study for :func:`~safenorm.evaluation.dpstudy.run_study`.
FINETUNE_STUDY = Study(
    name="finetune",
    label="fine-tuning",
    methods=METHODS,
    train=train_and_score,
    defaults=FinetuneConfig(),
    title="DP fine-tuning of a BatchNorm-pretrained CNN on digits",
    intro=_intro,
    plot_title=lambda task: f"DP fine-tuning on digits 5-9: {task}",
)


def run_finetune_study(
    config: FinetuneConfig, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; write ``finetune.{json,md,png}``.

    Returns:
        The summary written to ``finetune.json``.
    """
    return run_study(FINETUNE_STUDY, config, out, log)


def finetune_report(summary: dict[str, Any]) -> str:
    """Markdown: accuracy table per task, paired differences to the best anchor, verdicts."""
    return report(FINETUNE_STUDY, summary)
