"""One-run DP audit (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023).

``m`` audit examples are each included in the training run independently with probability 1/2.
The auditor guesses "in" for the ``k+`` highest-scoring examples and "out" for the ``k-`` lowest
(abstaining on the rest): ``r = k+ + k-`` guesses, ``v`` of them correct. Under
``(eps, delta)``-DP the number of correct guesses is (up to the delta term) stochastically
dominated by ``Binomial(r, e^eps / (1 + e^eps))`` (their Theorem 3.1 / Proposition 5.7); the
largest ``eps`` whose p-value is still below ``1 - confidence`` is a lower bound on the run's
true epsilon at that confidence.

The bound cannot exceed what ``m`` allows: even with every guess correct, ``r`` guesses certify
at most ``logit((1 - confidence)^(1/r))`` when ``delta = 0``. :attr:`AuditResult.max_epsilon`
reports that ceiling (:func:`max_visible_epsilon`) beside every bound, so "0.00" can be told
from "the audit could not see more".

More audit examples raise the ceiling only while ``2 m delta`` is small next to the
Bonferroni-corrected level ``1 - confidence``. The audit examples are all candidates of a model
(``data.pool_size`` pool examples plus ``canaries.per_type`` x ``len(canaries.types)`` inserted
canaries), so ``--set canaries.per_type=N`` adds audit canaries. Ceilings at 95% over 18 models
(the quick profile's correction), guess fractions (0.01, 0.03, 0.1):

======== ============ =========== ============ ============
delta     m = 1,032    m = 3,000   m = 10,000   m = 30,000
======== ============ =========== ============ ============
1e-5       2.50         2.38        2.28         2.22
1e-6       3.33         4.34        4.89         4.77
1e-7       3.36         4.44        5.62         6.65
0          3.37         4.45        5.66         6.76
======== ============ =========== ============ ============

At the harness's default ``delta = 1e-5`` more canaries lower the ceiling; auditing at a
smaller ``dp.delta`` (the accountant reports its epsilon at the same delta) lifts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "AuditResult",
    "epsilon_lower_bound",
    "max_visible_epsilon",
    "one_run_audit",
    "p_value",
]


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Probability of at least ``v`` correct among ``r`` guesses under ``(eps, delta)``-DP.

    The paper's Algorithm (appendix), vectorized: ``beta + 2 m delta max_i P[v-i <= W < v] / i``
    with ``W ~ Binomial(r, q)``, ``q = e^eps / (1 + e^eps)``.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        cumulative = np.cumsum(stats.binom.pmf(v - i, r, q))
        alpha = float(np.max(cumulative / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95, iterations: int = 50
) -> float:
    """Largest ``eps`` rejected at level ``1 - confidence`` (0 if even ``eps = 0`` is not)."""
    level = 1.0 - confidence
    if not 0 < level < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return float("inf")
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    """The best bound over the guess counts tried (Bonferroni-corrected).

    Attributes:
        epsilon: the lower bound.
        m: audit examples; r: guesses; v: correct guesses (of the best setting).
        confidence: the per-test confidence used (after the Bonferroni correction).
        max_epsilon: the largest bound this audit could have shown (every guess correct, at the
            largest guess count), whatever the model: a ceiling set by ``m`` and the confidence.
    """

    epsilon: float
    m: int
    r: int
    v: int
    confidence: float
    max_epsilon: float = float("nan")

    def to_dict(self) -> dict[str, float]:
        return {
            "epsilon": self.epsilon,
            "m": self.m,
            "r": self.r,
            "v": self.v,
            "confidence": self.confidence,
            "max_epsilon": self.max_epsilon,
        }


def _guess_counts(m: int, guess_fractions: tuple[float, ...]) -> list[int]:
    """``k`` per fraction: ``k`` guesses "in" and ``k`` "out", at least 1, at most ``m // 2``."""
    return [k for k in (min(max(1, round(f * m)), m // 2) for f in guess_fractions) if k > 0]


def _per_test(confidence: float, guess_fractions: tuple[float, ...], tests: int) -> float:
    return 1.0 - (1.0 - confidence) / (len(guess_fractions) * tests)


def max_visible_epsilon(
    m: int,
    guess_fractions: tuple[float, ...] = (0.01, 0.03, 0.1),
    delta: float = 0.0,
    confidence: float = 0.95,
    tests: int = 1,
) -> float:
    """The largest bound :func:`one_run_audit` can return for ``m`` audit examples: every guess
    correct at the largest guess count, at the Bonferroni-corrected confidence."""
    counts = _guess_counts(m, guess_fractions)
    if not counts:
        return 0.0
    per_test = _per_test(confidence, guess_fractions, tests)
    return max(epsilon_lower_bound(m, 2 * k, 2 * k, delta, per_test) for k in counts)


def one_run_audit(
    scores: np.ndarray,
    member: np.ndarray,
    guess_fractions: tuple[float, ...] = (0.01, 0.03, 0.1),
    delta: float = 0.0,
    confidence: float = 0.95,
    tests: int = 1,
) -> AuditResult:
    """Audit one run from the auditor's scores of its ``m`` randomly included examples.

    For each fraction ``f``, guesses ``k = max(1, round(f m))`` "in" (highest scores) and ``k``
    "out" (lowest). The confidence is corrected for the ``len(guess_fractions) * tests`` bounds
    computed (Bonferroni; pass ``tests`` = number of runs audited when taking a maximum over
    runs), so the returned maximum holds at ``confidence`` overall.
    """
    scores = np.asarray(scores, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    m = len(scores)
    per_test = _per_test(confidence, guess_fractions, tests)
    ceiling = max_visible_epsilon(m, guess_fractions, delta, confidence, tests)
    order = np.argsort(-scores, kind="mergesort")
    best = AuditResult(0.0, m, 0, 0, per_test, ceiling)
    for k in _guess_counts(m, guess_fractions):
        v = int(member[order[:k]].sum() + (~member[order[-k:]]).sum())
        eps = epsilon_lower_bound(m, 2 * k, v, delta, per_test)
        if eps > best.epsilon or best.r == 0:
            best = AuditResult(eps, m, 2 * k, v, per_test, ceiling)
    return best
