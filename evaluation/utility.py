"""Privacy-utility study: DP-SGD test accuracy at several epsilons, per normalization.

Every method starts from the same BatchNorm CNN and is trained with DP-SGD (Poisson sampling,
per-sample clipping, ``make_private_with_epsilon`` calibrated to the same ``(epsilon, delta)``):

* ``dp``: BatchNorm converted to :class:`safenorm.DPBatchNorm2d`, trained with
  :class:`safenorm.opacus.PrivacyEngine` (gradient AND statistics noise within the budget);
* ``dp-groupnorm``: Opacus' ``ModuleValidator.fix`` (``GroupNorm(min(32, C), C)``: InstanceNorm on
  the 16/32-channel nets of this study), plain ``opacus.PrivacyEngine``;
* ``dp-none``: BatchNorm removed, plain ``opacus.PrivacyEngine``;
* ``dp-exact-stats`` (a diagnostic, **not private**): DPBatchNorm whose statistics get
  (almost) no noise, with the gradient noise of the gradient-only methods at the target epsilon:
  what DPBatchNorm would reach if its statistics were free. Its epsilon is reported as ``nan``.

The learning rate of each (method, epsilon) is chosen from a grid on a validation split carved
out of the training split (so the test set plays no part in tuning); then each seed trains on the
whole training split and is scored on the test split. Results are cached one JSON line per run,
so an interrupted study resumes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safenorm.evaluation.models import digits_dp_cnn
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["UtilityConfig", "run_utility_study", "utility_report"]


@dataclass
class UtilityConfig:
    """The study's protocol.

    Attributes:
        methods: which of ``dp``, ``dp-groupnorm``, ``dp-none`` to train.
        epsilons: target epsilons; ``delta`` is shared.
        seeds: training seeds of the final runs.
        lrs: learning-rate grid searched on the validation split.
        epochs, batch_size, max_grad_norm: DP-SGD schedule (expected batch size under Poisson).
        statistics_share: budget share of DPBatchNorm's statistics (``make_private_with_epsilon``).
        test_fraction, validation_fraction: splits of digits (stratified, fixed seed).
        workers: parallel training processes (one torch thread each).
    """

    methods: tuple[str, ...] = ("dp", "dp-groupnorm", "dp-none")
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    delta: float = 1e-5
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    epochs: int = 15
    batch_size: int = 128
    max_grad_norm: float = 1.0
    statistics_share: float = 0.1
    test_fraction: float = 0.2
    validation_fraction: float = 0.2
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


def _build(method: str, config: UtilityConfig) -> tuple[nn.Module, Any]:
    """The model and the privacy engine of ``method``."""
    import opacus
    from opacus.validators import ModuleValidator

    import safenorm
    from safenorm.opacus import PrivacyEngine

    model = digits_dp_cnn()
    builders: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
        "dp": lambda: (
            safenorm.convert_batchnorm(model, "dp", **config.dp_layer_options),
            PrivacyEngine(accountant="rdp"),
        ),
        "dp-groupnorm": lambda: (
            ModuleValidator.fix(model),
            opacus.PrivacyEngine(accountant="rdp"),
        ),
        "dp-none": lambda: (
            _remove_batchnorm(model),
            opacus.PrivacyEngine(accountant="rdp"),
        ),
        "dp-exact-stats": lambda: (
            safenorm.convert_batchnorm(model, "dp", **config.dp_layer_options),
            PrivacyEngine(accountant="rdp"),
        ),
    }
    if method not in builders:
        raise ValueError(f"unknown method {method!r}; known: {sorted(builders)}")
    return builders[method]()


def _remove_batchnorm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
    return model


def train_and_score(
    method: str,
    epsilon: float,
    lr: float,
    seed: int,
    train: tuple[Tensor, Tensor],
    evaluate: tuple[Tensor, Tensor],
    config: UtilityConfig,
) -> dict[str, float]:
    """Train ``method`` with DP-SGD at ``(epsilon, delta)`` and score it on ``evaluate``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # the study seeds its noise on purpose, and the first layer's input needs no gradient
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook")
        model, engine = _build(method, config)
        loader = DataLoader(TensorDataset(*train), batch_size=config.batch_size, shuffle=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        common = {"module": model, "optimizer": optimizer, "data_loader": loader,
                  "max_grad_norm": config.max_grad_norm}  # fmt: skip
        if method == "dp-exact-stats":
            dp_model, dp_optimizer, dp_loader = engine.make_private(
                **common,
                noise_multiplier=_gradient_only_sigma(epsilon, len(loader), config),
                statistics_noise_multiplier=EXACT_STATISTICS_NOISE,
            )
        else:
            extra = {"statistics_share": config.statistics_share} if method == "dp" else {}
            dp_model, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
                **common,
                target_epsilon=epsilon,
                target_delta=config.delta,
                epochs=config.epochs,
                **extra,
            )
        train_dp_epochs(dp_model, dp_optimizer, dp_loader, config.epochs)
        spent = math.nan if method == "dp-exact-stats" else engine.get_epsilon(config.delta)
    return {"accuracy": eval_accuracy(dp_model, *evaluate), "epsilon_spent": float(spent)}


def train_dp_epochs(model: nn.Module, optimizer: Any, loader: DataLoader, epochs: int) -> None:
    """``epochs`` passes of DP-SGD over the DP data loader (an empty Poisson batch still steps)."""
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            out = model(xb)
            loss = F.cross_entropy(out, yb) if len(yb) else out.sum() * 0.0
            loss.backward()
            optimizer.step()


def eval_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Eval-mode accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


#: Statistics noise of the (non-private) ``dp-exact-stats`` diagnostic: negligible.
EXACT_STATISTICS_NOISE = 1e-6


def _gradient_only_sigma(epsilon: float, batches: int, config: UtilityConfig) -> float:
    """The gradient noise multiplier Opacus calibrates for ``epsilon`` without statistics."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=config.delta, sample_rate=1 / batches,
            epochs=config.epochs, accountant="rdp",
        )
    )  # fmt: skip


def _job(args: tuple) -> dict[str, Any]:
    torch.set_num_threads(1)
    key, method, epsilon, lr, seed, split, config = args
    splits = _splits(config)
    train, evaluate = (
        (splits["fit"], splits["validation"]) if split == "validation" else
        (splits["train"], splits["test"])
    )  # fmt: skip
    result = train_and_score(method, epsilon, lr, seed, train, evaluate, config)
    return {"key": key, "method": method, "epsilon": epsilon, "lr": lr, "seed": seed,
            "split": split, **result}  # fmt: skip


def _run_jobs(jobs: list[tuple], cache: Path, workers: int, log: Callable[[str], None]) -> None:
    done = _load(cache)
    todo = [job for job in jobs if job[0] not in done]
    if not todo:
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, workers)) as pool, cache.open("a") as handle:
        for i, record in enumerate(pool.imap_unordered(_job, todo), 1):
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            log(
                f"[{i}/{len(todo)}] {record['method']} eps={record['epsilon']} lr={record['lr']} "
                f"seed={record['seed']} {record['split']}: acc={record['accuracy']:.3f}"
            )


def _load(cache: Path) -> dict[str, dict[str, Any]]:
    if not cache.exists():
        return {}
    return {r["key"]: r for r in map(json.loads, cache.read_text().splitlines()) if r}


def run_utility_study(
    config: UtilityConfig, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the study into ``out`` and write ``utility.{json,md,png}``.

    Returns:
        The summary written to ``utility.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "runs.jsonl"
    _check_cache_protocol(out / "config.json", config)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    grid = [(m, e) for m in config.methods for e in config.epsilons]
    selection = [
        (f"val|{m}|{e}|{lr}", m, e, lr, 1000, "validation", config)
        for m, e in grid
        for lr in config.lrs
    ]
    _run_jobs(selection, cache, config.workers, log)
    runs = _load(cache)
    best_lr = {
        (m, e): max(config.lrs, key=lambda lr, m=m, e=e: runs[f"val|{m}|{e}|{lr}"]["accuracy"])
        for m, e in grid
    }
    finals = [
        (f"test|{m}|{e}|{best_lr[m, e]}|{s}", m, e, best_lr[m, e], s, "test", config)
        for m, e in grid
        for s in config.seeds
    ]
    _run_jobs(finals, cache, config.workers, log)
    runs = _load(cache)
    summary = _summarize(config, runs, best_lr)
    (out / "utility.json").write_text(json.dumps(summary, indent=2))
    (out / "utility.md").write_text(utility_report(summary))
    _plot(summary, out / "utility.png")
    return summary


#: Fields that may change between runs sharing a cache (what is run, not how).
_SELECTION_FIELDS = ("methods", "epsilons", "seeds", "workers")


def _check_cache_protocol(path: Path, config: UtilityConfig) -> None:
    """Refuse to mix cached runs of another protocol (epochs, batch size, lr grid...) in."""
    if not path.exists():
        return
    cached = json.loads(path.read_text())
    current = json.loads(json.dumps(asdict(config)))
    differing = sorted(
        k for k in current if k not in _SELECTION_FIELDS and cached.get(k) != current[k]
    )
    if differing:
        raise ValueError(
            f"{path.parent} holds runs of another protocol (differs in {differing}); "
            "use a new output directory"
        )


def _t_interval(values: list[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean."""
    if len(values) < 2:
        return float("nan")
    from scipy import stats

    return float(
        stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    )


def _summarize(config: UtilityConfig, runs: dict, best_lr: dict) -> dict[str, Any]:
    rows = []
    for (method, epsilon), lr in best_lr.items():
        finals = [runs[f"test|{method}|{epsilon}|{lr}|{s}"] for s in config.seeds]
        accs = [r["accuracy"] for r in finals]
        validation = {str(x): runs[f"val|{method}|{epsilon}|{x}"]["accuracy"] for x in config.lrs}
        rows.append({
            "method": method, "epsilon": epsilon, "lr": lr, "accuracies": accs,
            "mean": statistics.fmean(accs), "ci95": _t_interval(accs), "validation": validation,
            "epsilon_spent": max(r["epsilon_spent"] for r in finals),
        })  # fmt: skip
    return {"config": asdict(config), "rows": rows}


def utility_report(summary: dict[str, Any]) -> str:
    """A markdown table: mean test accuracy (95% t-interval over seeds) per method and epsilon."""
    config = summary["config"]
    epsilons = config["epsilons"]
    lines = [
        "# Privacy-utility of DP-SGD on digits",
        "",
        f"delta = {config['delta']}, {config['epochs']} epochs, expected batch "
        f"{config['batch_size']}, clip {config['max_grad_norm']}, seeds {config['seeds']}; "
        "learning rate chosen per (method, epsilon) on a validation split from "
        f"{config['lrs']}; DPBatchNorm's statistics get {config['statistics_share']:.0%} of the "
        "budget. Test accuracy, mean over seeds with the 95% t-interval. `dp-exact-stats` is a "
        "diagnostic, not private: DPBatchNorm with (almost) noise-free statistics and the "
        "gradient-only noise of the target epsilon (its epsilon shows as nan).",
        "",
        "| method | " + " | ".join(f"eps = {e:g}" for e in epsilons) + " |",
        "|---|" + "---|" * len(epsilons),
    ]
    by_key = {(r["method"], r["epsilon"]): r for r in summary["rows"]}
    for method in config["methods"]:
        cells = []
        for e in epsilons:
            r = by_key[method, e]
            cells.append(
                f"{r['mean']:.1%} ± {r['ci95']:.1%} (lr {r['lr']:g}, eps {r['epsilon_spent']:.2f})"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in summary["config"]["methods"]:
        rows = sorted(
            (r for r in summary["rows"] if r["method"] == method), key=lambda r: r["epsilon"]
        )
        ax.errorbar(
            [r["epsilon"] for r in rows], [r["mean"] for r in rows],
            yerr=[0 if math.isnan(r["ci95"]) else r["ci95"] for r in rows],
            marker="o", capsize=3, label=method,
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = {summary['config']['delta']:g})")
    ax.set_ylabel("test accuracy")
    ax.set_title("DP-SGD on digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
