"""Write a run's outputs: report.md, report.json, PNG plots and the merged raw scores."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from safenorm.evaluation.config import EvalConfig
from safenorm.evaluation.harness import VariantResult
from safenorm.evaluation.metrics import CI_METHODS, METRICS

__all__ = ["write_report"]

REFERENCE = "bn"


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _ci(d: dict[str, float] | None, digits: int = 3) -> str:
    if not d:
        return "–"
    return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _tpr(d: dict[str, Any] | None) -> str:
    """A TPR cell. Below the false-positive minimum (negatives x FPR < 10) it is not a TPR at
    that FPR, and the cell says what it is: the TPR at <= k (or 0) false positives."""
    if not d or d.get("meets_minimum", True):
        return _ci(d)
    k = math.floor(d["expected_false_positives"] + 1e-9)
    return f"{'0 FP' if k == 0 else f'≤{k} FP'}: {_ci(d)}"


def _audit(a: dict[str, Any] | None) -> str:
    """An audit cell: the bound and, beside it, the largest bound the audit could show."""
    if not a:
        return "–"
    ceiling = a.get("max_epsilon")
    return _fmt(a.get("epsilon"), 2) + (f" (max {ceiling:.2f})" if ceiling is not None else "")


def _delta(value: float | None, ref: float | None, digits: int = 3, scale: float = 1.0) -> str:
    if value is None or ref is None:
        return ""
    return f" ({(value - ref) * scale:+.{digits}f})"


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or not ref:
        return ""
    return f" (×{value / ref:.2f})"


def _summary_row(
    name: str, s: dict[str, Any], ref: dict[str, Any] | None, headline: str, fprs: tuple[float, ...]
) -> str:
    acc = _get(s, "test_acc", "mean")
    exp_in = _get(s, "exposure", "in")
    xexp_in = _get(s, "exposure", "extrapolated_in")
    gr = _get(s, "gradients", "grad_norm_train", "ratio")
    auc_pool = _get(s, "membership", "eval", headline, "pool", "auc")
    auc_can = _get(s, "membership", "eval", headline, "canaries", "auc")
    ref_acc = _get(ref, "test_acc", "mean")
    ref_exp = _get(ref, "exposure", "in")
    ref_xexp = _get(ref, "exposure", "extrapolated_in")
    ref_gr = _get(ref, "gradients", "grad_norm_train", "ratio")
    ref_auc = _get(ref, "membership", "eval", headline, "pool", "auc", "value")
    diverged = _get(s, "diverged", "count")
    cells = [
        f"**{name}**" + (f" ({diverged}/{s['diverged']['of']} diverged)" if diverged else ""),
        f"{_fmt(acc * 100 if acc is not None else None, 1)}%"
        + (_delta(acc, ref_acc, 1, 100) if name != REFERENCE else ""),
        _fmt(exp_in, 2) + (_delta(exp_in, ref_exp, 2) if name != REFERENCE else ""),
        _fmt(xexp_in, 2) + (_delta(xexp_in, ref_xexp, 2) if name != REFERENCE else ""),
        _fmt(gr, 2) + (_ratio(gr, ref_gr) if name != REFERENCE else ""),
        _ci(auc_pool)
        + (_delta(auc_pool["value"] if auc_pool else None, ref_auc) if name != REFERENCE else ""),
        _ci(auc_can),
        (
            f"{s['strongest_attack']['auc_pool']:.3f} ({s['strongest_attack']['attack']})"
            if s.get("strongest_attack")
            else "–"
        ),
    ]
    for f in fprs:
        cells.append(_tpr(_get(s, "membership", "eval", headline, "pool", "tpr_at_fpr", f"{f:g}")))
    cells.append(_fmt(s.get("epsilon"), 2))
    cells.append(_audit(s.get("audit")))
    return "| " + " | ".join(cells) + " |"


def _markdown(
    config: EvalConfig,
    summaries: dict[str, dict[str, Any]],
    unavailable: dict[str, str],
    incomplete: dict[str, list[int]],
    plots: list[str],
) -> str:
    ac = config.attacks
    ref = summaries.get(REFERENCE)
    fprs = tuple(ac.fprs)
    lines = [
        "# safenorm-eval report",
        "",
        f"Profile `{config.profile}`, seed {config.seed}, dataset `{config.data.dataset}` "
        f"(pool {config.data.pool_size}, test {config.data.test_size}), model `{config.model}`, "
        f"{config.num_models} models per variant, each the target once with the others as "
        f"shadows (leave-one-out). Canaries: {config.canaries.per_type} per type "
        f"({', '.join(config.canaries.types)}), {config.canaries.references_per_type} references "
        "per type.",
        "",
        "## Summary (relative to `bn`)",
        "",
        f"Attack `{ac.headline}`, models queried in eval mode. Brackets: {ac.confidence:.0%} "
        f"intervals ({ac.ci}: {CI_METHODS.get(ac.ci).assumes}); parentheses: difference from "
        "(or ratio to) `bn`. Exposure in bits "
        "(inserted canaries; a never-seen canary scores the reference level): rank-based, which "
        "saturates at log2(references + 1), and extrapolated (Secret Sharer: -log2 of the tail "
        "probability under a normal fit to the references; reference level log2 e = 1.44); "
        "grad-norm ratio = "
        "median train-mode per-sample gradient norm of canaries / of typical examples. ε: the "
        f"accountant's at δ={config.dp.delta:g}; audit: one-run lower bound (Steinke et al. "
        f"2023) at {ac.audit_confidence:.0%} confidence over all models, with (max) the largest "
        "bound it could show with its m and confidence (every guess correct). TPR at an FPR is "
        "reported only where negatives × FPR ≥ 10; below that the cell is the TPR at the few "
        "false positives allowed ('≤k FP', '0 FP'). The strongest attack is "
        "picked after the fact among all attacks (an optimistic summary).",
        "",
        "| variant | test acc | exposure | exposure (extrapolated) | grad-norm ratio | "
        "AUC (pool) | AUC (canaries) | strongest attack (pool AUC) | "
        + " | ".join(f"TPR@{f:.1%} FPR" for f in fprs)
        + " | ε | audit ε ≥ (max) |",
        "|---" * (10 + len(fprs)) + "|",
    ]
    for name, s in summaries.items():
        lines.append(_summary_row(name, s, ref, ac.headline, fprs))
    for name, reason in unavailable.items():
        lines.append(f"| {name} | unavailable: {reason} |" + " |" * (8 + len(fprs)))
    for name, missing in incomplete.items():
        lines.append(
            f"| {name} | incomplete: {len(missing)} models missing (run or merge the "
            "other shards) |" + " |" * (8 + len(fprs))
        )
    lines += [
        "",
        "Higher is better only for test accuracy; for every other column lower means "
        "less memorization or leakage.",
        "",
    ]
    for name, s in summaries.items():
        lines += [f"## {name}: {s['description']}", ""]
        lines.append(
            f"Test accuracy {s['test_acc']['mean']:.3%} ± {s['test_acc']['std']:.3%}; "
            f"training time {s['train_seconds']:.0f}s for {s['num_models']} models."
        )
        if s.get("norm_layers"):
            lines.append(f"Normalization layers (groups x channels per group): {s['norm_layers']}.")
        div = s.get("diverged") or {}
        if div.get("count"):
            where = "; ".join(
                f"#{d['index']} at step {d['step']} in {d['layer'] or '?'}" for d in div["models"]
            )
            lines.append(
                f"**{div['count']} of {div['of']} models diverged** and are excluded from the "
                f"attacks ({where})."
            )
        if s.get("epsilon") is not None:
            a = s["audit"]
            lines.append(
                f"Accountant ε = {s['epsilon']:.3f} at δ = {s['delta']:g}; one-run "
                f"audit ε ≥ {a['epsilon']:.3f} (best model: {a['v']}/{a['r']} guesses "
                f"correct of m = {a['m']}; with m = {a['m']} it could show at most "
                f"{_fmt(a.get('max_epsilon'), 3)})."
            )
        else:
            a = s["audit"]
            lines.append(
                f"Not DP. One-run audit ε ≥ {a['epsilon']:.3f} ({a['v']}/{a['r']} "
                f"correct of m = {a['m']}; at most {_fmt(a.get('max_epsilon'), 3)} visible)."
            )
        lines.append("")
        for threat, title in (
            ("eval", "eval-mode queries (the standard threat model)"),
            (
                "train",
                "TRAIN-mode queries: a separate threat model in which "
                "the adversary sees outputs normalized with batch statistics",
            ),
        ):
            if threat not in s["membership"]:
                continue
            lines += [
                f"Membership inference, {title}:",
                "",
                "| attack | AUC (pool) | "
                + " | ".join(f"TPR@{f:.1%}" for f in fprs)
                + " | AUC (canaries) |",
                "|---" * (3 + len(fprs)) + "|",
            ]
            for attack, e in s["membership"][threat].items():
                cells = [attack, _ci(_get(e, "pool", "auc"))]
                cells += [_tpr(_get(e, "pool", "tpr_at_fpr", f"{f:g}")) for f in fprs]
                cells.append(_ci(_get(e, "canaries", "auc")))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        lines += [
            "Canaries (eval mode):",
            "",
            "| type | exposure in | exposure out | reference | max | extrapolated in | "
            f"extrapolated out | in−out gap of φ | AUC ({ac.headline}) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        by_type = _get(s, "membership", "eval", ac.headline, "canaries_by_type") or {}
        for t, c in s["canaries"].items():
            lines.append(
                f"| {t} | {_fmt(c['exposure_in'], 2)} | {_fmt(c['exposure_out'], 2)} | "
                f"{_fmt(c['exposure_reference'], 2)} | {_fmt(c['max_exposure'], 2)} | "
                f"{_fmt(c.get('extrapolated_in'), 2)} | {_fmt(c.get('extrapolated_out'), 2)} | "
                f"{_fmt(c['in_out_gap'], 2)} | {_ci(by_type.get(t), 2)} |"
            )
        lines.append("")
        g = s.get("gradients")
        if g:
            lines += [
                f"Per-sample gradients and influence ({g['models']} model(s)):",
                "",
                "| measure | typical median | canary median | canary in | canary out | ratio |",
                "|---|---|---|---|---|---|",
            ]
            labels = {
                "grad_norm_train": "grad norm, train mode (in a batch)",
                "grad_norm_eval": "grad norm, eval mode",
                "influence": "influence on batch mates through batch statistics",
            }
            for key, label in labels.items():
                d = g[key]
                lines.append(
                    f"| {label} | {_fmt(d['typical_median'], 4)} | "
                    f"{_fmt(d['canary_median'], 4)} | {_fmt(d['canary_in_median'], 4)} | "
                    f"{_fmt(d['canary_out_median'], 4)} | {_fmt(d['ratio'], 2)} |"
                )
            lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += (
        ["## Metrics", ""]
        + [
            f"- `{m.name}`: {m.description} "
            f"({'higher' if m.higher_is_better else 'lower'} is better)"
            for m in (METRICS.get(n) for n in METRICS.names())
        ]
        + [""]
    )
    return "\n".join(lines)


def _plots(out: Path, config: EvalConfig, results: dict[str, VariantResult]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, r in results.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, subset in zip(axes[:2], ("pool", "canaries"), strict=True):
            for key, (fpr, tpr) in r.curves.items():
                threat, attack, sub = key.split("/")
                if sub != subset:
                    continue
                style = "-" if threat == "eval" else ":"
                ax.loglog(
                    np.maximum(fpr, 1e-5),
                    np.maximum(tpr, 1e-5),
                    style,
                    label=f"{attack} ({threat})",
                )
            ax.plot([1e-5, 1], [1e-5, 1], "k--", lw=0.8)
            ax.set(
                xlim=(1e-4, 1),
                ylim=(1e-4, 1),
                xlabel="FPR",
                ylabel="TPR",
                title=f"{name}: {subset} (log-log)",
            )
            ax.legend(fontsize=7)
        for key, (fpr, tpr) in r.curves.items():
            threat, attack, sub = key.split("/")
            if threat == "eval":
                axes[2].plot(fpr, tpr, label=f"{attack} ({sub})")
        axes[2].plot([0, 1], [0, 1], "k--", lw=0.8)
        axes[2].set(xlabel="FPR", ylabel="TPR", title=f"{name}: linear ROC (eval mode)")
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        fname = f"roc_{name}.png"
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        files.append(fname)

    with_grads = {n: r for n, r in results.items() if r.grad}
    if with_grads:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key in zip(axes, ("grad_norm_train", "influence"), strict=True):
            data, labels = [], []
            for name, r in with_grads.items():
                for kind in ("typical", "canary"):
                    data.append(np.log10(np.maximum(r.grad[f"{key}/{kind}"], 1e-8)))
                    labels.append(f"{name}\n{kind}")
            ax.boxplot(data, tick_labels=labels) if _has_tick_labels() else ax.boxplot(
                data, labels=labels
            )
            ax.tick_params(axis="x", labelsize=7, rotation=90)
            ax.set(ylabel=f"log10 {key}", title=key.replace("_", " "))
        fig.tight_layout()
        fig.savefig(out / "grad_norms.png", dpi=100)
        plt.close(fig)
        files.append("grad_norms.png")

    types = sorted({t for r in results.values() for t in r.exposures if not t.startswith("_")})
    if types:
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(results) * len(types) / 2), 4.5))
        width = 0.8 / max(len(results), 1)
        for j, (name, r) in enumerate(results.items()):
            means = [
                float(np.mean(r.exposures[t])) if len(r.exposures.get(t, [])) else 0.0
                for t in types
            ]
            ax.bar(np.arange(len(types)) + j * width, means, width, label=name)
        ref = next(iter(results.values())).summary.get("exposure", {}).get("reference")
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=0.8, label="never seen (reference)")
        ax.set_xticks(np.arange(len(types)) + 0.4 - width / 2, types)
        ax.set(ylabel="mean exposure of inserted canaries (bits)", title="canary exposure")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "exposure.png", dpi=100)
        plt.close(fig)
        files.append("exposure.png")
    return files


def _has_tick_labels() -> bool:
    import inspect

    import matplotlib.pyplot as plt

    return "tick_labels" in inspect.signature(plt.Axes.boxplot).parameters


def write_report(
    out_dir: str | Path,
    config: EvalConfig,
    results: dict[str, VariantResult],
    unavailable: dict[str, str] | None = None,
    incomplete: dict[str, list[int]] | None = None,
    plots: bool = True,
) -> Path:
    """Write report.md, report.json, plots and scores/<variant>.npz; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unavailable = unavailable or {}
    incomplete = incomplete or {}
    (out / "scores").mkdir(exist_ok=True)
    for name, r in results.items():
        np.savez_compressed(out / "scores" / f"{name}.npz", **r.raw)
    summaries = {name: r.summary for name, r in results.items()}
    files = _plots(out, config, results) if plots and results else []
    payload = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "reference_variant": REFERENCE,
        "config": config.to_dict(),
        "variants": summaries,
        "unavailable": unavailable,
        "incomplete": {k: v for k, v in incomplete.items()},
        "metrics": {
            n: {
                "higher_is_better": METRICS.get(n).higher_is_better,
                "description": METRICS.get(n).description,
            }
            for n in METRICS.names()
        },
        "plots": files,
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2, allow_nan=True))
    path = out / "report.md"
    path.write_text(_markdown(config, summaries, unavailable, incomplete, files))
    return path
