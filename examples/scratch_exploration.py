"""Exploration on the validation split only: DPBatchNorm's statistics knobs from scratch.

The from-scratch study (``safenorm-eval utility``) tunes only the learning rate. This script
searches the knobs that set how much noise the normalization sees: the running-statistics
momentum (how many releases are averaged), the mean bound ``R1`` per channel, the statistics'
share of the budget, on top of weight standardization (``dp-ws``, the best DP family on
validation at eps 1 in the first study). Every run trains on the ``fit`` split and scores the
``validation`` split (seeds 1000-1002, the study's selection seeds), never the test split; the
settings it picks become methods of the study, which then tunes their lr and tests them like
every other method.

    python examples/scratch_exploration.py --out evaluation/results/from_scratch/exploration.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
from dataclasses import replace
from pathlib import Path

import torch
from safenorm.evaluation.dpstudy import dp_train_and_score, load_runs
from safenorm.evaluation.models import digits_dp_cnn, swap_batchnorm, weight_standardized
from safenorm.evaluation.utility import METHODS, UtilityConfig, _splits

import safenorm

GRID = {
    "momentum": (0.1, 0.03, 0.01),
    "mean_clip_per_channel": (1.0, 0.5),
    "statistics_share": (0.1, 0.03, 0.3),
}


def _model(momentum: float, mean_clip_per_channel: float) -> torch.nn.Module:
    def layer(c: int) -> torch.nn.Module:
        return safenorm.DPBatchNorm2d(
            c, momentum=momentum, clip_norm=mean_clip_per_channel * math.sqrt(c)
        )

    return weight_standardized(swap_batchnorm(digits_dp_cnn(), layer))


def _job(args: tuple) -> dict:
    torch.set_num_threads(1)
    key, setting, epsilon, lr, seed = args
    config = replace(UtilityConfig(), statistics_share=setting["statistics_share"])
    data = _splits(config)
    torch.manual_seed(seed)
    model = _model(setting["momentum"], setting["mean_clip_per_channel"])
    result = dp_train_and_score(
        model, METHODS["dp-ws"], data["fit"], data["validation"], epsilon, lr, seed, config
    )
    return {"key": key, "setting": setting, "epsilon": epsilon, "lr": lr, "seed": seed,
            "split": "validation", **result}  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--lrs", default="0.25,0.5,1")
    parser.add_argument("--momenta", default=",".join(map(str, GRID["momentum"])))
    parser.add_argument("--mean-clips", default=",".join(map(str, GRID["mean_clip_per_channel"])))
    parser.add_argument("--shares", default=",".join(map(str, GRID["statistics_share"])))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    grid = {
        "momentum": _floats(args.momenta),
        "mean_clip_per_channel": _floats(args.mean_clips),
        "statistics_share": _floats(args.shares),
    }
    jobs = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values, strict=True))
        for epsilon in _floats(args.epsilons):
            for lr in _floats(args.lrs):
                for seed in (1000, 1001, 1002):
                    key = f"{json.dumps(setting, sort_keys=True)}|{epsilon}|{lr}|{seed}"
                    jobs.append((key, setting, epsilon, lr, seed))
    done = load_runs(args.out)
    todo = [job for job in jobs if job[0] not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers) as pool, args.out.open("a") as handle:
        for i, record in enumerate(pool.imap_unordered(_job, todo), 1):
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            print(f"[{i}/{len(todo)}] {record['key']}: {record['accuracy']:.3f}", flush=True)
    report = summary(list(load_runs(args.out).values()))
    args.out.with_name("exploration.md").write_text(report)
    print(report)


def summary(runs: list[dict]) -> str:
    """Markdown: mean validation accuracy over the seeds run, per setting, epsilon and lr."""
    cells: dict[tuple, dict[float, list[float]]] = {}
    for r in runs:
        s = r["setting"]
        key = (s["momentum"], s["mean_clip_per_channel"], s["statistics_share"], r["epsilon"])
        cells.setdefault(key, {}).setdefault(r["lr"], []).append(r["accuracy"])
    lines = [
        "# DPBatchNorm2d + weight standardization: statistics knobs (validation split only)",
        "",
        "Mean validation accuracy over the seeds run (1000-1002), per lr; the first pass's",
        "defaults are momentum 0.1, mean bound 1 per channel, share 0.1.",
        "",
        "| momentum | mean bound / channel | statistics share | eps | accuracy by lr | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for (momentum, clip, share, epsilon), by_lr in sorted(cells.items()):
        accs = ", ".join(f"{lr:g}: {sum(v) / len(v):.3f}" for lr, v in sorted(by_lr.items()))
        seeds = min(len(v) for v in by_lr.values())
        lines.append(f"| {momentum:g} | {clip:g} | {share:g} | {epsilon:g} | {accs} | {seeds} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
