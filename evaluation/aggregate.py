"""Statistics over seeds: means with intervals, paired differences to ``bn``, and verdicts.

A study (:mod:`safenorm.evaluation.study`) repeats the whole protocol in *cells*, one per
(master seed, model): each seed draws a new split, new canaries, new IN/OUT masks and new model
initialisations, shared by every variant of that seed. A cell's variant summary is one
observation; everything here is computed from those observations, never from the examples of
one run, so the intervals include the run-to-run variation the one-run intervals miss.

* Mean with a 95% Student-t interval over cells: ``mean ± t_{n-1} · sd / sqrt(n)``.
* Paired difference to ``bn``: the same interval over the per-cell differences
  ``metric(variant, cell) - metric(bn, cell)`` (the variants of a cell share everything but the
  normalization, so pairing removes the seed-to-seed variation they share).

The verdict rule (:data:`VERDICT_RULE`) and the frontier's recommendation rule
(:data:`RECOMMENDATION_RULE`) were fixed before any standard-profile run and are applied
mechanically by :func:`verdicts` and :func:`frontier`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "ALTERNATIVES",
    "FINDINGS",
    "METRICS",
    "RECOMMENDATION_RULE",
    "REFERENCE",
    "VERDICT_RULE",
    "Finding",
    "SeedMetric",
    "cell_metrics",
    "frontier",
    "paired",
    "t_interval",
    "verdicts",
]

REFERENCE = "bn"
#: The per-sample normalizations each finding is called against, separately.
ALTERNATIVES: tuple[str, ...] = ("none", "groupnorm", "instancenorm", "layernorm")


def _path(*keys: str) -> Callable[[dict[str, Any], str], float | None]:
    def get(summary: dict[str, Any], headline: str) -> float | None:
        node: Any = summary
        for key in keys:
            key = headline if key == "{headline}" else key
            if not isinstance(node, dict) or key not in node or node[key] is None:
                return None
            node = node[key]
        value = float(node)
        return value if math.isfinite(value) else None

    return get


@dataclass(frozen=True)
class SeedMetric:
    """One per-cell number aggregated over seeds.

    Attributes:
        key: short name (JSON key).
        label: column title.
        extract: ``(variant summary, headline attack) -> value`` (``None`` if absent).
        leakage: higher means more memorization, influence or leakage (``False``: utility).
        digits: decimals shown.
    """

    key: str
    label: str
    extract: Callable[[dict[str, Any], str], float | None]
    leakage: bool = True
    digits: int = 3


_MIA = ("membership", "eval", "{headline}")
METRICS: tuple[SeedMetric, ...] = (
    SeedMetric("test_acc", "test acc (%)", lambda s, h: _pct(s), leakage=False, digits=2),
    SeedMetric("exposure", "exposure (bits)", _path("exposure", "in"), digits=2),
    SeedMetric("exposure_extrapolated", "extrap. exposure", _path("exposure", "extrapolated_in")),
    SeedMetric("in_out_gap", "in−out gap of φ", _path("exposure", "in_out_gap"), digits=2),
    SeedMetric(
        "grad_norm_ratio",
        "grad-norm ratio",
        _path("gradients", "grad_norm_train", "ratio"),
        digits=1,
    ),
    SeedMetric(
        "influence", "batch influence", _path("gradients", "influence", "canary_median"), digits=4
    ),
    SeedMetric("auc_pool", "AUC (pool)", _path(*_MIA, "pool", "auc", "value")),
    SeedMetric("tpr_1", "TPR@1%", _path(*_MIA, "pool", "tpr_at_fpr", "0.01", "value")),
    SeedMetric("tpr_01", "TPR@0.1%", _path(*_MIA, "pool", "tpr_at_fpr", "0.001", "value")),
    SeedMetric("auc_canaries", "AUC (canaries)", _path(*_MIA, "canaries", "auc", "value")),
    SeedMetric("audit_eps", "audit ε ≥", _path("audit", "epsilon"), digits=2),
)
_METRIC = {m.key: m for m in METRICS}


def _pct(summary: dict[str, Any]) -> float | None:
    acc = summary.get("test_acc", {}).get("mean")
    return None if acc is None else 100.0 * float(acc)


@dataclass(frozen=True)
class Finding:
    """One finding of the paper and the metrics that test it (higher = BN leaks more)."""

    key: str
    title: str
    metrics: tuple[str, ...]


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "memorization",
        "(i) BN memorizes out-of-distribution canaries more",
        ("exposure", "in_out_gap"),
    ),
    Finding(
        "influence",
        "(ii) BN gives outliers more per-step influence",
        ("grad_norm_ratio", "influence"),
    ),
    Finding(
        "membership",
        "(iii) BN is more exposed to membership inference",
        ("auc_pool", "tpr_1", "tpr_01"),
    ),
)

VERDICT_RULE = """\
For each finding, each alternative A (none, groupnorm, instancenorm, layernorm) and each of the
finding's k metrics: the paired difference d = metric(bn) − metric(A) in every cell (seed ×
model width) where both have a value, its mean and a Student-t interval over the cells at
confidence 1 − 0.05/k (Bonferroni over the finding's metrics, so each finding's call has a
family-wise error of at most 5%). A metric says "BN higher" when the interval is above 0, "BN
lower" when below 0, "no difference" otherwise. The finding is called
  * "reproduces": at least one metric "BN higher" and none "BN lower";
  * "reversed": at least one "BN lower" and none "BN higher";
  * "mixed": some of each;
  * "not shown": no metric separates (or fewer than 2 cells).
The same rule is applied to all cells (the headline call) and to each model width's cells
alone. Batch influence is 0 by construction for layers that do not couple samples, so finding
(ii)'s influence metric separates BN from every per-sample normalization unless BN's own
influence is indistinguishable from 0; the gradient-norm ratio is its non-structural half."""

RECOMMENDATION_RULE = """\
BN's extra leakage over GroupNorm is E = mean over cells of AUC(bn) − AUC(groupnorm) (pool AUC
of the headline attack, eval-mode queries). If the paired 95% interval of E does not lie above
0 there is no extra leakage to remove and no setting is recommended. Otherwise a ghost or
clipped setting S qualifies when (a) the mean of AUC(bn) − AUC(S) is at least E / 2, (b) the
paired 95% interval of AUC(bn) − AUC(S) lies above 0, and (c) its mean test accuracy is at most
0.5 points below bn's (mean of the paired accuracy differences). Among qualifying settings the
one removing the most leakage is recommended; if none qualifies, the report says so."""


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and Student-t interval of ``values`` (``low``/``high`` ``None`` below 2 values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def cell_metrics(summary: dict[str, Any], headline: str) -> dict[str, float | None]:
    """Every :data:`METRICS` value of one cell's variant summary."""
    return {m.key: m.extract(summary, headline) for m in METRICS}


CellTable = Mapping[str, Mapping[str, Mapping[str, float | None]]]  # cell -> variant -> metric


def paired(table: CellTable, variant: str, metric: str, reference: str = REFERENCE) -> list[float]:
    """Per-cell ``metric(variant) - metric(reference)`` over cells where both have a value."""
    out = []
    for cell in table.values():
        a = cell.get(variant, {}).get(metric)
        b = cell.get(reference, {}).get(metric)
        if a is not None and b is not None:
            out.append(a - b)
    return out


def _call(interval: dict[str, Any]) -> str:
    if interval["low"] is None:
        return "no difference"
    if interval["low"] > 0:
        return "BN higher"
    if interval["high"] < 0:
        return "BN lower"
    return "no difference"


def _finding_call(calls: Sequence[str]) -> str:
    higher, lower = "BN higher" in calls, "BN lower" in calls
    if higher and lower:
        return "mixed"
    if higher:
        return "reproduces"
    if lower:
        return "reversed"
    return "not shown"


def verdicts(table: CellTable, alternatives: Sequence[str] = ALTERNATIVES) -> list[dict[str, Any]]:
    """:data:`VERDICT_RULE` applied to ``table`` (cells -> variants -> metric values)."""
    out = []
    for finding in FINDINGS:
        confidence = 1 - 0.05 / len(finding.metrics)
        for alt in alternatives:
            if not any(alt in cell for cell in table.values()):
                continue
            per_metric = {}
            for key in finding.metrics:
                # bn − alt: the negated alt − bn differences
                d = [-v for v in paired(table, alt, key)]
                interval = t_interval(d, confidence)
                per_metric[key] = {**interval, "confidence": confidence, "call": _call(interval)}
            calls = [m["call"] for m in per_metric.values()]
            n = max((m["n"] for m in per_metric.values()), default=0)
            out.append(
                {
                    "finding": finding.key,
                    "title": finding.title,
                    "alternative": alt,
                    "call": _finding_call(calls) if n >= 2 else "not shown",
                    "cells": n,
                    "metrics": per_metric,
                }
            )
    return out


def frontier(
    table: CellTable,
    settings: Sequence[str],
    *,
    reference: str = REFERENCE,
    baseline: str = "groupnorm",
    accuracy_budget: float = 0.5,
) -> dict[str, Any]:
    """Leakage and accuracy of each swept setting, and :data:`RECOMMENDATION_RULE`'s choice."""
    extra = t_interval([-v for v in paired(table, baseline, "auc_pool", reference)])
    rows = {}
    for s in settings:
        removed = t_interval([-v for v in paired(table, s, "auc_pool", reference)])
        acc_drop = t_interval([-v for v in paired(table, s, "test_acc", reference)])
        rows[s] = {"auc_removed": removed, "accuracy_drop": acc_drop}
    result: dict[str, Any] = {"extra_leakage": extra, "settings": rows, "recommended": None}
    if extra["low"] is None or extra["low"] <= 0:
        result["decision"] = (
            f"{reference} shows no extra leakage over {baseline} that the interval separates "
            f"from 0 (E = {_num(extra['mean'])} [{_num(extra['low'])}, {_num(extra['high'])}]); "
            "nothing to remove, no setting recommended"
        )
        return result
    qualifying = []
    for s, r in rows.items():
        rem, drop = r["auc_removed"], r["accuracy_drop"]
        r["qualifies"] = bool(
            rem["mean"] is not None
            and rem["mean"] >= extra["mean"] / 2
            and rem["low"] is not None
            and rem["low"] > 0
            and drop["mean"] is not None
            and drop["mean"] <= accuracy_budget
        )
        if r["qualifies"]:
            qualifying.append(s)
    if qualifying:
        best = max(qualifying, key=lambda s: rows[s]["auc_removed"]["mean"])
        result["recommended"] = best
        r = rows[best]
        result["decision"] = (
            f"{best} removes {_num(r['auc_removed']['mean'])} of {reference}'s extra AUC "
            f"{_num(extra['mean'])} over {baseline} at {_num(r['accuracy_drop']['mean'], 2)} "
            "points of accuracy: recommended"
        )
    else:
        result["decision"] = (
            f"no ghost or clipped setting removes half of {reference}'s extra AUC "
            f"{_num(extra['mean'])} over {baseline} at ≤ {accuracy_budget} points of accuracy"
        )
    return result


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def metric(key: str) -> SeedMetric:
    """The :data:`METRICS` entry ``key``."""
    return _METRIC[key]
