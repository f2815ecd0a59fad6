"""Privacy-utility study from scratch: DP-SGD test accuracy at several epsilons, per
normalization, on digits (all 10 classes, no public data).

Protocol (fixed before any run):

* Data: digits (8x8), a stratified test split (20%) and a validation split (20% of the rest)
  carved out of the training split; pixels standardized with the training split's mean and
  std (a preprocessing constant of the study, not released by any model).
* Network: :func:`~safenorm.evaluation.models.digits_dp_cnn` (conv-norm-ReLU-pool twice, a
  linear head), the normalization swapped per method; ``-ws`` methods replace both
  convolutions by :class:`~safenorm.evaluation.models.WSConv2d` (weight standardization).
* Methods (:data:`METHODS`). Anchors, trained with plain ``opacus.PrivacyEngine``:

  - ``groupnorm``: ``GroupNorm(C / 4, C)`` (4 channels per group, the harness' and the
    fine-tuning study's GroupNorm);
  - ``opacus-fix``: Opacus' ``ModuleValidator.fix`` (``GroupNorm(min(32, C), C)``: one channel
    per group, i.e. InstanceNorm, on this 16/32-channel net), what users do today;
  - ``layernorm``: ``GroupNorm(1, C)`` (LayerNorm over channels and space, per-channel affine);
  - ``none``: no normalization (the convolutions keep their bias);
  - ``groupnorm-ws``: weight standardization + ``GroupNorm(C / 4, C)``, the recipe of De et al.
    2022.

  safenorm's, trained with :class:`safenorm.opacus.PrivacyEngine` (the statistics' releases
  get ``statistics_share`` of the budget, accounted with the gradient's):

  - ``dp``: :class:`safenorm.DPBatchNorm2d` with its defaults;
  - ``dp-log``: ``var_release="log"``, ``var_clip_norm = log_var_clip_per_channel * sqrt(C)``:
    the variance release that can grow with the activations;
  - ``dp-projection``: ``project_gradient=True`` (per-sample projected backward);
  - ``dp-ws``: weight standardization + DPBatchNorm2d (defaults);
  - ``dp-ws-projection``: weight standardization + ``project_gradient=True``;
  - ``dp-slow`` / ``dp-ws-slow`` (added after the first pass, from
    ``examples/scratch_exploration.py``, validation split only): ``momentum=0.03`` (the running
    statistics average about 65 releases' noise instead of 20) and a mean bound of
    ``0.5 sqrt(C)`` (half the mean release's noise), without / with weight standardization.

* Privacy: epsilon 1, 3, 8 at delta 1e-5, each method calibrated with
  ``make_private_with_epsilon`` (Poisson sampling, per-sample clipping at ``max_grad_norm``).
* Tuning, report, decision rule: :mod:`safenorm.evaluation.dpstudy` (lr per cell from the
  mean of ``validation_repeats`` validation runs, grid widened past a winning end point;
  paired differences of each safenorm method to the best anchor over the same seeds). Goal,
  set before the runs: the recipe (the safenorm method best on validation) at or above the
  best anchor at epsilon 3 and 8 and within 3 points of it at 1.
* Diagnostic: ``E[xhat^2]`` per DP layer over the last epoch (``xhat_sq`` in the runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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
from safenorm.evaluation.models import digits_dp_cnn, swap_batchnorm, weight_standardized
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "UTILITY_STUDY",
    "UtilityConfig",
    "build_method",
    "run_utility_study",
    "train_and_score",
    "utility_report",
]

DEFAULT_METHODS = (
    "groupnorm",
    "opacus-fix",
    "layernorm",
    "none",
    "groupnorm-ws",
    "dp",
    "dp-log",
    "dp-projection",
    "dp-ws",
    "dp-ws-projection",
    "dp-slow",
    "dp-ws-slow",
)

#: ``dp-slow``'s settings, chosen on the validation split at eps 1 (the exploration's best).
SLOW_MOMENTUM = 0.03
SLOW_MEAN_CLIP_PER_CHANNEL = 0.5


@dataclass
class UtilityConfig:
    """The study's protocol (see the module docstring).

    Attributes:
        tasks: ``("digits",)``, the one task (kept for the shared study machinery).
        methods: keys of :data:`METHODS`.
        epsilons, delta: privacy targets.
        seeds: seeds of the final runs (initialization, batches and noise).
        lrs: initial learning-rate grid (widened past an end point chosen on validation).
        max_lr_extensions: how many times one (method, epsilon) grid may be widened.
        epochs, batch_size, max_grad_norm: DP-SGD schedule (expected batch size, Poisson).
        statistics_share: budget share of the DP layers' statistics.
        log_var_clip_per_channel: ``dp-log``'s variance bound per channel, in log units.
        test_fraction, validation_fraction: stratified splits of digits.
        validation_seed, validation_repeats: lr-selection runs per grid point (seeds
            ``validation_seed + k``), averaged.
        workers: parallel training processes (one torch thread each; 1 runs in this process).
        dp_layer_options: extra DPBatchNorm2d arguments of every ``dp*`` method (exploration).
    """

    tasks: tuple[str, ...] = ("digits",)
    methods: tuple[str, ...] = DEFAULT_METHODS
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    delta: float = 1e-5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lrs: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    max_lr_extensions: int = 3
    epochs: int = 15
    batch_size: int = 128
    max_grad_norm: float = 1.0
    statistics_share: float = 0.1
    log_var_clip_per_channel: float = 0.5
    test_fraction: float = 0.2
    validation_fraction: float = 0.2
    validation_seed: int = 1000
    validation_repeats: int = 3
    workers: int = 2
    dp_layer_options: dict[str, Any] = field(default_factory=dict)


def _splits(config: UtilityConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """Standardized digits: ``train``, ``fit`` + ``validation`` (a split of train), ``test``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=config.test_fraction, random_state=0, stratify=y
    )
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_tr, y_tr, test_size=config.validation_fraction, random_state=1, stratify=y_tr
    )
    mean, std = x_tr.mean(), x_tr.std()  # statistics of the data only the trainer sees
    norm = lambda t: (t - mean) / std  # noqa: E731
    return {
        "train": (norm(x_tr), y_tr),
        "fit": (norm(x_fit), y_fit),
        "validation": (norm(x_val), y_val),
        "test": (norm(x_te), y_te),
    }


# ----------------------------------------------------------------------------- methods


def _normalized(make: Callable[[int], nn.Module], ws: bool = False) -> Callable:
    def build(seed: int, config: UtilityConfig) -> nn.Module:
        model = swap_batchnorm(digits_dp_cnn(), make)
        return weight_standardized(model) if ws else model

    return build


def _opacus_fix(seed: int, config: UtilityConfig) -> nn.Module:
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(digits_dp_cnn())


#: Per-channel DPBatchNorm2d arguments: ``options(channels, config) -> kwargs``.
ChannelOptions = Callable[[int, "UtilityConfig"], dict[str, Any]]


def _log_release(c: int, config: UtilityConfig) -> dict[str, Any]:
    return {"var_release": "log", "var_clip_norm": config.log_var_clip_per_channel * math.sqrt(c)}


def _slow(c: int, config: UtilityConfig) -> dict[str, Any]:
    return {"momentum": SLOW_MOMENTUM, "clip_norm": SLOW_MEAN_CLIP_PER_CHANNEL * math.sqrt(c)}


def _dp(*per_channel: ChannelOptions, ws: bool = False, **options: Any) -> Callable:
    import safenorm

    def build(seed: int, config: UtilityConfig) -> nn.Module:
        def layer(c: int) -> nn.Module:
            chosen = dict(options)
            for extra in per_channel:
                chosen.update(extra(c, config))
            return safenorm.DPBatchNorm2d(c, **chosen, **config.dp_layer_options)

        return _normalized(layer, ws)(seed, config)

    return build


def _groupnorm(c: int) -> nn.Module:
    return nn.GroupNorm(c // 4, c)


#: The study's methods (see the module docstring).
METHODS: dict[str, Method] = {
    "groupnorm": Method(_normalized(_groupnorm), False, "opacus", anchor=True),
    "opacus-fix": Method(_opacus_fix, False, "opacus", anchor=True),
    "layernorm": Method(_normalized(lambda c: nn.GroupNorm(1, c)), False, "opacus", anchor=True),
    "none": Method(_normalized(lambda c: nn.Identity()), False, "opacus", anchor=True),
    "groupnorm-ws": Method(_normalized(_groupnorm, ws=True), False, "opacus", anchor=True),
    "dp": Method(_dp(), True, "safenorm"),
    "dp-log": Method(_dp(_log_release), True, "safenorm"),
    "dp-projection": Method(_dp(project_gradient=True), True, "safenorm"),
    "dp-ws": Method(_dp(ws=True), True, "safenorm"),
    "dp-ws-projection": Method(_dp(ws=True, project_gradient=True), True, "safenorm"),
    "dp-slow": Method(_dp(_slow), True, "safenorm"),
    "dp-ws-slow": Method(_dp(_slow, ws=True), True, "safenorm"),
}


def build_method(method: str, seed: int, config: UtilityConfig) -> nn.Module:
    """The freshly initialized model of ``method`` (``torch.manual_seed(seed)`` first)."""
    spec = method_of("from-scratch", METHODS, method)
    torch.manual_seed(seed)
    return spec.build(seed, config)


# ----------------------------------------------------------------------------- training


def train_and_score(
    method: str,
    task: str,
    epsilon: float,
    lr: float,
    seed: int,
    split: str,
    config: UtilityConfig,
) -> dict[str, Any]:
    """Train ``method`` from scratch with DP-SGD at ``(epsilon, delta)`` on ``task``.

    ``split="validation"`` trains on ``fit`` and scores ``validation``; ``"test"`` trains on
    ``train`` and scores ``test``.
    """
    if task != "digits":
        raise ValueError(f"unknown from-scratch task {task!r}; known: ['digits']")
    train, evaluate = train_and_evaluation_data(_splits(config), split)
    model = build_method(method, seed, config)
    return dp_train_and_score(model, METHODS[method], train, evaluate, epsilon, lr, seed, config)


# ----------------------------------------------------------------------------- study


def _intro(config: dict[str, Any]) -> str:
    return (
        f"DP-SGD from scratch on digits (10 classes); {schedule_text(config)}; lr "
        f"per (method, epsilon) from the mean of {config['validation_repeats']} validation "
        f"runs over {config['lrs']}, widened past an end point when one wins. Test accuracy: "
        "mean ± 95% t-interval over seeds. safenorm's methods (S) give their statistics "
        f"{config['statistics_share']:.0%} of the budget; `dp-log` bounds each log variance "
        f"ratio by {config['log_var_clip_per_channel']:g} per channel. Goal: the recipe at or "
        "above the best anchor at eps 3 and 8, within 3 points of it at eps 1."
    )


def _goal_margin(epsilon: float) -> float:
    return 0.03 if epsilon < 3 else 0.0


#: The from-scratch study for :func:`~safenorm.evaluation.dpstudy.run_study`.
UTILITY_STUDY = Study(
    name="utility",
    label="from-scratch",
    methods=METHODS,
    train=train_and_score,
    defaults=UtilityConfig(),
    title="Privacy-utility of DP-SGD from scratch on digits",
    intro=_intro,
    plot_title=lambda task: "DP-SGD from scratch on digits",
    goal_margin=_goal_margin,
)


def run_utility_study(
    config: UtilityConfig, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the study into ``out`` and write ``utility.{json,md,png}``.

    Returns:
        The summary written to ``utility.json``.
    """
    return run_study(UTILITY_STUDY, config, out, log)


def utility_report(summary: dict[str, Any]) -> str:
    """Markdown: accuracy table, paired differences to the best anchor, verdicts, diagnostic."""
    return report(UTILITY_STUDY, summary)
