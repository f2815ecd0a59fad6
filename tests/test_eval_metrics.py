"""Metric and audit math of safenorm.evaluation against independent computations."""

import math

import numpy as np
import pytest
from safenorm.evaluation.audit import epsilon_lower_bound, one_run_audit, p_value
from safenorm.evaluation.metrics import (
    auc,
    clopper_pearson,
    exposure,
    reference_exposure,
    roc_curve,
    summarize_roc,
    tpr_at_fpr,
)
from scipy import stats

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("ties", [False, True])
def test_roc_and_auc_match_sklearn(ties):
    rng = np.random.default_rng(0)
    labels = rng.random(3000) < 0.4
    scores = rng.normal(size=3000) + 0.7 * labels
    if ties:
        scores = np.round(scores, 1)
    fpr, tpr, _ = roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert auc(fpr, tpr) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    for target in (0.01, 0.001, 0.1):
        expected = sk_tpr[sk_fpr <= target].max()
        assert tpr_at_fpr(fpr, tpr, target) == pytest.approx(expected)


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_curve(np.ones(5, bool), np.arange(5.0))


@pytest.mark.parametrize("ci", ["analytic", "bootstrap"])
def test_intervals_cover_the_estimate(ci):
    rng = np.random.default_rng(1)
    labels = rng.random(4000) < 0.5
    scores = rng.normal(size=4000) + 1.0 * labels
    s = summarize_roc(labels, scores, (0.01, 0.001), ci=ci, bootstrap=100)
    expected_auc = stats.norm.cdf(1.0 / math.sqrt(2))
    assert s.auc.low <= s.auc.value <= s.auc.high
    assert s.auc.low - 0.01 < expected_auc < s.auc.high + 0.01
    for f, interval in s.tpr.items():
        assert interval.low <= interval.value <= interval.high, f


def test_clopper_pearson_matches_scipy():
    for k, n in [(0, 50), (3, 50), (50, 50), (17, 123)]:
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert clopper_pearson(k, n, 0.95) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_exposure_from_known_rank():
    refs = np.arange(1.0, 64.0)  # 63 references: 1..63
    # above every reference: rank 1, maximal exposure log2(64) = 6 bits
    assert exposure(100.0, refs)[0] == pytest.approx(6.0)
    # below every reference: rank 64, exposure 0
    assert exposure(0.0, refs)[0] == pytest.approx(0.0)
    # 31.5 has 32 references above (32..63): rank 33
    assert exposure(31.5, refs)[0] == pytest.approx(6.0 - math.log2(33))
    # a tie counts one half: 32 is above 31 refs, tied with one -> rank 1 + 31 + 0.5
    assert exposure(32.0, refs)[0] == pytest.approx(6.0 - math.log2(32.5))


def test_reference_exposure_is_the_mean_over_uniform_ranks():
    for r in (1, 15, 63, 999):
        ranks = np.arange(1, r + 2)
        expected = np.mean(np.log2(r + 1) - np.log2(ranks))
        assert reference_exposure(r) == pytest.approx(expected)
    assert reference_exposure(10**6) == pytest.approx(1 / math.log(2), abs=1e-4)


def _binomial_tail(v, r, q):
    return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))


def test_audit_p_value_pure_dp_is_the_binomial_tail():
    for m, r, v, eps in [(1000, 100, 80, 1.0), (500, 40, 40, 2.0), (200, 20, 10, 0.0)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(m, r, v, eps, 0.0) == pytest.approx(_binomial_tail(v, r, q), rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_audit_all_guesses_correct_matches_closed_form(r):
    # all r guesses correct at 95% confidence, delta = 0: q^r = 0.05, eps = log(q / (1 - q))
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(10 * r, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-6)


def test_audit_reference_values():
    # Steinke et al. (2023), pure DP: 100/100 correct -> eps >= 3.49 at 95% confidence;
    # chance-level guessing (50/100) certifies nothing
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.95) == pytest.approx(3.4935, abs=1e-3)
    assert epsilon_lower_bound(1000, 100, 50, 0.0, 0.95) == 0.0
    # delta > 0 can only weaken the bound; more correct guesses can only strengthen it
    b0 = epsilon_lower_bound(1000, 100, 90, 0.0)
    b1 = epsilon_lower_bound(1000, 100, 90, 1e-5)
    assert 0 < b1 <= b0
    assert epsilon_lower_bound(1000, 100, 95, 1e-5) >= b1
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0)


def test_one_run_audit_on_separable_and_random_scores():
    rng = np.random.default_rng(0)
    member = rng.random(2000) < 0.5
    perfect = one_run_audit(member + 0.01 * rng.random(2000), member, (0.05,), 0.0, 0.95)
    assert perfect.v == perfect.r == 200
    assert perfect.epsilon == pytest.approx(epsilon_lower_bound(2000, 200, 200, 0.0, 0.95))
    random = one_run_audit(rng.random(2000), member, (0.01, 0.05), 1e-5, 0.95)
    assert random.epsilon < 0.5
