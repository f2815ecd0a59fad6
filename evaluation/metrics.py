"""Metrics: ROC, AUC, TPR at low FPR with confidence intervals, and canary exposure.

Implemented here (not taken from scikit-learn) so the harness runs without it and the tests can
compare against scikit-learn as an independent implementation.

The harness's ROC pools a ``(models, examples)`` matrix of attack scores: every example is scored
on every model, examples differ in how memorable they are, and each model is one training run.
Pairs are therefore not independent, and intervals that assume they are (Hanley-McNeil,
Clopper-Pearson, a bootstrap over pairs) are too narrow. The default interval, ``bootstrap``,
resamples whole examples (columns) and whole models (rows); a simulation of the harness's design
with known truth (``tests/test_eval_intervals.py``) measures its coverage. Every method states its
assumptions in :data:`CI_METHODS`.
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
    "MIN_FALSE_POSITIVES",
    "TAIL_FITS",
    "CIMethod",
    "Interval",
    "MetricInfo",
    "RocSummary",
    "auc",
    "clopper_pearson",
    "exposure",
    "extrapolated_exposure",
    "hanley_mcneil",
    "reference_exposure",
    "roc_curve",
    "skewnorm_log_sf",
    "skewnorm_moments",
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


# -- resampling intervals ------------------------------------------------------------------------
#
# A bootstrap replicate is a weight per (model, example) pair: how often the pair appears in the
# resampled data. The pairs are sorted by score once; every replicate's ROC is then a cumulative
# sum of its weights in that order, so B replicates cost B weighted cumulative sums instead of B
# sorts. The weighted ROC equals the ROC of the explicitly duplicated data (tested).

# pair weights per chunk of replicates (B x P floats): small chunks stay in cache (measured
# 2.5x faster than 4M)
_CHUNK = 1 << 18


@dataclass(frozen=True)
class _SortedPairs:
    """The pairs of a ``(models, examples)`` matrix in descending score order.

    Attributes:
        label: ``(P,)`` membership of each pair, sorted.
        row, col: ``(P,)`` model and example of each pair.
        ends: last position of each run of tied scores (one ROC point per run).
        shape: ``(models, examples)``.
    """

    label: np.ndarray
    row: np.ndarray
    col: np.ndarray
    ends: np.ndarray
    shape: tuple[int, int]

    @property
    def dtype(self) -> type:
        """Of the weights: a replicate's weights sum to the number of pairs, so float32 cumulative
        sums of them (and sums of two) are exact below 2^23 pairs, and a third faster."""
        return np.float32 if len(self.label) < 2**23 else np.float64


def _as_matrix(x: np.ndarray, dtype: type) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    if x.ndim == 1:
        return x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected (models, examples) or (pairs,) arrays, got shape {x.shape}")
    return x


def _sort_pairs(labels: np.ndarray, scores: np.ndarray) -> _SortedPairs:
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    flat = scores.ravel()
    order = np.argsort(-flat, kind="mergesort")
    s = flat[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    row, col = np.divmod(order, scores.shape[1])
    return _SortedPairs(labels.ravel()[order], row, col, ends, scores.shape)


def _weighted_stats(
    pairs: _SortedPairs, weights: np.ndarray, fprs: tuple[float, ...]
) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """AUC and TPR at each FPR of the ROC in which pair ``p`` counts ``weights[b, p]`` times.

    ``weights`` is ``(B, P)`` in the sorted order; returns ``(B,)`` AUCs and ``{f: (B,)}``
    (``nan`` for a replicate without positives or negatives).
    """
    neg_w = weights * ~pairs.label
    fp = np.cumsum(neg_w, axis=1)
    tp = np.cumsum(weights, axis=1)
    tp -= fp
    ties = len(pairs.ends) < len(pairs.label)
    if ties:  # one ROC point per run of equal scores
        tp, fp = tp[:, pairs.ends], fp[:, pairs.ends]
    n_pos, n_neg = tp[:, -1].astype(np.float64), fp[:, -1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if ties:  # trapezoids between consecutive points (from (0, 0)), in counts
            d_fp = np.diff(fp, axis=1, prepend=0.0)
            tp_before = tp - np.diff(tp, axis=1, prepend=0.0)
            aucs = np.einsum("bp,bp->b", d_fp, tp + tp_before, dtype=np.float64)
            aucs /= 2 * n_pos * n_neg
        else:  # each negative adds its weight times the positive weight above it
            aucs = np.einsum("bp,bp->b", neg_w, tp, dtype=np.float64) / (n_pos * n_neg)
        out = {}
        for f in fprs:
            # TPR and FPR rise together along the curve: the best TPR with FPR <= f is at the
            # last point with FPR <= f (the origin if there is none)
            last = np.sum(fp <= (f + 1e-12) * n_neg[:, None], axis=1) - 1
            hit = tp[np.arange(len(tp)), np.maximum(last, 0)]
            out[f] = np.where(last >= 0, hit, 0.0) / n_pos
    bad = (n_pos == 0) | (n_neg == 0)
    aucs[bad] = np.nan
    for f in fprs:
        out[f][bad] = np.nan
    return aucs, out


Resampler = Callable[[_SortedPairs, np.random.Generator, int], np.ndarray]


def _replicates(
    pairs: _SortedPairs,
    resample: Resampler,
    fprs: tuple[float, ...],
    replicates: int,
    seed: int,
) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    rng = np.random.default_rng([seed, 11])
    chunk = max(1, _CHUNK // max(len(pairs.label), 1))
    aucs, tprs = [], {f: [] for f in fprs}
    for start in range(0, replicates, chunk):
        a, t = _weighted_stats(pairs, resample(pairs, rng, min(chunk, replicates - start)), fprs)
        aucs.append(a)
        for f in fprs:
            tprs[f].append(t[f])
    return np.concatenate(aucs), {f: np.concatenate(v) for f, v in tprs.items()}


def _counts(rng: np.random.Generator, n: int, size: int, dtype: type) -> np.ndarray:
    """``(size, n)`` counts: how often each of ``n`` units is drawn in ``n`` draws with
    replacement (a bincount of uniform draws: 3x faster than ``rng.multinomial``)."""
    draws = rng.integers(0, n, size=(size, n)) + (np.arange(size) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(dtype)


def _resample_models_and_examples(pairs: _SortedPairs, rng: np.random.Generator, b: int):
    models, examples = pairs.shape
    rows = np.take(_counts(rng, models, b, pairs.dtype), pairs.row, axis=1)
    return rows * np.take(_counts(rng, examples, b, pairs.dtype), pairs.col, axis=1)


def _resample_examples(pairs: _SortedPairs, rng: np.random.Generator, b: int):
    return np.take(_counts(rng, pairs.shape[1], b, pairs.dtype), pairs.col, axis=1)


def _resample_pairs(pairs: _SortedPairs, rng: np.random.Generator, b: int):
    """Positives and negatives resampled separately, each pair on its own (stratified)."""
    w = np.empty((b, len(pairs.label)), dtype=pairs.dtype)
    for cls in (True, False):
        idx = np.flatnonzero(pairs.label == cls)
        w[:, idx] = _counts(rng, len(idx), b, pairs.dtype)
    return w


@dataclass(frozen=True)
class CIMethod:
    """A registered confidence-interval method.

    Attributes:
        name: canonical name.
        resample: draws ``(B, P)`` pair weights (``None``: analytic, no resampling).
        assumes: when the interval is valid (printed in reports).
        units: ``(models, examples, n_pos, n_neg) -> n``, the number of the fewest independent
            units resampled (models for the two-way bootstrap); sets the expanded percentile.
    """

    name: str
    resample: Resampler | None
    assumes: str
    units: Callable[[int, int, int, int], int] = lambda models, examples, n_pos, n_neg: examples


CI_METHODS: Registry[CIMethod] = Registry("confidence-interval method")
CI_METHODS.register(
    "bootstrap",
    CIMethod(
        "bootstrap",
        _resample_models_and_examples,
        "percentile bootstrap over examples (whole columns of the models x examples matrix) "
        "and models (whole rows), expanded percentile for the number of models: valid when "
        "examples and models are each independent draws, whatever the dependence within a "
        "column or a row",
        units=lambda models, examples, n_pos, n_neg: min(models, examples),
    ),
    aliases=("two-way", "models-examples", "examples-models"),
)
CI_METHODS.register(
    "examples",
    CIMethod(
        "examples",
        _resample_examples,
        "percentile bootstrap over examples only: treats the models as fixed (no model-to-model "
        "variation in how much they leak)",
    ),
    aliases=("columns", "example-bootstrap"),
)
CI_METHODS.register(
    "pairs",
    CIMethod(
        "pairs",
        _resample_pairs,
        "stratified percentile bootstrap over (model, example) pairs: valid only for independent "
        "pairs; too narrow when examples differ and repeat across models",
        units=lambda models, examples, n_pos, n_neg: min(n_pos, n_neg),
    ),
    aliases=("pair-bootstrap", "percentile-bootstrap", "stratified"),
)
CI_METHODS.register(
    "analytic",
    CIMethod(
        "analytic",
        None,
        "Hanley-McNeil (AUC) and Clopper-Pearson on the positives (TPR): valid only for "
        "independent pairs and a threshold fixed in advance; too narrow here (the threshold "
        "comes from the negatives)",
    ),
    aliases=("clopper-pearson", "hanley-mcneil"),
)

# TPR at FPR f is an estimate of the curve at f only if about n_neg * f negatives lie above the
# threshold; with fewer it is the TPR at the largest number of false positives allowed (0 for
# 286 negatives at 0.1%).
MIN_FALSE_POSITIVES = 10.0


@dataclass
class RocSummary:
    """AUC and TPR at fixed FPRs, each with an interval, plus the curve (for plots).

    Attributes:
        auc: the AUC and its interval.
        tpr: TPR at each FPR (the highest TPR over thresholds whose FPR is at most it).
        n_pos, n_neg: positive and negative pairs; n_models, n_examples: the matrix's shape.
        method: the interval method (a :data:`CI_METHODS` name).
        min_false_positives: the fewest expected false positives (``n_neg * fpr``) at which a
            TPR is reported as "TPR at that FPR" (below it: "TPR at <= k false positives").
    """

    auc: Interval
    tpr: dict[float, Interval]
    n_pos: int
    n_neg: int
    fpr_curve: np.ndarray = field(repr=False)
    tpr_curve: np.ndarray = field(repr=False)
    n_models: int = 1
    n_examples: int = 0
    method: str = "bootstrap"
    min_false_positives: float = MIN_FALSE_POSITIVES

    def meets_minimum(self, fpr: float) -> bool:
        """Whether ``n_neg * fpr`` reaches :attr:`min_false_positives`."""
        return self.n_neg * fpr >= self.min_false_positives - 1e-9

    def tpr_label(self, fpr: float) -> str:
        """What the TPR at ``fpr`` measures, in words."""
        if self.meets_minimum(fpr):
            return f"TPR at {fpr:.2%} FPR"
        k = math.floor(self.n_neg * fpr + 1e-9)
        return "TPR at 0 false positives" if k == 0 else f"TPR at <= {k} false positives"

    def tpr_note(self, fpr: float) -> str | None:
        """Why the TPR at ``fpr`` is not an FPR-level estimate (``None`` when it is)."""
        if self.meets_minimum(fpr):
            return None
        return (
            f"{self.n_neg} negatives x FPR {fpr:g} = {self.n_neg * fpr:.3g} expected false "
            f"positives < {self.min_false_positives:g}: the threshold sits above all but "
            f"{math.floor(self.n_neg * fpr + 1e-9)} negatives"
        )

    def to_dict(self) -> dict[str, object]:
        tpr = {}
        for f, v in self.tpr.items():
            tpr[f"{f:g}"] = {
                **v.to_dict(),
                "expected_false_positives": self.n_neg * f,
                "meets_minimum": self.meets_minimum(f),
                "label": self.tpr_label(f),
                "note": self.tpr_note(f),
            }
        return {
            "auc": self.auc.to_dict(),
            "tpr_at_fpr": tpr,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "n_models": self.n_models,
            "n_examples": self.n_examples,
            "ci": self.method,
            "min_false_positives": self.min_false_positives,
        }


def _analytic(
    a: float, tprs: dict[float, float], n_pos: int, n_neg: int, confidence: float
) -> tuple[Interval, dict[float, Interval]]:
    intervals = {}
    for f, t in tprs.items():
        intervals[f] = Interval(t, *clopper_pearson(round(t * n_pos), n_pos, confidence))
    return Interval(a, *hanley_mcneil(a, n_pos, n_neg, confidence)), intervals


def _percentile(value: float, replicates: np.ndarray, confidence: float, units: int) -> Interval:
    """Expanded percentile interval (Hesterberg, "What Teachers Should Know About the Bootstrap",
    2015): the tail probability shrinks so that its normal quantile is ``sqrt(n / (n - 1))``
    times Student's ``t`` with ``n - 1`` degrees of freedom, ``n`` the fewest units resampled.

    A plain percentile interval is too narrow with few units (18 models: nominal 95% covered
    88-91% in simulation); with thousands of examples the expansion vanishes.
    """
    tail = (1 - confidence) / 2
    if units > 1:
        z = math.sqrt(units / (units - 1)) * stats.t.ppf(1 - tail, units - 1)
        tail = float(stats.norm.sf(z))
    low, high = np.nanquantile(replicates, (tail, 1 - tail))
    return Interval(value, float(low), float(high))


def summarize_roc(
    labels: np.ndarray,
    scores: np.ndarray,
    fprs: tuple[float, ...] = (0.01, 0.001),
    *,
    ci: str = "bootstrap",
    confidence: float = 0.95,
    bootstrap: int = 200,
    seed: int = 0,
    min_false_positives: float = MIN_FALSE_POSITIVES,
) -> RocSummary:
    """AUC and TPR at each FPR of ``fprs`` with ``confidence`` intervals by method ``ci``.

    Args:
        labels, scores: ``(models, examples)`` membership and attack scores (each column one
            example on every model), or 1-D arrays of independent pairs.
        fprs: false-positive rates of the reported TPRs.
        ci: a :data:`CI_METHODS` name. Default ``bootstrap``: resample whole examples and whole
            models; the only method that covers when examples differ and repeat across models.
        confidence: coverage of the intervals.
        bootstrap: replicates of the resampling methods.
        seed: seed of the resampling.
        min_false_positives: see :attr:`RocSummary.min_false_positives`.
    """
    method = CI_METHODS.get(ci)
    lab, sc = _as_matrix(labels, bool), _as_matrix(scores, np.float64)
    fprs = tuple(fprs)
    fpr, tpr, _ = roc_curve(lab.ravel(), sc.ravel())
    a = auc(fpr, tpr)
    point = {f: tpr_at_fpr(fpr, tpr, f) for f in fprs}
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if method.resample is None:
        auc_ci, tpr_ci = _analytic(a, point, n_pos, n_neg, confidence)
    else:
        if bootstrap < 2:
            raise ValueError(f"ci={method.name!r} needs bootstrap >= 2 replicates, got {bootstrap}")
        aucs, tprs = _replicates(_sort_pairs(lab, sc), method.resample, fprs, bootstrap, seed)
        units = method.units(lab.shape[0], lab.shape[1], n_pos, n_neg)
        auc_ci = _percentile(a, aucs, confidence, units)
        tpr_ci = {f: _percentile(point[f], tprs[f], confidence, units) for f in fprs}
    return RocSummary(
        auc_ci,
        tpr_ci,
        n_pos,
        n_neg,
        fpr,
        tpr,
        n_models=lab.shape[0],
        n_examples=lab.shape[1],
        method=method.name,
        min_false_positives=min_false_positives,
    )


# -- exposure ------------------------------------------------------------------------------------


def exposure(canary_score: float | np.ndarray, reference_scores: np.ndarray) -> np.ndarray:
    """Secret-Sharer exposure of canaries among never-inserted references (rank-based).

    ``exposure = log2(R + 1) - log2(rank)`` where ``rank`` (1 = highest) is the canary's rank
    among itself and the ``R`` references, scores higher meaning "more memorized". Ties count one
    half, so a canary tied with every reference sits at the middle rank. It saturates at
    ``log2(R + 1)``; :func:`extrapolated_exposure` does not.
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


# A tail fit maps (canary scores, reference scores) to the natural log of the fitted
# distribution's upper-tail probability at each canary score.
TailFit = Callable[[np.ndarray, np.ndarray], np.ndarray]
TAIL_FITS: Registry[TailFit] = Registry("tail fit")


def _normal_log_sf(canary: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Normal fit (sample mean, unbiased standard deviation); ``logsf`` stays exact far out."""
    return stats.norm.logsf(canary, ref.mean(), max(ref.std(ddof=1), 1e-12))


# skewness of a skew-normal is below this in absolute value (its limit is 0.9953)
_MAX_SKEW = 0.99


def skewnorm_moments(ref: np.ndarray) -> tuple[float, float, float]:
    """Method-of-moments skew-normal fit: ``(shape alpha, loc, scale)``.

    Closed form (no optimizer, so thousands of fits stay cheap); the sample skewness is clipped
    to the skew-normal's range.
    """
    mean, sd = float(ref.mean()), float(ref.std(ddof=1))
    g = float(np.clip(stats.skew(ref, bias=False), -_MAX_SKEW, _MAX_SKEW))
    g23 = abs(g) ** (2 / 3)
    delta = math.copysign(math.sqrt(math.pi / 2 * g23 / (g23 + ((4 - math.pi) / 2) ** (2 / 3))), g)
    scale = sd / math.sqrt(1 - 2 * delta**2 / math.pi)
    loc = mean - scale * delta * math.sqrt(2 / math.pi)
    return delta / math.sqrt(1 - delta**2), loc, max(scale, 1e-12)


def skewnorm_log_sf(x: np.ndarray, alpha: float, loc: float, scale: float) -> np.ndarray:
    """``log P(X > x)`` of a skew-normal, with an asymptotic form where ``sf`` underflows.

    Far in the upper tail ``sf(z) -> 2 (1 - Phi(z))`` for ``alpha >= 0`` and
    ``sf(z) ~ exp(-(1 + alpha^2) z^2 / 2) / (pi |alpha| (1 + alpha^2) z^2)`` for ``alpha < 0``.
    """
    z = (np.asarray(x, dtype=np.float64) - loc) / scale
    with np.errstate(divide="ignore"):
        out = np.log(stats.skewnorm.sf(z, alpha))
    far = ~(out > -600.0)  # sf below ~1e-260 (or 0): the asymptotic form is exact to O(1/z^2)
    if far.any():
        zf = z[far]
        if alpha >= 0:
            out[far] = math.log(2) + stats.norm.logsf(zf)
        else:
            a2 = 1 + alpha * alpha
            out[far] = -a2 * zf**2 / 2 - np.log(math.pi * abs(alpha) * a2 * zf**2)
    return out


def _skewnorm_log_sf(canary: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return skewnorm_log_sf(canary, *skewnorm_moments(ref))


TAIL_FITS.register("normal", _normal_log_sf, aliases=("gaussian",))
TAIL_FITS.register("skewnorm", _skewnorm_log_sf, aliases=("skew-normal",))


def extrapolated_exposure(
    canary_score: float | np.ndarray, reference_scores: np.ndarray, fit: str = "normal"
) -> np.ndarray:
    """Extrapolated exposure (Carlini et al., "The Secret Sharer", 2019, section 4.2).

    A distribution (``fit``, a :data:`TAIL_FITS` name) is fitted to the reference canaries'
    scores, and ``exposure = -log2 P(S >= canary score)`` under the fit. Unlike the rank-based
    :func:`exposure` it does not saturate at ``log2(R + 1)``. A never-seen canary drawn from the
    fitted distribution scores ``log2(e) ~ 1.44`` bits on average (its tail probability is
    uniform), the same level as the rank-based reference. Default ``normal``: the skew-normal
    the paper fits needs the sample skewness, which is noisy with tens of references (it moves
    a 4-sigma canary's exposure by several bits).
    """
    ref = np.asarray(reference_scores, dtype=np.float64)
    if ref.size < 3:
        raise ValueError(f"extrapolated exposure needs at least 3 reference scores, got {ref.size}")
    c = np.atleast_1d(np.asarray(canary_score, dtype=np.float64))
    return -TAIL_FITS.get(fit)(c, ref) / math.log(2)


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
    MetricInfo("exposure", False, "mean rank-based exposure (bits) of inserted canaries"),
    MetricInfo(
        "extrapolated_exposure",
        False,
        "mean extrapolated exposure (bits, normal fit to the references; does not saturate)",
    ),
    MetricInfo("in_out_gap", False, "mean in-minus-out logit-scaled confidence of canaries"),
    MetricInfo("grad_norm_ratio", False, "median canary / median typical per-sample grad norm"),
    MetricInfo("influence", False, "median influence through batch statistics on batch mates"),
    MetricInfo("epsilon", False, "accountant epsilon at delta"),
    MetricInfo("audit_epsilon", False, "one-run empirical epsilon lower bound"),
):
    METRICS.register(_m.name, _m)
