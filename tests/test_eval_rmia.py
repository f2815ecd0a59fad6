"""RMIA (online and offline) against a brute-force pairwise computation in exact arithmetic."""

from __future__ import annotations

from decimal import Decimal, getcontext

import numpy as np
import pytest
from safenorm.evaluation.attacks import (
    OFFLINE_A_GRID,
    AttackInputs,
    _offline_scores,
    log_reference_probability,
    run_attack,
    tune_offline_a,
)
from safenorm.evaluation.metrics import auc, roc_curve

getcontext().prec = 80  # 1 - expit(50) = 2e-22 needs more than float64's 16 digits


def _p(phi: float) -> Decimal:
    return 1 / (1 + (-Decimal(repr(float(phi)))).exp())


def _pr(phis, a: Decimal) -> Decimal:
    """((1 + a) mean p + (1 - a)) / 2 over the given reference scores."""
    mean = sum(_p(v) for v in phis) / len(phis)
    return ((1 + a) * mean + (1 - a)) / 2


def brute_force_rmia(scores, keep, population, gamma=1.0, offline_a=None):
    """RMIA by its definition, pair by pair: for target t and example x, the fraction of z with
    LR(x) / LR(z) > gamma, every probability in 80-digit decimal arithmetic."""
    m, n = scores.shape
    g = Decimal(repr(gamma))
    out = np.zeros((m, n))
    for t in range(m):
        refs = [k for k in range(m) if k != t]
        a = Decimal(1) if offline_a is None else Decimal(repr(offline_a))
        lr_z = []
        for z in range(population.shape[1]):
            lr_z.append(_p(population[t, z]) / _pr([population[k, z] for k in refs], a))
        for x in range(n):
            use = refs if offline_a is None else [k for k in refs if not keep[k, x]] or refs
            lr_x = _p(scores[t, x]) / _pr([scores[k, x] for k in use], a)
            out[t, x] = sum(lr_x / lz > g for lz in lr_z) / len(lr_z)
    return out


def _world(models=5, examples=12, pop=15, seed=0):
    rng = np.random.default_rng(seed)
    keep = rng.random((models, examples)) < 0.5
    mu = rng.normal(0, 1.5, examples)
    scores = mu + 1.5 * keep + rng.normal(size=(models, examples))
    population = rng.normal(0, 1.5, pop) + rng.normal(size=(models, pop))
    return scores, keep, population


@pytest.mark.parametrize("shift", [0.0, 50.0, -50.0])
@pytest.mark.parametrize("offline_a", [None, 0.3, 1.0])
def test_rmia_matches_brute_force_at_any_confidence(shift, offline_a):
    scores, keep, population = _world()
    gamma = 1.0 if offline_a is None else 1.2
    name = "rmia" if offline_a is None else "rmia-offline"
    got = run_attack(name, scores + shift, keep, population + shift, gamma, offline_a)
    want = brute_force_rmia(scores + shift, keep, population + shift, gamma, offline_a)
    np.testing.assert_array_equal(got, want)


def test_log_reference_probability_keeps_its_digits_near_0_and_1():
    phi = np.array([[60.0, -60.0, 0.0], [55.0, -65.0, 2.0]])
    for a in (1.0, 0.4):
        got = log_reference_probability(phi, a=a)
        for j in range(3):
            want = _pr(phi[:, j], Decimal(repr(a))).ln()
            assert float(want) == pytest.approx(got[j], rel=1e-12, abs=0), (a, j)


def _gaussian_world(models=16, examples=2000, seed=2):
    rng = np.random.default_rng(seed)
    keep = rng.random((models, examples)) < 0.5
    mu = rng.normal(0, 2.0, examples)
    scores = mu + 1.0 * keep + rng.normal(size=(models, examples))
    population = rng.normal(0, 2.0, 400) + rng.normal(size=(models, 400))
    return scores, keep, population


def _auc(keep, s):
    fpr, tpr, _ = roc_curve(keep.ravel(), s.ravel())
    return auc(fpr, tpr)


@pytest.mark.parametrize("name", ["rmia", "rmia-offline"])
def test_rmia_auc_survives_saturated_probabilities(name):
    # at phi + 50 every p rounds to 1 in float64; the float64 ratio p_target / mean p would be
    # 1 everywhere (AUC 0.5). In the saturated regime (+50 and +60, or -50 and -60) RMIA's
    # ranking no longer depends on the shift, so its AUC must not either, and it must still
    # find the members
    scores, keep, pop = _gaussian_world()
    for lo, hi in ((50.0, 60.0), (-50.0, -60.0)):
        a_lo = _auc(keep, run_attack(name, scores + lo, keep, pop + lo))
        a_hi = _auc(keep, run_attack(name, scores + hi, keep, pop + hi))
        assert a_lo == pytest.approx(a_hi, abs=2e-3), (lo, hi)
        assert a_lo > 0.6, (name, lo, a_lo)


def test_offline_a_is_tuned_on_the_shadows_only():
    scores, keep, pop = _gaussian_world(models=8, examples=600)
    inputs = AttackInputs(scores, keep, pop, target=0)
    a = tune_offline_a(inputs)
    assert a in OFFLINE_A_GRID
    # the target's own scores and membership do not enter the choice
    scrambled = scores.copy()
    scrambled[0] = np.random.default_rng(9).normal(size=scores.shape[1])
    flipped = keep.copy()
    flipped[0] = ~flipped[0]
    assert tune_offline_a(AttackInputs(scrambled, flipped, pop, target=0)) == a
    # it is the a of the best AUC on the stand-in target (model 1) attacked with models 2..7
    refs = np.arange(2, 8)
    attacked = _offline_scores(scores, keep, pop, 1, refs, OFFLINE_A_GRID, 1.0)
    stand_in = {b: _auc(keep[1], s) for b, s in zip(OFFLINE_A_GRID, attacked, strict=True)}
    assert stand_in[a] == max(stand_in.values())
    assert _auc(keep, run_attack("rmia-offline", scores, keep, pop)) > 0.6
    # two models: nothing to tune on, a = 1
    assert tune_offline_a(AttackInputs(scores[:2], keep[:2], pop[:2], target=0)) == 1.0
