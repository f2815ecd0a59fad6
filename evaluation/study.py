"""A study: the protocol repeated over master seeds and model widths, reported over seeds.

A config with ``seeds`` and/or ``models`` expands into *cells*, one :class:`Harness` per
(seed, model), each in ``<out>/cells/seed<S>-<model>/`` with its own cache, report and raw
per-example scores. A cell is resumable and ``--shard i/n`` trains models ``index % n == i`` of
every cell, so shards split each cell evenly. The study's own ``report.md`` / ``report.json``
aggregate the cells (:mod:`safenorm.evaluation.aggregate`): the verdict table first, then
means with 95% intervals over seeds and paired differences to ``bn``, then the frontier sweep
when the config has swept variants (``ghost@N``, ``clipped@S``).

Layout::

    config.json, log.txt           the study's config and log
    report.md, report.json         the aggregate (verdicts, intervals over seeds, frontier)
    frontier.png, auc_by_variant.png
    cells/seed0-small-cnn/         a complete single-run output (cache/, scores/, report.md)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safenorm.evaluation import aggregate as agg
from safenorm.evaluation.config import EvalConfig
from safenorm.evaluation.harness import LOGGER, Harness, Shard, merge_outputs
from safenorm.evaluation.report import write_report
from safenorm.evaluation.variants import VARIANTS

__all__ = ["Cell", "Study", "is_study"]


@dataclass(frozen=True)
class Cell:
    """One repetition: a master seed and a registered model."""

    seed: int
    model: str

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.model}"


def is_study(config: EvalConfig) -> bool:
    """Whether ``config`` repeats the protocol (``seeds`` or ``models`` set)."""
    return bool(config.seeds or config.models)


class Study:
    """Runs and aggregates every cell of a multi-seed, multi-model config.

    Args:
        config: a config with ``seeds`` and/or ``models``.
        out_dir: the study's output directory.
        progress, fail_fast: passed to each cell's :class:`Harness`.
    """

    def __init__(
        self,
        config: EvalConfig,
        out_dir: str | Path,
        *,
        progress: bool = True,
        fail_fast: bool = False,
    ) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.fail_fast = fail_fast
        seeds = config.seeds or (config.seed,)
        models = config.models or (config.model,)
        # seeds outermost: an interrupted study has whole seeds done first
        self.cells = [Cell(s, m) for s in seeds for m in models]
        self._harnesses: dict[Cell, Harness] = {}

    def cell_config(self, cell: Cell) -> EvalConfig:
        return dataclasses.replace(
            self.config, seed=cell.seed, model=cell.model, seeds=(), models=()
        )

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name

    def harness(self, cell: Cell) -> Harness:
        if cell not in self._harnesses:
            self._harnesses[cell] = Harness(
                self.cell_config(cell),
                self.cell_dir(cell),
                progress=self.progress,
                fail_fast=self.fail_fast,
            )
        return self._harnesses[cell]

    @property
    def variants(self) -> list[str]:
        return self.harness(self.cells[0]).variants

    def pending(self, shard: Shard | None = None) -> int:
        return sum(len(self.harness(c).pending(shard or Shard())) for c in self.cells)

    def run(self, shard: Shard | None = None) -> int:
        """Train every pending model of ``shard`` in every cell; returns how many."""
        shard = shard or Shard()
        trained = 0
        for cell in self.cells:
            h = self.harness(cell)
            h.out.mkdir(parents=True, exist_ok=True)
            (h.out / "config.json").write_text(json.dumps(h.config.to_dict(), indent=2))
            start = time.perf_counter()
            n = h.run(shard)
            trained += n
            LOGGER.info("cell %s: %d models in %.1fs", cell.name, n, time.perf_counter() - start)
        return trained

    def incomplete(self) -> dict[str, dict[str, list[int]]]:
        """Cells whose available variants still miss models (other shards)."""
        out = {}
        for cell in self.cells:
            h = self.harness(cell)
            missing = {v: h.missing(v) for v in h.variants if v not in h.unavailable()}
            missing = {v: m for v, m in missing.items() if m}
            if missing:
                out[cell.name] = missing
        return out

    def merge(self, shard_dirs: list[Path]) -> int:
        """Copy the cells' caches of ``shard_dirs`` (study outputs) into this study."""
        copied = 0
        for cell in self.cells:
            sources = [Path(s) / "cells" / cell.name for s in shard_dirs]
            sources = [s for s in sources if (s / "cache").is_dir()]
            if sources:
                copied += merge_outputs(self.cell_dir(cell), sources)
        return copied

    # -- analysis --------------------------------------------------------------------------------

    def analyze(self, plots: bool = True) -> Path:
        """Report every complete cell, then the aggregate; returns the study's report.md."""
        table: dict[str, dict[str, dict[str, float | None]]] = {}
        cells: dict[str, dict[str, Any]] = {}
        headline = self.config.attacks.headline
        for cell in self.cells:
            h = self.harness(cell)
            complete = [v for v in h.variants if v not in h.unavailable() and not h.missing(v)]
            if not complete:
                continue
            results = h.analyze()
            skipped = {**h.unavailable(), **h.too_few_converged()}
            incomplete = {v: h.missing(v) for v in h.variants if h.missing(v)}
            write_report(h.out, h.config, results, skipped, incomplete, plots=False)
            table[cell.name] = {
                v: agg.cell_metrics(r.summary, headline) for v, r in results.items()
            }
            cells[cell.name] = {
                "seed": cell.seed,
                "model": cell.model,
                "variants": {
                    v: {
                        "num_models": r.summary["num_models"],
                        "diverged": r.summary.get("diverged", {}).get("count", 0),
                        "train_seconds": r.summary["train_seconds"],
                        "norm_layers": r.summary.get("norm_layers"),
                    }
                    for v, r in results.items()
                },
                "skipped": skipped,
            }
        payload = self._aggregate(table, cells)
        files = _plots(self.out, payload) if plots and table else []
        payload["plots"] = files
        (self.out / "report.json").write_text(json.dumps(payload, indent=2, allow_nan=True))
        path = self.out / "report.md"
        path.write_text(_markdown(payload))
        return path

    def _aggregate(
        self, table: dict[str, dict[str, dict[str, float | None]]], cells: dict[str, Any]
    ) -> dict[str, Any]:
        variants = self.variants
        models = list(dict.fromkeys(c.model for c in self.cells))
        by_model: dict[str, Any] = {}
        for model in models:
            sub = {n: t for n, t in table.items() if cells[n]["model"] == model}
            by_model[model] = {
                "cells": sorted(sub),
                "variants": {
                    v: {
                        m.key: {
                            **agg.t_interval([t[v][m.key] for t in sub.values() if v in t]),
                            "diff": agg.t_interval(agg.paired(sub, v, m.key))
                            if v != agg.REFERENCE
                            else None,
                        }
                        for m in agg.METRICS
                    }
                    for v in variants
                    if any(v in t for t in sub.values())
                },
                "verdicts": agg.verdicts(sub),
            }
        swept = [v for v in variants if "@" in v or v in ("ghost", "clipped")]
        frontier = None
        if any("@" in v for v in variants):
            narrow = models[0]
            sub = {n: t for n, t in table.items() if cells[n]["model"] == narrow}
            frontier = {"model": narrow, **agg.frontier(sub, swept)}
        return {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": self.config.to_dict(),
            "reference_variant": agg.REFERENCE,
            "headline_attack": self.config.attacks.headline,
            "verdict_rule": agg.VERDICT_RULE,
            "recommendation_rule": agg.RECOMMENDATION_RULE,
            "cells": cells,
            "per_cell_metrics": table,
            "verdicts": agg.verdicts(table),
            "by_model": by_model,
            "frontier": frontier,
            "norm_layers": {m: {v: _first_layers(cells, m, v) for v in variants} for m in models},
            "metrics": {
                m.key: {"label": m.label, "higher_means_more_leakage": m.leakage}
                for m in agg.METRICS
            },
        }


def _first_layers(cells: dict[str, Any], model: str, variant: str) -> str | None:
    for c in cells.values():
        if c["model"] == model and variant in c["variants"]:
            return c["variants"][variant]["norm_layers"]
    return None


# -- rendering -----------------------------------------------------------------------------------


def _f(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _iv(d: dict[str, Any] | None, digits: int, signed: bool = False) -> str:
    if not d or d.get("mean") is None:
        return "–"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if d.get("low") is None:
        return fmt.format(d["mean"])
    return f"{fmt.format(d['mean'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


HEADLINE_COLUMNS = ("test_acc", "exposure", "exposure_extrapolated", "in_out_gap")
HEADLINE_COLUMNS += ("grad_norm_ratio", "auc_pool", "tpr_1")
HEADLINE_COLUMNS += ("tpr_01", "auc_canaries", "audit_eps")


def _verdict_table(verdicts: list[dict[str, Any]], by_model: dict[str, Any]) -> list[str]:
    alts = list(dict.fromkeys(v["alternative"] for v in verdicts))
    lines = [
        "| finding | " + " | ".join(f"vs `{a}`" for a in alts) + " |",
        "|---" * (1 + len(alts)) + "|",
    ]
    for finding in agg.FINDINGS:
        cells = []
        for a in alts:
            v = next(
                (x for x in verdicts if x["finding"] == finding.key and x["alternative"] == a), None
            )
            if v is None:
                cells.append("–")
                continue
            widths = []
            for model, b in by_model.items():
                w = next(
                    (
                        x
                        for x in b["verdicts"]
                        if x["finding"] == finding.key and x["alternative"] == a
                    ),
                    None,
                )
                if w is not None:
                    widths.append(f"{model}: {w['call']}")
            cells.append(f"**{v['call']}** ({v['cells']} cells; " + "; ".join(widths) + ")")
        lines.append(f"| {finding.title} | " + " | ".join(cells) + " |")
    return lines


def _verdict_details(verdicts: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| finding | vs | metric | mean bn − alt [Bonferroni interval] | cells | call |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        for key, m in v["metrics"].items():
            metric = agg.metric(key)
            lines.append(
                f"| {v['finding']} | {v['alternative']} | {metric.label} | "
                f"{_iv(m, metric.digits + 1, signed=True)} ({m['confidence']:.1%}) | {m['n']} | "
                f"{m['call']} |"
            )
    return lines


def _model_table(model: str, block: dict[str, Any], layers: dict[str, str | None]) -> list[str]:
    cols = [agg.metric(k) for k in HEADLINE_COLUMNS]
    lines = [
        f"### `{model}` ({len(block['cells'])} seeds)",
        "",
        "Each cell: mean over seeds [95% t-interval]; below it, the paired difference to `bn` "
        "[95% t-interval over seeds].",
        "",
        "| variant | " + " | ".join(c.label for c in cols) + " |",
        "|---" * (1 + len(cols)) + "|",
    ]
    for v, d in block["variants"].items():
        lines.append(f"| **{v}** | " + " | ".join(_iv(d[c.key], c.digits) for c in cols) + " |")
        if v != agg.REFERENCE:
            lines.append(
                "| Δ vs bn | "
                + " | ".join(_iv(d[c.key]["diff"], c.digits, signed=True) for c in cols)
                + " |"
            )
    lines += ["", "Normalization layers (groups x channels per group):", ""]
    lines += [f"- `{v}`: {layers.get(v) or '–'}" for v in block["variants"]]
    return [*lines, ""]


def _frontier_section(
    fr: dict[str, Any], by_model: dict[str, Any], config: dict, cells: dict[str, Any]
) -> list[str]:
    block = by_model[fr["model"]]["variants"]
    o = config["options"]
    lines = [
        "## Frontier: ghost batch size and clip bounds",
        "",
        f"Model `{fr['model']}`, {len(by_model[fr['model']]['cells'])} seeds. `ghost` is "
        f"ghost_batch_size {o['ghost_batch_size']}; `clipped` is the layer's default bounds "
        "(2√C, 4√C) times `clip_scale` "
        f"{o['clip_scale']:g}; `clipped@S` scales both by S. AUC: pool, headline attack, eval "
        "mode. Means [95% t-interval over seeds].",
        "",
        "| setting | test acc (%) | AUC (pool) | TPR@0.1% | AUC removed vs bn | accuracy drop "
        "vs bn (points) | diverged models | qualifies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in [agg.REFERENCE, *fr["settings"], "groupnorm", "instancenorm", "layernorm", "none"]:
        if v not in block:
            continue
        d = block[v]
        r = fr["settings"].get(v, {})
        div = sum(
            x["variants"].get(v, {}).get("diverged", 0)
            for x in cells.values()
            if x["model"] == fr["model"]
        )
        lines.append(
            f"| {v} | {_iv(d['test_acc'], 2)} | {_iv(d['auc_pool'], 3)} | {_iv(d['tpr_01'], 3)} | "
            f"{_iv(r.get('auc_removed'), 3, True)} | {_iv(r.get('accuracy_drop'), 2, True)} | "
            f"{div} | {_yes_no(r.get('qualifies'))} |"
        )
    e = fr["extra_leakage"]
    lines += [
        "",
        f"BN's extra pool AUC over GroupNorm: E = {_iv(e, 3, True)}.",
        "",
        f"**Decision (rule below): {fr['decision']}.**",
        "",
        "Rule, fixed before the run:",
        "",
        "> " + agg.RECOMMENDATION_RULE.replace("\n", " "),
        "",
    ]
    return lines


def _yes_no(flag: bool | None) -> str:
    return "–" if flag is None else "yes" if flag else "no"


def _markdown(p: dict[str, Any]) -> str:
    c = p["config"]
    seeds = sorted({x["seed"] for x in p["cells"].values()})
    models = list(dict.fromkeys(x["model"] for x in p["cells"].values()))
    total_models = sum(
        v["num_models"] + v["diverged"] for x in p["cells"].values() for v in x["variants"].values()
    )
    diverged = sum(v["diverged"] for x in p["cells"].values() for v in x["variants"].values())
    seconds = sum(v["train_seconds"] for x in p["cells"].values() for v in x["variants"].values())
    lines = [
        "# safenorm-eval study report",
        "",
        f"Profile `{c['profile']}`: dataset `{c['data']['dataset']}` (pool {c['data']['pool_size']}"
        f", test {c['data']['test_size']}), {len(p['cells'])} cells = seeds {seeds} × models "
        f"{[f'`{m}`' for m in models]}, {c['num_models']} models per variant and cell "
        f"({total_models} models, {diverged} diverged and excluded; {seconds / 60:.1f} min of "
        f"training). Each seed draws its own split, canaries, IN/OUT masks and initialisations. "
        f"Headline attack `{p['headline_attack']}`, eval-mode queries.",
        "",
        "## Verdicts",
        "",
        "Each call pools all cells (both widths); the per-width calls follow in parentheses.",
        "",
        *_verdict_table(p["verdicts"], p["by_model"]),
        "",
        "Rule, fixed in the code (`safenorm.evaluation.aggregate.VERDICT_RULE`) before the run:",
        "",
        *["> " + line for line in p["verdict_rule"].split("\n")],
        "",
        "<details><summary>Per-metric paired differences behind the calls (all cells)</summary>",
        "",
        *_verdict_details(p["verdicts"]),
        "",
        "</details>",
        "",
        "## Means over seeds and paired differences to `bn`",
        "",
    ]
    for model, block in p["by_model"].items():
        lines += _model_table(model, block, p["norm_layers"].get(model, {}))
    if p.get("frontier"):
        lines += _frontier_section(p["frontier"], p["by_model"], c, p["cells"])
    lines += [
        "## Cells",
        "",
        "| cell | " + " | ".join(f"`{v}` AUC (pool)" for v in _all_variants(p)) + " |",
        "|---" * (1 + len(_all_variants(p))) + "|",
    ]
    for name, row in p["per_cell_metrics"].items():
        cells = []
        for v in _all_variants(p):
            val = row.get(v, {}).get("auc_pool")
            div = p["cells"][name]["variants"].get(v, {}).get("diverged", 0)
            cells.append(_f(val, 3) + (f" ({div} div.)" if div else ""))
        lines.append(f"| [{name}](cells/{name}/report.md) | " + " | ".join(cells) + " |")
    skipped = {n: x["skipped"] for n, x in p["cells"].items() if x["skipped"]}
    if skipped:
        lines += ["", "Skipped in some cells:", ""]
        lines += [f"- {n}: {s}" for n, s in skipped.items()]
    lines += [""]
    if p.get("plots"):
        lines += ["## Plots", ""] + [f"![{f}]({f})" for f in p["plots"]] + [""]
    return "\n".join(lines)


def _all_variants(p: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for row in p["per_cell_metrics"].values():
        seen.update(dict.fromkeys(row))
    return list(seen)


def _plots(out: Path, p: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    models = list(p["by_model"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        block = p["by_model"][model]["variants"]
        names = [v for v in block if "@" not in v]
        means = [block[v]["auc_pool"]["mean"] or 0 for v in names]
        err = [
            [m - (block[v]["auc_pool"]["low"] or m) for v, m in zip(names, means, strict=True)],
            [(block[v]["auc_pool"]["high"] or m) - m for v, m in zip(names, means, strict=True)],
        ]
        ax.bar(range(len(names)), means, yerr=err, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(ylim=(0.45, max([*means, 0.55]) + 0.05), ylabel="pool AUC (95% interval over seeds)")
        ax.set_title(f"{model}: {p['headline_attack']} pool AUC")
    fig.tight_layout()
    fig.savefig(out / "auc_by_variant.png", dpi=100)
    plt.close(fig)
    files.append("auc_by_variant.png")

    fr = p.get("frontier")
    if fr:
        block = p["by_model"][fr["model"]]["variants"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, key, label in zip(
            axes, ("auc_pool", "tpr_01"), ("pool AUC", "TPR at 0.1% FPR"), strict=True
        ):
            for family, marker in (("ghost", "o-"), ("clipped", "s-")):
                pts = [v for v in block if v == family or v.startswith(family + "@")]
                pts.sort(key=lambda v: _setting_value(v, p["config"]))
                xs = [block[v]["test_acc"]["mean"] for v in pts]
                ys = [block[v][key]["mean"] for v in pts]
                ax.plot(xs, ys, marker, label=family)
                for v, x, y in zip(pts, xs, ys, strict=True):
                    ax.annotate(
                        f"{_setting_value(v, p['config']):g}",
                        (x, y),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            for ref, marker in (
                ("bn", "k*"),
                ("groupnorm", "D"),
                ("instancenorm", "v"),
                ("layernorm", "^"),
                ("none", "X"),
            ):
                if ref in block:
                    d = block[ref]
                    ax.errorbar(
                        d["test_acc"]["mean"],
                        d[key]["mean"],
                        xerr=_half(d["test_acc"]),
                        yerr=_half(d[key]),
                        fmt=marker,
                        markersize=9,
                        capsize=3,
                        label=ref,
                    )
            ax.set(xlabel="test accuracy (%)", ylabel=label, title=f"{label} vs accuracy")
            ax.legend(fontsize=7)
        fig.suptitle(f"frontier on {fr['model']} (means over seeds; bars: 95% intervals)")
        fig.tight_layout()
        fig.savefig(out / "frontier.png", dpi=100)
        plt.close(fig)
        files.append("frontier.png")
    return files


def _half(d: dict[str, Any]) -> float:
    return 0.0 if d.get("low") is None else (d["high"] - d["low"]) / 2


def _setting_value(variant: str, config: dict[str, Any]) -> float:
    if "@" in variant:
        return float(variant.split("@", 1)[1])
    spec = VARIANTS.get(variant)
    return float(config["options"][spec.param]) if spec.param else float("nan")
