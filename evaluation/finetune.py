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
  - ``scratch-groupnorm`` (reference, not an anchor): the GroupNorm(4 channels/group) CNN
    trained from scratch on the private data: shows whether pretraining matters at an epsilon.

* Privacy: epsilon 1, 3, 8 at delta 1e-5; every method is calibrated with
  ``make_private_with_epsilon`` (Poisson sampling, per-sample clipping at ``max_grad_norm``).
  Only the private fine-tuning is accounted (pretraining touches public data only).
* Tuning: the lr of each (task, method, epsilon) maximizes validation accuracy (the mean of
  ``validation_repeats`` runs, seeds ``validation_seed + k``; 1 in the first study) over the
  grid ``lrs``; if the best lr is an end point of the grid, the
  grid is widened by a factor 2 past that end and the new point is run, up to
  ``max_lr_extensions`` times (the final grid is recorded per row). Then each of ``seeds``
  trains on the whole training split at that lr and is scored on the test split.
* Report: mean test accuracy with the 95% Student-t interval over seeds; per (task, epsilon) the
  *best anchor* is the anchor with the highest mean test accuracy (a choice that favours the
  anchors), and each safenorm method gets its paired difference to it (same seeds, so the same
  pretrained network and head initialization), mean and 95% t-interval.
* Decision rule, per (task, epsilon): a safenorm method **wins** if the interval of its paired
  difference lies above 0, **loses** if it lies below 0, and **ties** otherwise. The goal "a
  safenorm method at or above the best anchor" is met at an epsilon if the safenorm method with
  the highest *validation* accuracy (chosen without the test split) wins or ties with a
  non-negative mean difference; it is missed otherwise.

Runs are cached one JSON line per run in ``runs.jsonl`` (fields ``method``, ``epsilon``, ``seed``,
``split``, ``accuracy``, ``lr``, ``safenorm``, plus ``task`` and ``epsilon_spent``), so an
interrupted study resumes.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import statistics
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safenorm.evaluation.models import digits_dp_cnn
from safenorm.evaluation.utility import _load, _t_interval, eval_accuracy, train_dp_epochs
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

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
    model = digits_dp_cnn(num_classes)
    for i, layer in enumerate(model):
        if isinstance(layer, nn.BatchNorm2d):
            c = layer.num_features
            model[i] = nn.GroupNorm(c // channels_per_group, c)
    return model


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


@dataclass(frozen=True)
class FinetuneMethod:
    """One method: how its model and privacy engine are built, and whether it is safenorm's."""

    build: Callable[[int, FinetuneConfig], nn.Module]
    safenorm: bool
    engine: str  # "opacus" or "safenorm"
    anchor: bool = False  # compared against (the goal's "best anchor" is the best of these)


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


def _frozen_stats(seed: int, config: FinetuneConfig) -> nn.Module:
    import safenorm

    model = pretrained("batchnorm", seed, config)
    return _new_head(safenorm.convert_batchnorm(model, "dp", frozen_statistics=True))


def _frozen_stats_bitfit(seed: int, config: FinetuneConfig) -> nn.Module:
    import safenorm

    model = _frozen_stats(seed, config)
    model.requires_grad_(False)
    for layer in model.modules():
        if isinstance(layer, safenorm.DPBatchNorm):
            layer.requires_grad_(True)
    model[-1].requires_grad_(True)
    return model


def _released_stats(seed: int, config: FinetuneConfig) -> nn.Module:
    import safenorm

    model = pretrained("batchnorm", seed, config)
    model = safenorm.convert_batchnorm(
        model, "dp", statistics_are_public=True, momentum=config.released_momentum
    )
    return _new_head(model)


#: The study's methods (see the module docstring).
METHODS: dict[str, FinetuneMethod] = {
    "opacus-fix": FinetuneMethod(_opacus_fix, False, "opacus", anchor=True),
    "groupnorm-pretrained": FinetuneMethod(_groupnorm_pretrained, False, "opacus", anchor=True),
    "linear-probe": FinetuneMethod(_linear_probe, False, "opacus", anchor=True),
    "scratch-groupnorm": FinetuneMethod(_scratch, False, "opacus"),
    "frozen-stats": FinetuneMethod(_frozen_stats, safenorm=True, engine="safenorm"),
    "frozen-stats-bitfit": FinetuneMethod(_frozen_stats_bitfit, safenorm=True, engine="safenorm"),
    "released-stats": FinetuneMethod(_released_stats, safenorm=True, engine="safenorm"),
}


def build_method(method: str, seed: int, config: FinetuneConfig) -> tuple[nn.Module, Any]:
    """The model (pretrained, with a new head, seeded by ``seed``) and engine of ``method``."""
    import opacus

    from safenorm.opacus import PrivacyEngine

    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; known: {sorted(METHODS)}")
    spec = METHODS[method]
    model = spec.build(seed, config)
    engine = PrivacyEngine(accountant="rdp") if spec.engine == "safenorm" else None
    return model, engine or opacus.PrivacyEngine(accountant="rdp")


# ----------------------------------------------------------------------------- training


def train_and_score(
    method: str,
    task: str,
    epsilon: float,
    lr: float,
    seed: int,
    split: str,
    config: FinetuneConfig,
) -> dict[str, float]:
    """Fine-tune ``method`` with DP-SGD at ``(epsilon, delta)``; score on validation or test.

    ``split="validation"`` trains on ``fit`` and scores ``validation``; ``"test"`` trains on
    ``train`` and scores ``test``.
    """
    data = _splits(task, config.test_fraction, config.validation_fraction)
    train, evaluate = (
        (data["fit"], data["validation"]) if split == "validation" else
        (data["train"], data["test"])
    )  # fmt: skip
    with warnings.catch_warnings():
        # the study seeds its noise on purpose, and the first layer's input needs no gradient
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook")
        model, engine = build_method(method, seed, config)
        torch.manual_seed(seed)  # after pretraining: the same noise stream for every method
        loader = DataLoader(TensorDataset(*train), batch_size=config.batch_size, shuffle=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr)
        extra = {"statistics_share": config.statistics_share} if METHODS[method].safenorm else {}
        dp_model, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
            target_delta=config.delta, epochs=config.epochs, max_grad_norm=config.max_grad_norm,
            **extra,
        )  # fmt: skip
        train_dp_epochs(dp_model, dp_optimizer, dp_loader, config.epochs)
        spent = engine.get_epsilon(config.delta)
    accuracy = eval_accuracy(dp_model, *evaluate)
    return {
        "accuracy": accuracy,
        "epsilon_spent": float(spent),
        "noise_multiplier": float(dp_optimizer.noise_multiplier),
        "steps": len(dp_loader) * config.epochs,
        "sample_rate": 1 / len(loader),
    }


def _job(args: tuple) -> dict[str, Any]:
    torch.set_num_threads(1)
    key, task, method, epsilon, lr, seed, split, config = args
    result = train_and_score(method, task, epsilon, lr, seed, split, config)
    return {"key": key, "task": task, "method": method, "epsilon": epsilon, "lr": lr,
            "seed": seed, "split": split, "safenorm": METHODS[method].safenorm,
            **result}  # fmt: skip


def _run_jobs(jobs: list[tuple], cache: Path, workers: int, log: Callable[[str], None]) -> None:
    done = _load(cache)
    todo = [job for job in jobs if job[0] not in done]
    if not todo:
        return

    def record(i: int, r: dict[str, Any], handle: Any) -> None:
        handle.write(json.dumps(r) + "\n")
        handle.flush()
        log(f"[{i}/{len(todo)}] {r['task']} {r['method']} eps={r['epsilon']} lr={r['lr']} "
            f"seed={r['seed']} {r['split']}: acc={r['accuracy']:.3f}")  # fmt: skip

    with cache.open("a") as handle:
        if workers <= 1:  # in-process: no start-up cost (tests, debugging)
            for i, job in enumerate(todo, 1):
                record(i, _job(job), handle)
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for i, r in enumerate(pool.imap_unordered(_job, todo), 1):
                record(i, r, handle)


# ----------------------------------------------------------------------------- study


def _val_key(task: str, method: str, epsilon: float, lr: float, repeat: int = 0) -> str:
    return f"val|{task}|{method}|{epsilon}|{lr}" + (f"|r{repeat}" if repeat else "")


def _validation_accuracy(runs: dict, config: FinetuneConfig, cell: tuple, lr: float) -> float:
    """Mean validation accuracy of ``lr`` over the selection repeats."""
    keys = [_val_key(*cell, lr, k) for k in range(config.validation_repeats)]
    return statistics.fmean(runs[key]["accuracy"] for key in keys)


def _test_key(task: str, method: str, epsilon: float, lr: float, seed: int) -> str:
    return f"test|{task}|{method}|{epsilon}|{lr}|{seed}"


def widen_grid(lrs: tuple[float, ...], accuracies: dict[float, float]) -> tuple[float, ...]:
    """``lrs`` widened by a factor 2 past the end point that wins on validation, else as is.

    Ties go to the smaller lr (the first maximum in ascending order).
    """
    grid = tuple(sorted(lrs))
    best = max(grid, key=lambda lr: accuracies[lr])
    if best == grid[0]:
        return (grid[0] / 2, *grid)
    if best == grid[-1]:
        return (*grid, grid[-1] * 2)
    return grid


def _select_lrs(
    config: FinetuneConfig, cache: Path, log: Callable[[str], None]
) -> dict[tuple[str, str, float], tuple[float, tuple[float, ...]]]:
    """Best validation lr and final grid of every (task, method, epsilon)."""
    cells = [(t, m, e) for t in config.tasks for m in config.methods for e in config.epsilons]
    grids = {cell: tuple(sorted(config.lrs)) for cell in cells}
    open_cells = list(cells)
    for _ in range(config.max_lr_extensions + 1):
        jobs = [
            (_val_key(t, m, e, lr, k), t, m, e, lr, config.validation_seed + k, "validation",
             config)
            for (t, m, e) in open_cells
            for lr in grids[t, m, e]
            for k in range(config.validation_repeats)
        ]  # fmt: skip
        _run_jobs(jobs, cache, config.workers, log)
        runs = _load(cache)
        still_open = []
        for cell in open_cells:
            accs = {lr: _validation_accuracy(runs, config, cell, lr) for lr in grids[cell]}
            wider = widen_grid(grids[cell], accs)
            if wider != grids[cell]:
                grids[cell] = wider
                still_open.append(cell)
        open_cells = still_open
        if not open_cells:
            break
    runs = _load(cache)
    best = {}
    for cell in cells:
        accs = {lr: _validation_accuracy(runs, config, cell, lr) for lr in grids[cell]}
        best[cell] = (max(grids[cell], key=lambda lr, a=accs: a[lr]), grids[cell])
    return best


#: Fields that may change between runs sharing a cache (what is run, not how).
_SELECTION_FIELDS = ("tasks", "methods", "epsilons", "seeds", "workers")


def _check_cache_protocol(path: Path, config: FinetuneConfig) -> None:
    """Refuse to mix cached runs of another protocol (epochs, lr grid, pretraining...) in."""
    if not path.exists():
        return
    cached = json.loads(path.read_text())
    current = json.loads(json.dumps(asdict(config)))
    defaults = json.loads(json.dumps(asdict(FinetuneConfig())))  # fields added since
    differing = sorted(
        k
        for k in current
        if k not in _SELECTION_FIELDS and cached.get(k, defaults[k]) != current[k]
    )
    if differing:
        raise ValueError(
            f"{path.parent} holds fine-tuning runs of another protocol (differs in {differing}); "
            "use a new output directory"
        )


def run_finetune_study(
    config: FinetuneConfig, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; write ``finetune.{json,md,png}``.

    Returns:
        The summary written to ``finetune.json``.
    """
    for name in config.methods:
        if name not in METHODS:
            raise ValueError(f"unknown fine-tuning method {name!r}; known: {sorted(METHODS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "runs.jsonl"
    _check_cache_protocol(out / "config.json", config)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    best = _select_lrs(config, cache, log)
    finals = [
        (_test_key(t, m, e, lr, s), t, m, e, lr, s, "test", config)
        for (t, m, e), (lr, _) in best.items()
        for s in config.seeds
    ]
    _run_jobs(finals, cache, config.workers, log)
    summary = summarize(config, _load(cache), best)
    (out / "finetune.json").write_text(json.dumps(summary, indent=2))
    (out / "finetune.md").write_text(finetune_report(summary))
    _plot(summary, out / "finetune.png")
    return summary


def _interval(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    half = _t_interval(values)
    return {"mean": mean, "ci95": half, "low": mean - half, "high": mean + half}


def _verdict(diff: dict[str, float]) -> str:
    if diff["low"] > 0:
        return "win"
    if diff["high"] < 0:
        return "loss"
    return "tie"


def summarize(config: FinetuneConfig, runs: dict[str, dict], best: dict) -> dict[str, Any]:
    """Rows per (task, method, epsilon), paired differences and goal verdicts."""
    rows, by_cell = [], {}
    for (task, method, epsilon), (lr, grid) in best.items():
        finals = [runs[_test_key(task, method, epsilon, lr, s)] for s in config.seeds]
        accs = [r["accuracy"] for r in finals]
        cell = (task, method, epsilon)
        validation = {str(x): _validation_accuracy(runs, config, cell, x) for x in grid}
        row = {
            "task": task, "method": method, "epsilon": epsilon, "lr": lr, "lr_grid": list(grid),
            "safenorm": METHODS[method].safenorm, "accuracies": accs, **_interval(accs),
            "validation": validation, "validation_best": validation[str(lr)],
            "epsilon_spent": max(r["epsilon_spent"] for r in finals),
        }  # fmt: skip
        rows.append(row)
        by_cell[task, method, epsilon] = row
    comparisons = []
    for task in config.tasks:
        for epsilon in config.epsilons:
            cell = [by_cell[task, m, epsilon] for m in config.methods]
            anchors = [r for r in cell if METHODS[r["method"]].anchor]
            ours = [r for r in cell if r["safenorm"]]
            if not anchors or not ours:
                continue
            anchor = max(anchors, key=lambda r: r["mean"])
            diffs = {}
            for r in ours:
                pairs = zip(r["accuracies"], anchor["accuracies"], strict=True)
                d = _interval([a - b for a, b in pairs])
                diffs[r["method"]] = {**d, "verdict": _verdict(d)}
            recipe = max(ours, key=lambda r: r["validation_best"])["method"]
            goal = diffs[recipe]["verdict"] != "loss" and diffs[recipe]["mean"] >= 0
            comparisons.append({
                "task": task, "epsilon": epsilon, "best_anchor": anchor["method"],
                "differences": diffs, "recipe": recipe, "goal_met": goal,
            })  # fmt: skip
    return {"config": asdict(config), "rows": rows, "comparisons": comparisons}


def finetune_report(summary: dict[str, Any]) -> str:
    """Markdown: accuracy table per task, paired differences to the best anchor, verdicts."""
    config = summary["config"]
    epsilons = config["epsilons"]
    lines = [
        "# DP fine-tuning of a BatchNorm-pretrained CNN on digits",
        "",
        f"Public classes 0-4 (non-private pretraining), private classes 5-9 with a new head; "
        f"delta = {config['delta']}, {config['epochs']} DP epochs, expected batch "
        f"{config['batch_size']}, clip {config['max_grad_norm']}, seeds {config['seeds']}; lr "
        f"per (task, method, epsilon) from validation over {config['lrs']} (widened past an "
        "end point when one wins). Test accuracy: mean ± 95% t-interval over seeds. "
        "`released-stats` gives its statistics "
        f"{config['statistics_share']:.0%} of the budget, momentum {config['released_momentum']}."
        " (S) marks safenorm's methods.",
    ]
    by_key = {(r["task"], r["method"], r["epsilon"]): r for r in summary["rows"]}
    for task in config["tasks"]:
        lines += [
            "",
            f"## task `{task}`",
            "",
            "| method | " + " | ".join(f"eps = {e:g}" for e in epsilons) + " |",
            "|---|" + "---|" * len(epsilons),
        ]
        for method in config["methods"]:
            cells = []
            for e in epsilons:
                r = by_key[task, method, e]
                cells.append(f"{r['mean']:.1%} ± {r['ci95']:.1%} (lr {r['lr']:g})")
            mark = " (S)" if METHODS[method].safenorm else ""
            lines.append(f"| {method}{mark} | " + " | ".join(cells) + " |")
        comps = [c for c in summary["comparisons"] if c["task"] == task]
        if not comps:
            continue
        lines += [
            "",
            "Paired difference to the best anchor (points, 95% t-interval), verdict:",
            "",
            "| eps | best anchor | " + " | ".join(comps[0]["differences"]) + " | recipe (val) "
            "| goal |",
            "|---|---|" + "---|" * (len(comps[0]["differences"]) + 2),
        ]
        for c in comps:
            cells = [
                f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] "
                f"{d['verdict']}"
                for d in c["differences"].values()
            ]
            lines.append(
                f"| {c['epsilon']:g} | {c['best_anchor']} | " + " | ".join(cells) +
                f" | {c['recipe']} | {'met' if c['goal_met'] else 'missed'} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["config"]["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in summary["config"]["methods"]:
            rows = sorted(
                (r for r in summary["rows"] if r["method"] == method and r["task"] == task),
                key=lambda r: r["epsilon"],
            )
            ax.errorbar(
                [r["epsilon"] for r in rows], [r["mean"] for r in rows],
                yerr=[0 if math.isnan(r["ci95"]) else r["ci95"] for r in rows], marker="o",
                capsize=3, linestyle="-" if METHODS[method].safenorm else "--", label=method,
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(f"epsilon (delta = {summary['config']['delta']:g})")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"DP fine-tuning on digits 5-9: {task}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
