"""Metric and audit math of safenorm.evaluation against independent computations."""

import math

import numpy as np
import pytest
import safenorm.evaluation.metrics as metrics
from safenorm.evaluation.audit import (
    epsilon_lower_bound,
    max_visible_epsilon,
    one_run_audit,
    p_value,
)
from safenorm.evaluation.metrics import (
    CI_METHODS,
    auc,
    clopper_pearson,
    exposure,
    extrapolated_exposure,
    reference_exposure,
    roc_curve,
    skewnorm_log_sf,
    skewnorm_moments,
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


@pytest.mark.parametrize("ci", ["analytic", "bootstrap", "examples", "pairs"])
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


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ci", ["bootstrap", "examples", "pairs"])
def test_bootstrap_replicates_equal_the_roc_of_the_resampled_data(ci, ties):
    # every replicate is a weight per (model, example) pair; its AUC and TPRs must be those of
    # the data with each pair repeated that many times, computed by roc_curve from scratch
    rng = np.random.default_rng(3)
    labels = rng.random((7, 60)) < 0.5
    scores = rng.normal(size=(7, 60)) + labels
    if ties:
        scores = np.round(scores, 1)
    pairs = metrics._sort_pairs(labels, scores)
    weights = CI_METHODS.get(ci).resample(pairs, rng, 6)
    aucs, tprs = metrics._weighted_stats(pairs, weights, (0.01, 0.05, 0.2))
    flat = np.ravel_multi_index((pairs.row, pairs.col), scores.shape)
    for b in range(len(weights)):
        counts = np.zeros(scores.size, dtype=int)
        counts[flat] = weights[b].astype(int)
        fpr, tpr, _ = roc_curve(
            np.repeat(labels.ravel(), counts), np.repeat(scores.ravel(), counts)
        )
        assert aucs[b] == pytest.approx(auc(fpr, tpr), abs=1e-12)
        for f, t in tprs.items():
            assert t[b] == pytest.approx(tpr_at_fpr(fpr, tpr, f), abs=1e-12)
        per_pair = counts.reshape(scores.shape)
        if ci == "examples":  # whole columns: an example weighs the same on every model
            assert (per_pair == per_pair[:1]).all()
        if ci == "bootstrap":  # whole rows times whole columns: a rank-one count matrix
            u, v = per_pair.sum(1), per_pair.sum(0)
            np.testing.assert_array_equal(per_pair * per_pair.sum(), np.outer(u, v))


def test_tpr_below_the_false_positive_minimum_says_what_it_is():
    rng = np.random.default_rng(4)
    labels = rng.random((2, 300)) < 0.5  # about 300 negatives
    scores = rng.normal(size=(2, 300)) + labels
    s = summarize_roc(labels, scores, (0.1, 0.01, 0.001), bootstrap=50)
    n_neg = s.n_neg
    d = s.to_dict()["tpr_at_fpr"]
    assert d["0.1"]["meets_minimum"] and d["0.1"]["note"] is None  # ~30 expected FPs
    assert d["0.1"]["label"] == "TPR at 10.00% FPR"
    k = math.floor(n_neg * 0.01)
    assert not d["0.01"]["meets_minimum"] and d["0.01"]["label"] == f"TPR at <= {k} false positives"
    assert d["0.001"]["label"] == "TPR at 0 false positives"
    assert f"{n_neg} negatives" in d["0.001"]["note"] and "< 10" in d["0.001"]["note"]
    # TPR at 0 false positives is the fraction of positives above every negative
    top_negative = scores[~labels].max()
    assert s.tpr[0.001].value == pytest.approx(np.mean(scores[labels] > top_negative))


def test_interval_methods_are_registered_with_their_assumptions():
    assert CI_METHODS.canonical("clopper-pearson") == "analytic"
    assert CI_METHODS.canonical("two-way") == "bootstrap"
    for name in CI_METHODS.names():
        assert CI_METHODS.get(name).assumes
    with pytest.raises(KeyError, match="known confidence-interval methods"):
        summarize_roc(np.array([True, False]), np.array([1.0, 0.0]), ci="jackknife")


def test_expanded_percentile_widens_for_few_units():
    # Hesterberg's expanded percentile: tail alpha' with z(alpha') = sqrt(n/(n-1)) t(n-1)
    reps = np.random.default_rng(0).normal(size=200_000)
    wide = metrics._percentile(0.0, reps, 0.95, units=18)
    z = math.sqrt(18 / 17) * stats.t.ppf(0.975, 17)
    assert wide.high == pytest.approx(z, abs=0.02)
    assert metrics._percentile(0.0, reps, 0.95, units=10**6).high == pytest.approx(1.96, abs=0.02)


def test_extrapolated_exposure_of_a_normal_fit_from_the_formula():
    rng = np.random.default_rng(5)
    refs = rng.normal(3.0, 2.0, 63)
    mean, sd = refs.mean(), refs.std(ddof=1)
    # at the mean the tail probability is 1/2: exactly 1 bit
    assert extrapolated_exposure(mean, refs)[0] == pytest.approx(1.0, abs=1e-12)
    # z sigma above the mean: -log2(erfc(z / sqrt 2) / 2)
    for z in (1.0, 3.0, 6.0):
        want = -math.log2(math.erfc(z / math.sqrt(2)) / 2)
        assert extrapolated_exposure(mean + z * sd, refs)[0] == pytest.approx(want, rel=1e-9)
    # far beyond the references it keeps growing (rank-based exposure saturates at 6 bits):
    # Mills' ratio, -log2 sf(z) = (z^2/2 + ln(z sqrt(2 pi))) / ln 2 + O(1/z^2)
    z = 40.0
    want = (z * z / 2 + math.log(z * math.sqrt(2 * math.pi))) / math.log(2)
    assert extrapolated_exposure(mean + z * sd, refs)[0] == pytest.approx(want, rel=1e-3)
    assert exposure(mean + z * sd, refs)[0] == pytest.approx(6.0)


def test_skew_normal_tail_from_the_formula():
    # a standard skew-normal with shape alpha: P(X > 0) = 1/2 + arctan(alpha) / pi
    for alpha in (-3.0, 0.0, 0.5, 4.0):
        got = skewnorm_log_sf(np.array([0.0]), alpha, 0.0, 1.0)[0]
        assert math.exp(got) == pytest.approx(0.5 + math.atan(alpha) / math.pi, rel=1e-9)
    # deep in the tail (where sf underflows) the asymptotic forms take over; where both exist
    # they agree with scipy's sf
    for alpha, z in ((-2.0, 8.0), (3.0, 30.0)):
        far = skewnorm_log_sf(np.array([z, 40.0, 200.0]), alpha, 0.0, 1.0)
        assert np.all(np.isfinite(far)) and np.all(np.diff(far) < 0)
        a2 = 1 + alpha**2
        approx = (
            math.log(2) + stats.norm.logsf(z)
            if alpha >= 0
            else -a2 * z * z / 2 - math.log(math.pi * abs(alpha) * a2 * z * z)
        )
        assert approx == pytest.approx(math.log(stats.skewnorm.sf(z, alpha)), rel=1e-3)
    assert skewnorm_log_sf(np.array([200.0]), 3.0, 0.0, 1.0)[0] == pytest.approx(
        math.log(2) + stats.norm.logsf(200.0)
    )


def test_skew_normal_moment_fit_recovers_the_parameters():
    x = stats.skewnorm.rvs(4.0, loc=1.0, scale=2.0, size=400_000, random_state=0)
    alpha, loc, scale = skewnorm_moments(x)
    assert loc == pytest.approx(1.0, abs=0.05) and scale == pytest.approx(2.0, abs=0.05)
    assert alpha == pytest.approx(4.0, rel=0.15)
    # a never-seen canary (drawn like the references) scores log2(e) bits on average
    refs = stats.skewnorm.rvs(4.0, size=5000, random_state=1)
    new = stats.skewnorm.rvs(4.0, size=20000, random_state=2)
    mean_bits = extrapolated_exposure(new, refs, fit="skewnorm").mean()
    assert mean_bits == pytest.approx(1 / math.log(2), abs=0.05)


@pytest.mark.parametrize("m", [200, 1032, 10000])
def test_audit_ceiling_is_the_bound_with_every_guess_correct(m):
    fractions, tests = (0.01, 0.03, 0.1), 18
    level = 0.05 / (len(fractions) * tests)
    # delta = 0: all r guesses correct certifies logit(level^(1/r)); the largest r wins
    r = 2 * min(max(1, round(0.1 * m)), m // 2)
    q = level ** (1 / r)
    assert max_visible_epsilon(m, fractions, 0.0, 0.95, tests) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-6
    )
    # with delta, it is what a perfect attack (scores = membership) gets, and no audit beats it
    rng = np.random.default_rng(m)
    member = rng.random(m) < 0.5
    ceiling = max_visible_epsilon(m, fractions, 1e-5, 0.95, tests)
    perfect = one_run_audit(member + 0.01 * rng.random(m), member, fractions, 1e-5, 0.95, tests)
    assert perfect.epsilon == pytest.approx(ceiling) and perfect.max_epsilon == ceiling
    noisy = one_run_audit(member + rng.normal(size=m), member, fractions, 1e-5, 0.95, tests)
    assert noisy.epsilon <= noisy.max_epsilon == ceiling
    assert noisy.to_dict()["max_epsilon"] == ceiling
