"""Membership-inference attacks on synthetic Gaussian scores with known separation."""

import math

import numpy as np
import pytest
from safenorm.evaluation.attacks import ATTACKS, lira_statistics, run_attack
from safenorm.evaluation.metrics import auc, roc_curve
from scipy import stats


def _gaussian_world(models=32, examples=1500, d=1.0, difficulty=1.0, seed=0):
    """phi[m, x] = mu_x + d * member[m, x] + N(0, 1); mu_x ~ N(0, difficulty^2)."""
    rng = np.random.default_rng(seed)
    keep = rng.random((models, examples)) < 0.5
    mu = rng.normal(0, difficulty, examples)
    scores = mu + d * keep + rng.normal(size=(models, examples))
    pop_mu = rng.normal(0, difficulty, 500)
    population = pop_mu + rng.normal(size=(models, 500))
    return scores, keep, population


def _auc(keep, scores):
    fpr, tpr, _ = roc_curve(keep.ravel(), scores.ravel())
    return auc(fpr, tpr)


def test_lira_reaches_the_optimal_auc():
    # per-example means known up to shadow noise: the LR test is optimal, AUC = Phi(d / sqrt(2))
    scores, keep, population = _gaussian_world(d=1.0)
    optimal = stats.norm.cdf(1.0 / math.sqrt(2))
    for name in ("lira-online", "lira-offline"):
        a = _auc(keep, run_attack(name, scores, keep, population))
        assert a == pytest.approx(optimal, abs=0.02), name


def test_loss_attack_pays_for_example_difficulty():
    # LOSS thresholds the raw score, whose spread includes mu_x: Phi(d / sqrt(2 (1 + 1)))
    scores, keep, population = _gaussian_world(d=1.0, difficulty=1.0)
    expected = stats.norm.cdf(1.0 / math.sqrt(2 * 2))
    assert _auc(keep, run_attack("loss", scores, keep, population)) == pytest.approx(
        expected, abs=0.02
    )


def test_rmia_beats_loss_and_no_signal_means_chance():
    scores, keep, population = _gaussian_world(d=1.0)
    loss = _auc(keep, run_attack("loss", scores, keep, population))
    for name in ("rmia", "rmia-offline"):
        assert _auc(keep, run_attack(name, scores, keep, population)) > loss + 0.03, name
    null_scores, null_keep, null_pop = _gaussian_world(d=0.0, seed=3)
    for name in ATTACKS.names():
        a = _auc(null_keep, run_attack(name, null_scores, null_keep, null_pop))
        assert a == pytest.approx(0.5, abs=0.02), name


def test_lira_statistics_and_leave_one_out():
    scores, keep, _ = _gaussian_world(models=64, examples=400, d=2.0, difficulty=0.0, seed=1)
    mu_in, mu_out, s_in, s_out = lira_statistics(scores, keep)
    assert np.mean(mu_in - mu_out) == pytest.approx(2.0, abs=0.05)
    assert s_in == pytest.approx(1.0, abs=0.05) and s_out == pytest.approx(1.0, abs=0.05)
    # leave-one-out: target 0 is calibrated on models 1..M only
    offline = run_attack("lira-offline", scores, keep, np.zeros((64, 10)))[0]
    _, mu_out0, _, s_out0 = lira_statistics(scores[1:], keep[1:])
    np.testing.assert_allclose(offline, (scores[0] - mu_out0) / s_out0)


def test_attack_registry_aliases_and_errors():
    assert ATTACKS.canonical("LiRA") == "lira-online"
    assert ATTACKS.canonical("threshold") == "loss"
    known = "known attacks: loss, lira-offline, lira-online, rmia, rmia-offline"
    with pytest.raises(KeyError, match=known):
        ATTACKS.get("carlini")
    with pytest.raises(ValueError, match="at least 2 models"):
        run_attack("lira-online", np.zeros((1, 3)), np.ones((1, 3), bool), np.zeros((1, 2)))
