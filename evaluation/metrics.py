"""Metrics: ROC, AUC, TPR at low FPR with confidence intervals, and canary exposure.

Implemented here (not taken from scikit-learn) so the harness runs without it and the tests can
compare against scikit-learn as an independent implementation.

The confidence intervals treat the (model, example) pairs as independent draws, which they are
across models for a fixed example (independent training runs and membership coins) but not
exactly across examples of one model; read them as indicative.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from safenorm.evaluation.registry import Registry
from scipy import stats

__all__ = [
    "CI_METHODS",
    "METRICS",
    "Interval",
    "MetricInfo",
    "RocSummary",
    "auc",
    "exposure",
    "reference_exposure",
    "roc_curve",
    "summarize_roc",
    "tpr_at_fpr",
]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``scores`` (higher means "member") against boolean ``labels``.

    Returns ``(fpr, tpr, thresholds)``, starting at ``(0, 0)`` with threshold ``+inf``; tied
    scores form one point (as ``sklearn.metrics.roc_curve(drop_intermediate=False)``).
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        raise ValueError("the ROC needs both positive and negative examples")
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(lab)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / lab.sum()]
    fpr = np.r_[0.0, fp / (~lab).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve (trapezoids; ties count one half, as the Mann-Whitney U)."""
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR over thresholds whose FPR is at most ``target`` (0 if none)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of ``k`` successes in ``n`` trials."""
    a = 1 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return low, high


def hanley_mcneil(
    a: float, n_pos: int, n_neg: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Normal-approximation interval of an AUC (Hanley and McNeil, 1982)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    half = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(max(var, 0.0))
    return max(0.0, a - half), min(1.0, a + half)


@dataclass
class RocSummary:
    """AUC and TPR at fixed FPRs, each with an interval, plus the curve (for plots)."""

    auc: Interval
    tpr: dict[float, Interval]
    n_pos: int
    n_neg: int
    fpr_curve: np.ndarray = field(repr=False)
    tpr_curve: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "auc": self.auc.to_dict(),
            "tpr_at_fpr": {f"{f:g}": v.to_dict() for f, v in self.tpr.items()},
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
        }


CIMethod = Callable[[np.ndarray, np.ndarray, tuple[float, ...], float, int, int], RocSummary]
CI_METHODS: Registry[CIMethod] = Registry("confidence-interval method")


def _point(labels: np.ndarray, scores: np.ndarray, fprs: tuple[float, ...]):
    fpr, tpr, thr = roc_curve(labels, scores)
    return fpr, tpr, thr, auc(fpr, tpr), {f: tpr_at_fpr(fpr, tpr, f) for f in fprs}


def _analytic(labels, scores, fprs, confidence, bootstrap, seed) -> RocSummary:
    labels = np.asarray(labels, dtype=bool)
    fpr, tpr, _, a, tprs = _point(labels, scores, fprs)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    intervals = {}
    for f, t in tprs.items():
        k = round(t * n_pos)
        lo, hi = clopper_pearson(k, n_pos, confidence)
        intervals[f] = Interval(t, lo, hi)
    lo, hi = hanley_mcneil(a, n_pos, n_neg, confidence)
    return RocSummary(Interval(a, lo, hi), intervals, n_pos, n_neg, fpr, tpr)


def _bootstrap(labels, scores, fprs, confidence, bootstrap, seed) -> RocSummary:
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    fpr, tpr, _, a, tprs = _point(labels, scores, fprs)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.default_rng([seed, 11])
    aucs, tpr_samples = [], {f: [] for f in fprs}
    for _ in range(bootstrap):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        _, _, _, ba, btprs = _point(labels[idx], scores[idx], fprs)
        aucs.append(ba)
        for f in fprs:
            tpr_samples[f].append(btprs[f])
    q = (0.5 - confidence / 2, 0.5 + confidence / 2)
    lo, hi = np.quantile(aucs, q)
    intervals = {f: Interval(tprs[f], *map(float, np.quantile(tpr_samples[f], q))) for f in fprs}
    return RocSummary(Interval(a, float(lo), float(hi)), intervals, len(pos), len(neg), fpr, tpr)


CI_METHODS.register("analytic", _analytic, aliases=("clopper-pearson", "hanley-mcneil"))
CI_METHODS.register("bootstrap", _bootstrap, aliases=("percentile-bootstrap",))


def summarize_roc(
    labels: np.ndarray,
    scores: np.ndarray,
    fprs: tuple[float, ...] = (0.01, 0.001),
    *,
    ci: str = "analytic",
    confidence: float = 0.95,
    bootstrap: int = 200,
    seed: int = 0,
) -> RocSummary:
    """AUC and TPR at each FPR of ``fprs`` with ``confidence`` intervals by method ``ci``."""
    return CI_METHODS.get(ci)(labels, scores, tuple(fprs), confidence, bootstrap, seed)


def exposure(canary_score: float | np.ndarray, reference_scores: np.ndarray) -> np.ndarray:
    """Secret-Sharer exposure of canaries among never-inserted references.

    ``exposure = log2(R + 1) - log2(rank)`` where ``rank`` (1 = highest) is the canary's rank
    among itself and the ``R`` references, scores higher meaning "more memorized". Ties count one
    half, so a canary tied with every reference sits at the middle rank.
    """
    ref = np.sort(np.asarray(reference_scores, dtype=np.float64))
    c = np.atleast_1d(np.asarray(canary_score, dtype=np.float64))
    above = len(ref) - np.searchsorted(ref, c, side="right")
    ties = np.searchsorted(ref, c, side="right") - np.searchsorted(ref, c, side="left")
    rank = 1 + above + 0.5 * ties
    return np.log2(len(ref) + 1) - np.log2(rank)


def reference_exposure(num_references: int) -> float:
    """Expected exposure of a canary whose rank is uniform (a model that never saw it):
    ``log2(n) - log2(n!) / n`` with ``n = R + 1``, tending to ``log2(e) ~ 1.44`` bits."""
    n = num_references + 1
    return float(math.log2(n) - math.lgamma(n + 1) / math.log(2) / n)


@dataclass(frozen=True)
class MetricInfo:
    """How to read a reported metric."""

    name: str
    higher_is_better: bool
    description: str


METRICS: Registry[MetricInfo] = Registry("metric")
for _m in (
    MetricInfo("test_acc", True, "test accuracy (eval mode)"),
    MetricInfo("auc", False, "membership-inference AUC (0.5 = no leakage)"),
    MetricInfo("tpr@0.01", False, "attack TPR at 1% FPR"),
    MetricInfo("tpr@0.001", False, "attack TPR at 0.1% FPR"),
    MetricInfo("exposure", False, "mean exposure (bits) of inserted canaries"),
    MetricInfo("in_out_gap", False, "mean in-minus-out logit-scaled confidence of canaries"),
    MetricInfo("grad_norm_ratio", False, "median canary / median typical per-sample grad norm"),
    MetricInfo("influence", False, "median influence through batch statistics on batch mates"),
    MetricInfo("epsilon", False, "accountant epsilon at delta"),
    MetricInfo("audit_epsilon", False, "one-run empirical epsilon lower bound"),
):
    METRICS.register(_m.name, _m)
