"""Command line: ``safenorm-eval run|report|merge|list|utility|finetune``."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from safenorm.evaluation.attacks import ATTACKS
from safenorm.evaluation.canaries import CANARIES
from safenorm.evaluation.config import PROFILES, EvalConfig, apply_overrides, get_profile
from safenorm.evaluation.data import DATASETS
from safenorm.evaluation.harness import LOGGER, Harness, Shard, merge_outputs, parse_shard
from safenorm.evaluation.models import MODELS
from safenorm.evaluation.report import write_report
from safenorm.evaluation.study import Study, is_study
from safenorm.evaluation.training import DivergenceError
from safenorm.evaluation.variants import VARIANTS

__all__ = ["build_parser", "main"]

EPILOG = """\
examples:
  safenorm-eval run --profile quick --out safenorm-eval-out     # every variant on digits, CPU
  safenorm-eval run --profile quick --variants bn,ghost,groupnorm --num-models 16
  safenorm-eval run --profile full --data-root ~/data/cifar-10-batches-py --shard 0/4 --out s0
  safenorm-eval merge --out full s0 s1 s2 s3                     # then writes the report
  safenorm-eval report --out safenorm-eval-out                   # re-analyse the cache
  safenorm-eval run --profile quick --set train.epochs=40 --set attacks.ci=bootstrap
  safenorm-eval run --profile standard --out std --shard 0/2     # 3 seeds x 2 widths, verdicts
  safenorm-eval run --profile frontier --out std-copy            # + ghost/clip sweep (cached refs)
  safenorm-eval list                                             # variants, attacks, profiles
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="safenorm-eval",
        description="Memorization, influence, membership inference and DP audit of "
        "normalization variants against standard BatchNorm.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser(
        "run",
        help="train, score (resuming from the cache) and report",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--profile", default="quick", help=f"one of {PROFILES.names()}")
    run.add_argument("--config", type=Path, help="a JSON config (from a previous config.json)")
    run.add_argument("--out", type=Path, default=Path("safenorm-eval-out"))
    run.add_argument("--variants", help="comma-separated variant names")
    run.add_argument("--num-models", type=int, help="models per variant (>= 2)")
    run.add_argument("--seed", type=int)
    run.add_argument("--seeds", help="comma-separated master seeds: a study over seeds")
    run.add_argument("--models", help="comma-separated models: a study over models")
    run.add_argument("--device", help="auto, cpu, cuda, cuda:1...")
    run.add_argument("--dataset", help=f"one of {DATASETS.names()}")
    run.add_argument("--data-root", help="directory of on-disk data (CIFAR-10 pickles)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. train.epochs=40",
    )
    run.add_argument("--shard", help="i/n: train only models with index %% n == i")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first diverged model (default: record it as diverged, leave it out "
        "of the attacks and go on)",
    )

    rep = sub.add_parser("report", help="analyse the cache of an output directory again")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override analysis settings, e.g. attacks.ci=bootstrap",
    )
    rep.add_argument("--no-plots", action="store_true")

    merge = sub.add_parser("merge", help="merge the caches of shard outputs and report")
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("shards", nargs="+", type=Path)
    merge.add_argument("--no-plots", action="store_true")

    sub.add_parser("list", help="list variants, attacks, datasets, models, canaries, profiles")

    util = sub.add_parser(
        "utility",
        help="privacy-utility study from scratch: DP-SGD accuracy at several epsilons, "
        "safenorm's DP BatchNorm recipes vs GroupNorm, InstanceNorm (Opacus' fix), LayerNorm, "
        "none and GroupNorm + weight standardization",
    )
    util.add_argument("--out", type=Path, default=Path("safenorm-utility-out"))
    util.add_argument("--methods", help="comma-separated methods (default: all)")
    util.add_argument("--epsilons", default="1,3,8", help="comma-separated target epsilons")
    util.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    util.add_argument("--lrs", default="0.125,0.25,0.5,1,2", help="initial learning-rate grid")
    util.add_argument("--epochs", type=int, default=15)
    util.add_argument("--statistics-share", type=float, default=0.1)
    util.add_argument("--validation-repeats", type=int, default=3, help="runs per lr, averaged")
    util.add_argument("--workers", type=int, default=2)

    tune = sub.add_parser(
        "finetune",
        help="DP fine-tuning study of a BatchNorm-pretrained model (public digits 0-4, private "
        "5-9): Opacus' fix, GroupNorm, linear probe vs safenorm's frozen/released statistics",
    )
    tune.add_argument("--out", type=Path, default=Path("safenorm-finetune-out"))
    tune.add_argument("--tasks", default="plain,rotated,rotated-scarce", help="private tasks")
    tune.add_argument("--methods", help="comma-separated methods (default: all)")
    tune.add_argument("--epsilons", default="1,3,8", help="comma-separated target epsilons")
    tune.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    tune.add_argument("--epochs", type=int, default=10)
    tune.add_argument("--validation-repeats", type=int, default=1, help="runs per lr, averaged")
    tune.add_argument("--workers", type=int, default=2)
    return parser


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _cmd_utility(args: argparse.Namespace) -> int:
    from safenorm.evaluation.utility import UtilityConfig, run_utility_study

    chosen = {"methods": tuple(args.methods.split(","))} if args.methods else {}
    config = UtilityConfig(
        epsilons=_floats(args.epsilons),
        seeds=tuple(int(v) for v in args.seeds.split(",")),
        lrs=_floats(args.lrs),
        epochs=args.epochs,
        statistics_share=args.statistics_share,
        validation_repeats=args.validation_repeats,
        workers=args.workers,
        **chosen,
    )
    run_utility_study(config, args.out)
    print((args.out / "utility.md").read_text())
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from safenorm.evaluation.finetune import FinetuneConfig, run_finetune_study

    chosen = {"methods": tuple(args.methods.split(","))} if args.methods else {}
    config = FinetuneConfig(
        tasks=tuple(args.tasks.split(",")),
        epsilons=_floats(args.epsilons),
        seeds=tuple(int(v) for v in args.seeds.split(",")),
        epochs=args.epochs,
        validation_repeats=args.validation_repeats,
        workers=args.workers,
        **chosen,
    )
    run_finetune_study(config, args.out)
    print((args.out / "finetune.md").read_text())
    return 0


def _setup_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # a root handler set by a dependency would print every line
    for h in list(LOGGER.handlers):
        if getattr(h, "_safenorm_eval", False):
            LOGGER.removeHandler(h)
            h.close()
    file_handler = logging.FileHandler(out / "log.txt")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter("safenorm-eval: %(message)s"))
    for h in (file_handler, stderr):
        h._safenorm_eval = True  # type: ignore[attr-defined]
        LOGGER.addHandler(h)


def _config_from_args(args: argparse.Namespace) -> EvalConfig:
    if args.config is not None:
        config = EvalConfig.from_dict(json.loads(args.config.read_text()))
    else:
        config = get_profile(args.profile)
    overrides = list(args.set)
    for flag, key in (
        ("variants", "variants"),
        ("num_models", "num_models"),
        ("seed", "seed"),
        ("seeds", "seeds"),
        ("models", "models"),
        ("device", "device"),
        ("dataset", "data.dataset"),
        ("data_root", "data.root"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.insert(0, f"{key}={value}")
    config = apply_overrides(config, overrides)
    if config.num_models < 2:
        raise ValueError(
            "num_models must be at least 2 (each model is attacked with the others as shadows)"
        )
    return config


def _report(harness: Harness, plots: bool) -> Path | None:
    incomplete = {
        v: harness.missing(v)
        for v in harness.variants
        if v not in harness.unavailable() and harness.missing(v)
    }
    results = harness.analyze()
    skipped = {**harness.unavailable(), **harness.too_few_converged()}
    path = write_report(harness.out, harness.config, results, skipped, incomplete, plots=plots)
    LOGGER.info("report written to %s", path)
    return path


def _print_summary(path: Path) -> None:
    text = path.read_text().split("\n")
    start = next((i for i, line in enumerate(text) if line.startswith("| variant")), None)
    if start is not None:
        end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
        print("\n".join(text[start:end]))
    print(f"\nreport: {path}")


def _cmd_run(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    shard = parse_shard(args.shard)
    _setup_logging(args.out)
    (args.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if is_study(config):
        return _run_study(config, args, shard)
    harness = Harness(config, args.out, progress=not args.no_progress, fail_fast=args.fail_fast)
    for name, reason in harness.unavailable().items():
        print(
            f"safenorm-eval: variant {name} is unavailable and skipped: {reason}", file=sys.stderr
        )
    start = time.perf_counter()
    trained = harness.run(shard)
    LOGGER.info("trained %d models in %.1fs", trained, time.perf_counter() - start)
    waiting = [v for v in harness.variants if v not in harness.unavailable() and harness.missing(v)]
    if waiting:
        print(
            f"shard {args.shard} done ({trained} models trained); variants {waiting} still "
            f"miss models of other shards: run `safenorm-eval merge --out DIR SHARD_DIRS...`"
        )
        return 0
    _print_summary(_report(harness, not args.no_plots))
    return 0


def _run_study(config: EvalConfig, args: argparse.Namespace, shard: Shard) -> int:
    study = Study(config, args.out, progress=not args.no_progress, fail_fast=args.fail_fast)
    start = time.perf_counter()
    trained = study.run(shard)
    LOGGER.info("trained %d models in %.1fs", trained, time.perf_counter() - start)
    waiting = study.incomplete()
    if waiting:
        print(
            f"shard {args.shard} done ({trained} models trained); cells {sorted(waiting)} still "
            f"miss models of other shards: run `safenorm-eval merge --out DIR SHARD_DIRS...`"
        )
        return 0
    _print_study(study.analyze(plots=not args.no_plots))
    return 0


def _print_study(path: Path) -> None:
    text = path.read_text().split("\n")
    start = next((i for i, line in enumerate(text) if line.startswith("| finding")), None)
    if start is not None:
        end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
        print("\n".join(text[start:end]))
    print(f"\nreport: {path}")


def _load_config(out: Path, overrides: Sequence[str] = ()) -> EvalConfig:
    path = out / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a safenorm-eval output directory")
    return apply_overrides(EvalConfig.from_dict(json.loads(path.read_text())), list(overrides))


def _cmd_report(args: argparse.Namespace) -> int:
    _setup_logging(args.out)
    config = _load_config(args.out, args.set)
    if is_study(config):
        _print_study(Study(config, args.out, progress=False).analyze(plots=not args.no_plots))
        return 0
    harness = Harness(config, args.out, progress=False)
    _print_summary(_report(harness, not args.no_plots))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.json"
    first = args.shards[0] / "config.json"
    if not config_path.exists() and first.exists():
        shutil.copy2(first, config_path)
    if config_path.exists() and is_study(_load_config(args.out)):
        _setup_logging(args.out)
        study = Study(_load_config(args.out), args.out, progress=False)
        copied = study.merge(list(args.shards))
        LOGGER.info("merged %d model files from %s", copied, [str(s) for s in args.shards])
        _print_study(study.analyze(plots=not args.no_plots))
        return 0
    copied = merge_outputs(args.out, args.shards)
    _setup_logging(args.out)
    LOGGER.info("merged %d model files from %s", copied, [str(s) for s in args.shards])
    harness = Harness(_load_config(args.out), args.out, progress=False)
    _print_summary(_report(harness, not args.no_plots))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for title, reg in (
        ("variants", VARIANTS),
        ("attacks", ATTACKS),
        ("datasets", DATASETS),
        ("models", MODELS),
        ("canary types", CANARIES),
        ("profiles", PROFILES),
    ):
        print(f"{title}:")
        for name in reg.names():
            aliases = reg.aliases_of(name)
            item = reg.get(name)
            desc = getattr(item, "description", None) or (getattr(item, "__doc__", "") or "")
            desc = desc.strip().split("\n")[0]
            extra = ""
            if reg is VARIANTS:
                reason = item.unavailable_reason()
                extra = f"  [unavailable: {reason}]" if reason else ""
            alias_text = f" (aliases: {', '.join(aliases)})" if aliases else ""
            print(f"  {name}{alias_text}: {desc}{extra}")
    return 0


COMMANDS = {
    "run": _cmd_run,
    "report": _cmd_report,
    "merge": _cmd_merge,
    "list": _cmd_list,
    "utility": _cmd_utility,
    "finetune": _cmd_finetune,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``safenorm-eval``; ``run`` is the default command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (KeyError, ValueError, FileNotFoundError, DivergenceError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"safenorm-eval: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
