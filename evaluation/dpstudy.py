"""The machinery the DP-SGD studies share (:mod:`~safenorm.evaluation.utility`, from scratch, and
:mod:`~safenorm.evaluation.finetune`): one DP-SGD training run, the cached job runner, the
learning-rate selection on a validation split, paired differences to the best anchor, the
report tables and the plot.

A study is a grid of *cells* ``(task, method, epsilon)``. Its protocol, fixed before any run:

* Tuning: the lr of each cell maximizes validation accuracy (the mean of ``validation_repeats``
  runs, seeds ``validation_seed + k``) over the grid ``lrs``; if the best lr is an end point,
  the grid is widened by a factor 2 past that end and the new point is run, up to
  ``max_lr_extensions`` times (the final grid is recorded per row, so no method ends on an end
  point unless the extensions ran out, which the report marks). Then each of ``seeds`` trains
  on the whole training split at that lr and is scored on the test split.
* Report: mean test accuracy with the 95% Student-t interval over seeds; per (task, epsilon)
  the *best anchor* is the anchor with the highest mean test accuracy (a choice that favours
  the anchors), and each safenorm method gets its paired difference to it (same seeds: same
  initialization or pretrained network, same data order), mean and 95% t-interval.
* Decision rule, per (task, epsilon): a safenorm method **wins** if the interval of its paired
  difference lies above 0, **loses** if it lies below 0, and **ties** otherwise. The *recipe*
  is the safenorm method with the highest validation accuracy (chosen without the test split);
  the study's goal at that epsilon is **met** if the recipe's mean paired difference is at
  least ``-goal_margin(epsilon)`` (0: at or above the best anchor), **missed** otherwise.

Every run is one JSON line of ``runs.jsonl`` (``method``, ``epsilon``, ``seed``, ``split``,
``accuracy``, ``lr``, ``safenorm``, ``task``, ``epsilon_spent``, and for layers that release
statistics ``xhat_sq``, the diagnostic below), so an interrupted study resumes and every number
can be recomputed.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import statistics
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "Method",
    "Study",
    "dp_train_and_score",
    "eval_accuracy",
    "load_runs",
    "run_study",
    "t_interval",
    "train_dp_epochs",
    "widen_grid",
]


@dataclass(frozen=True)
class Method:
    """One method of a study: its model, its privacy engine, and its role.

    Attributes:
        build: ``build(seed, config) -> model`` (seeded: the same seed, the same initial model).
        safenorm: whether it is one of safenorm's own methods.
        engine: ``"opacus"`` (plain ``opacus.PrivacyEngine``) or ``"safenorm"``
            (:class:`safenorm.opacus.PrivacyEngine`, which accounts released statistics).
        anchor: compared against (the goal's "best anchor" is the best of these).
    """

    build: Callable[[int, Any], nn.Module]
    safenorm: bool
    engine: str
    anchor: bool = False


@dataclass(frozen=True)
class Study:
    """What differs between the studies: their methods, one run, their files and words.

    Attributes:
        name: the stem of the written files (``{name}.json``, ``.md``, ``.png``).
        label: the study's name in messages.
        methods: the method registry.
        train: ``train(method, task, epsilon, lr, seed, split, config) -> result`` (one run,
            :func:`dp_train_and_score`'s record); a module-level function (the worker processes
            import it).
        defaults: the default config (fields added since a cache was written compare to it).
        selection_fields: config fields that may change between runs sharing a cache.
        title: the report's heading; ``intro(config)`` its protocol paragraph;
            ``plot_title(task)`` each panel's title.
        goal_margin: ``goal_margin(epsilon)``, how far (in accuracy) the recipe may trail the
            best anchor with the goal met.
    """

    name: str
    label: str
    methods: dict[str, Method]
    train: Callable[..., dict[str, Any]]
    defaults: Any
    title: str
    intro: Callable[[dict[str, Any]], str]
    plot_title: Callable[[str], str]
    goal_margin: Callable[[float], float] = lambda epsilon: 0.0
    selection_fields: tuple[str, ...] = ("tasks", "methods", "epsilons", "seeds", "workers")


def method_of(label: str, methods: dict[str, Method], name: str) -> Method:
    """``methods[name]``, or an error naming the known ones."""
    if name not in methods:
        raise ValueError(f"unknown {label} method {name!r}; known: {sorted(methods)}")
    return methods[name]


# ----------------------------------------------------------------------------- one run


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


class NormalizedSecondMoment:
    """Diagnostic: ``E[xhat^2]`` per DP layer, over the training forwards while it is attached.

    ``xhat = (x - mean) / sqrt(var + eps)`` with the statistics the layer normalized with
    (``last_statistics``); 1 when the released statistics track the activations. Computed by
    the experiment from the training data: a measurement, never released by the model.
    """

    def __init__(self, model: nn.Module) -> None:
        import safenorm

        self.sums: dict[str, list[float]] = {}
        self._handles = [
            layer.register_forward_hook(self._hook(name))
            for name, layer in model.named_modules()
            if isinstance(layer, safenorm.DPBatchNorm)
        ]

    def _hook(self, name: str) -> Callable:
        def record(layer: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0].detach()
            if not layer.training or layer.last_statistics is None or not x.shape[0]:
                return
            mean, var = (s.detach() for s in layer.last_statistics)
            # (C,) per channel or (N, C) per sample (ghost groups), broadcast over (N, C, *S)
            shape = (-1 if mean.dim() == 2 else 1, mean.shape[-1], *([1] * (x.dim() - 2)))
            z = (x - mean.reshape(shape).to(x.dtype)) ** 2 / (var + layer.eps).reshape(shape)
            total = self.sums.setdefault(name, [0.0, 0.0])
            total[0] += float(z.sum())
            total[1] += z.numel()

        return record

    def means(self) -> dict[str, float]:
        return {name: s / n for name, (s, n) in self.sums.items() if n}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def train_and_evaluation_data(
    data: dict[str, tuple[Tensor, Tensor]], split: str
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The (training, scoring) data of a run: ``fit`` and ``validation`` for lr selection
    (``split="validation"``), else the whole ``train`` split and ``test``."""
    if split == "validation":
        return data["fit"], data["validation"]
    return data["train"], data["test"]


def dp_train_and_score(
    model: nn.Module,
    method: Method,
    train: tuple[Tensor, Tensor],
    evaluate: tuple[Tensor, Tensor],
    epsilon: float,
    lr: float,
    seed: int,
    config: Any,
) -> dict[str, Any]:
    """Train ``model`` with DP-SGD calibrated to ``(epsilon, config.delta)``; score ``evaluate``.

    Poisson sampling at rate ``batch_size / n``, per-sample clipping at ``max_grad_norm``,
    ``make_private_with_epsilon`` over ``epochs``; safenorm's engine gives the released
    statistics ``statistics_share`` of the budget. ``torch.manual_seed(seed)`` before the data
    loader: every method of a seed sees the same noise stream and batches.
    """
    import opacus

    from safenorm.opacus import PrivacyEngine

    with warnings.catch_warnings():
        # the study seeds its noise on purpose, and the first layer's input needs no gradient
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        torch.manual_seed(seed)
        engine_type = PrivacyEngine if method.engine == "safenorm" else opacus.PrivacyEngine
        engine = engine_type(accountant="rdp")
        loader = DataLoader(TensorDataset(*train), batch_size=config.batch_size, shuffle=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr)
        extra = {"statistics_share": config.statistics_share} if method.engine == "safenorm" else {}
        dp_model, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
            target_delta=config.delta, epochs=config.epochs, max_grad_norm=config.max_grad_norm,
            **extra,
        )  # fmt: skip
        train_dp_epochs(dp_model, dp_optimizer, dp_loader, config.epochs - 1)
        diagnostic = NormalizedSecondMoment(model)  # E[xhat^2] over the last epoch only
        train_dp_epochs(dp_model, dp_optimizer, dp_loader, 1)
        diagnostic.remove()
        spent = engine.get_epsilon(config.delta)
    record = {
        "safenorm": method.safenorm,
        "accuracy": eval_accuracy(dp_model, *evaluate),
        "epsilon_spent": float(spent),
        "noise_multiplier": float(dp_optimizer.noise_multiplier),
        "steps": len(dp_loader) * config.epochs,
        "sample_rate": 1 / len(loader),
    }
    if diagnostic.means():
        record["xhat_sq"] = diagnostic.means()
    return record


# ----------------------------------------------------------------------------- jobs and cache


def load_runs(cache: Path) -> dict[str, dict[str, Any]]:
    """The cached runs of ``runs.jsonl``, by key."""
    if not cache.exists():
        return {}
    return {r["key"]: r for r in map(json.loads, cache.read_text().splitlines()) if r}


def _job(train: Callable[..., dict[str, Any]], args: tuple) -> dict[str, Any]:
    torch.set_num_threads(1)
    key, task, method, epsilon, lr, seed, split, config = args
    result = train(method, task, epsilon, lr, seed, split, config)
    return {"key": key, "task": task, "method": method, "epsilon": epsilon, "lr": lr,
            "seed": seed, "split": split, **result}  # fmt: skip


def run_jobs(
    jobs: list[tuple], cache: Path, study: Study, workers: int, log: Callable[[str], None]
) -> None:
    """Run the jobs ``(key, task, method, epsilon, lr, seed, split, config)`` not yet in
    ``cache`` (``workers`` spawned processes, or in this one)."""
    done = load_runs(cache)
    todo = [job for job in jobs if job[0] not in done]
    if not todo:
        return
    job = functools.partial(_job, study.train)

    def record(i: int, r: dict[str, Any], handle: Any) -> None:
        handle.write(json.dumps(r) + "\n")
        handle.flush()
        log(f"[{i}/{len(todo)}] {r['task']} {r['method']} eps={r['epsilon']} lr={r['lr']} "
            f"seed={r['seed']} {r['split']}: acc={r['accuracy']:.3f}")  # fmt: skip

    with cache.open("a") as handle:
        if workers <= 1:  # in-process: no start-up cost (tests, debugging)
            for i, args in enumerate(todo, 1):
                record(i, job(args), handle)
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for i, r in enumerate(pool.imap_unordered(job, todo), 1):
                record(i, r, handle)


def check_cache_protocol(path: Path, config: Any, study: Study) -> None:
    """Refuse to mix cached runs of another protocol (epochs, lr grid, ...) in."""
    if not path.exists():
        return
    cached = json.loads(path.read_text())
    current = json.loads(json.dumps(asdict(config)))
    defaults = json.loads(json.dumps(asdict(study.defaults)))  # fields added since
    differing = sorted(
        k
        for k in current
        if k not in study.selection_fields and cached.get(k, defaults[k]) != current[k]
    )
    if differing:
        raise ValueError(
            f"{path.parent} holds {study.label} runs of another protocol (differs in "
            f"{differing}); use a new output directory"
        )


# ----------------------------------------------------------------------------- lr selection


def val_key(task: str, method: str, epsilon: float, lr: float, repeat: int = 0) -> str:
    return f"val|{task}|{method}|{epsilon}|{lr}" + (f"|r{repeat}" if repeat else "")


def test_key(task: str, method: str, epsilon: float, lr: float, seed: int) -> str:
    return f"test|{task}|{method}|{epsilon}|{lr}|{seed}"


def validation_accuracy(runs: dict, config: Any, cell: tuple, lr: float) -> float:
    """Mean validation accuracy of ``lr`` over the selection repeats."""
    keys = [val_key(*cell, lr, k) for k in range(config.validation_repeats)]
    return statistics.fmean(runs[key]["accuracy"] for key in keys)


def widen_grid(lrs: Iterable[float], accuracies: dict[float, float]) -> tuple[float, ...]:
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


def select_lrs(
    config: Any, cache: Path, study: Study, log: Callable[[str], None]
) -> dict[tuple[str, str, float], tuple[float, tuple[float, ...]]]:
    """Best validation lr and final grid of every (task, method, epsilon)."""
    cells = [(t, m, e) for t in config.tasks for m in config.methods for e in config.epsilons]
    grids = {cell: tuple(sorted(config.lrs)) for cell in cells}
    open_cells = list(cells)
    for extension in range(config.max_lr_extensions + 1):
        jobs = [
            (val_key(t, m, e, lr, k), t, m, e, lr, config.validation_seed + k, "validation",
             config)
            for (t, m, e) in open_cells
            for lr in grids[t, m, e]
            for k in range(config.validation_repeats)
        ]  # fmt: skip
        run_jobs(jobs, cache, study, config.workers, log)
        if extension == config.max_lr_extensions:
            break  # no widening left: the row marks an lr at an end of its grid
        runs = load_runs(cache)
        still_open = []
        for cell in open_cells:
            accs = {lr: validation_accuracy(runs, config, cell, lr) for lr in grids[cell]}
            wider = widen_grid(grids[cell], accs)
            if wider != grids[cell]:
                grids[cell] = wider
                still_open.append(cell)
        open_cells = still_open
        if not open_cells:
            break
    runs = load_runs(cache)
    best = {}
    for cell in cells:
        accs = {lr: validation_accuracy(runs, config, cell, lr) for lr in grids[cell]}
        best[cell] = (max(grids[cell], key=lambda lr, a=accs: a[lr]), grids[cell])
    return best


# ----------------------------------------------------------------------------- the study


def run_study(
    study: Study, config: Any, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) ``study`` into ``out``; write ``{name}.json``, ``.md`` and ``.png``.

    Returns:
        The summary written to ``{name}.json``.
    """
    if len(set(config.methods)) != len(config.methods):
        raise ValueError(f"{study.label} methods listed twice: {list(config.methods)}")
    for name in config.methods:
        method_of(study.label, study.methods, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "runs.jsonl"
    check_cache_protocol(out / "config.json", config, study)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    best = select_lrs(config, cache, study, log)
    finals = [
        (test_key(t, m, e, lr, s), t, m, e, lr, s, "test", config)
        for (t, m, e), (lr, _) in best.items()
        for s in config.seeds
    ]
    run_jobs(finals, cache, study, config.workers, log)
    summary = summarize(study, config, load_runs(cache), best)
    (out / f"{study.name}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{study.name}.md").write_text(report(study, summary))
    plot(study, summary, out / f"{study.name}.png")
    return summary


def t_interval(values: list[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean."""
    if len(values) < 2:
        return float("nan")
    from scipy import stats

    return float(
        stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    )


def interval(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    half = t_interval(values)
    return {"mean": mean, "ci95": half, "low": mean - half, "high": mean + half}


def verdict(diff: dict[str, float]) -> str:
    if diff["low"] > 0:
        return "win"
    if diff["high"] < 0:
        return "loss"
    return "tie"


def _row(study: Study, config: Any, runs: dict, cell: tuple, lr: float, grid: tuple) -> dict:
    task, method, epsilon = cell
    finals = [runs[test_key(task, method, epsilon, lr, s)] for s in config.seeds]
    accs = [r["accuracy"] for r in finals]
    validation = {str(x): validation_accuracy(runs, config, cell, x) for x in grid}
    row = {
        "task": task, "method": method, "epsilon": epsilon, "lr": lr, "lr_grid": list(grid),
        "lr_at_end": lr in (min(grid), max(grid)), "safenorm": study.methods[method].safenorm,
        "accuracies": accs, **interval(accs), "validation": validation,
        "validation_best": validation[str(lr)],
        "epsilon_spent": max(r["epsilon_spent"] for r in finals),
    }  # fmt: skip
    diagnostics = [r["xhat_sq"] for r in finals if "xhat_sq" in r]
    if diagnostics:
        row["xhat_sq"] = {k: statistics.fmean(d[k] for d in diagnostics) for k in diagnostics[0]}
    return row


def summarize(study: Study, config: Any, runs: dict[str, dict], best: dict) -> dict[str, Any]:
    """Rows per (task, method, epsilon), paired differences and verdicts."""
    rows = [_row(study, config, runs, cell, lr, grid) for cell, (lr, grid) in best.items()]
    by_cell = {(r["task"], r["method"], r["epsilon"]): r for r in rows}
    comparisons = []
    for task in config.tasks:
        for epsilon in config.epsilons:
            cell = [by_cell[task, m, epsilon] for m in config.methods]
            anchors = [r for r in cell if study.methods[r["method"]].anchor]
            ours = [r for r in cell if r["safenorm"]]
            if not anchors or not ours:
                continue
            anchor = max(anchors, key=lambda r: r["mean"])
            diffs = {}
            for r in ours:
                pairs = zip(r["accuracies"], anchor["accuracies"], strict=True)
                d = interval([a - b for a, b in pairs])
                diffs[r["method"]] = {**d, "verdict": verdict(d)}
            recipe = max(ours, key=lambda r: r["validation_best"])["method"]
            margin = study.goal_margin(epsilon)
            comparisons.append({
                "task": task, "epsilon": epsilon, "best_anchor": anchor["method"],
                "differences": diffs, "recipe": recipe, "goal_margin": margin,
                "goal_met": diffs[recipe]["mean"] >= -margin,
            })  # fmt: skip
    return {"config": asdict(config), "rows": rows, "comparisons": comparisons}


# ----------------------------------------------------------------------------- report


def schedule_text(config: dict[str, Any]) -> str:
    """The DP-SGD schedule of a study's config, for its report's protocol paragraph."""
    return (
        f"delta = {config['delta']}, {config['epochs']} DP-SGD epochs, expected batch "
        f"{config['batch_size']}, clip {config['max_grad_norm']}, seeds {config['seeds']}"
    )


def _points(d: dict[str, float]) -> str:
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def report(study: Study, summary: dict[str, Any]) -> str:
    """Markdown: accuracy table per task, paired differences to the best anchor, verdicts."""
    config = summary["config"]
    epsilons = config["epsilons"]
    lines = [f"# {study.title}", "", study.intro(config)]
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
                end = ", end of grid" if r["lr_at_end"] else ""
                cells.append(f"{r['mean']:.1%} ± {r['ci95']:.1%} (lr {r['lr']:g}{end})")
            mark = " (S)" if study.methods[method].safenorm else ""
            lines.append(f"| {method}{mark} | " + " | ".join(cells) + " |")
        comps = [c for c in summary["comparisons"] if c["task"] == task]
        if not comps:
            continue
        names = list(comps[0]["differences"])
        lines += [
            "",
            "Paired difference to the best anchor (points, 95% t-interval), verdict:",
            "",
            "| eps | best anchor | " + " | ".join(names) + " | recipe (val) | goal |",
            "|---|---|" + "---|" * (len(names) + 2),
        ]
        for c in comps:
            cells = [f"{_points(d)} {d['verdict']}" for d in c["differences"].values()]
            goal = "met" if c["goal_met"] else "missed"
            if c["goal_margin"]:
                goal += f" (within {100 * c['goal_margin']:g})"
            lines.append(
                f"| {c['epsilon']:g} | {c['best_anchor']} | " + " | ".join(cells) +
                f" | {c['recipe']} | {goal} |"
            )  # fmt: skip
        lines += _diagnostic_lines(config, [r for r in summary["rows"] if r["task"] == task])
    return "\n".join(lines) + "\n"


def _diagnostic_lines(config: dict[str, Any], rows: list[dict]) -> list[str]:
    rows = [r for r in rows if "xhat_sq" in r]
    if not rows:
        return []
    lines = [
        "",
        "Diagnostic: E[xhat^2] per DP layer over the last training epoch (1 when the "
        "statistics it normalizes with track the activations), mean over the test seeds:",
        "",
        "| method | eps | " + " | ".join(f"layer {k}" for k in rows[0]["xhat_sq"]) + " |",
        "|---|---|" + "---|" * len(rows[0]["xhat_sq"]),
    ]
    for r in rows:
        values = " | ".join(f"{v:.2f}" for v in r["xhat_sq"].values())
        lines.append(f"| {r['method']} | {r['epsilon']:g} | {values} |")
    return lines


def plot(study: Study, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["config"]["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 methods
    for ax, task in zip(axes[0], tasks, strict=True):
        for index, method in enumerate(summary["config"]["methods"]):
            rows = sorted(
                (r for r in summary["rows"] if r["method"] == method and r["task"] == task),
                key=lambda r: r["epsilon"],
            )
            ours = study.methods[method].safenorm
            ax.errorbar(
                [r["epsilon"] for r in rows], [r["mean"] for r in rows],
                yerr=[0 if math.isnan(r["ci95"]) else r["ci95"] for r in rows], marker="o",
                capsize=3, linestyle="-" if ours else "--", label=method,
                color=colors[2 * index % 20 + (2 * index // 20) % 2],
            )  # fmt: skip
        ax.set_xscale("log")
        epsilons = summary["config"]["epsilons"]
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.minorticks_off()
        ax.set_xlabel(f"epsilon (delta = {summary['config']['delta']:g})")
        ax.set_ylabel("test accuracy")
        ax.set_title(study.plot_title(task))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
