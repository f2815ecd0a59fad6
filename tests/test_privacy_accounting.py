"""safenorm.privacy: sigma_eff, release counting, self-contained RDP and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch import nn

import safenorm
from safenorm import privacy


def numeric_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP of the Poisson-subsampled Gaussian by numerical integration (independent reference):
    (1/(alpha-1)) log E_{z ~ N(0, s^2)} [((1-q) + q exp((2z-1)/(2 s^2)))^alpha]."""

    def log_f(z):
        ratio = np.logaddexp(np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * sigma**2))
        return alpha * ratio - z**2 / (2 * sigma**2) - 0.5 * np.log(2 * np.pi * sigma**2)

    grid = np.linspace(-50 * sigma, 50 * sigma + alpha, 200001)
    peak_index = int(np.argmax(log_f(grid)))
    peak, shift = grid[peak_index], log_f(grid[peak_index])
    lo, hi = min(-20 * sigma, peak - 20 * sigma), max(20 * sigma, peak + 20 * sigma)
    value, _ = integrate.quad(
        lambda z: np.exp(log_f(z) - shift), lo, hi, points=[0.0, peak], limit=1000, epsabs=0
    )
    return (math.log(value) + shift) / (alpha - 1)


def test_sigma_eff_formula():
    assert privacy.sigma_eff(1.0) == 1.0
    assert privacy.sigma_eff(1.1, [8.0] * 10) == pytest.approx((1 / 1.21 + 10 / 64) ** -0.5)
    assert privacy.sigma_eff(None, [2.0, 2.0]) == pytest.approx(math.sqrt(2))
    assert privacy.sigma_eff(1.0, [0.0]) == 0.0
    assert privacy.sigma_eff(2.0, [math.inf]) == 2.0
    with pytest.raises(ValueError):
        privacy.sigma_eff(None, [])
    with pytest.raises(ValueError):
        privacy.sigma_eff(1.0, [-1.0])


@pytest.mark.parametrize("alpha", [2, 3, 8, 32])
def test_rdp_integer_orders_match_numeric_integration(alpha):
    for q, sigma in [(0.01, 1.0), (0.25, 0.9), (0.1, 2.5)]:
        ours = privacy.rdp_subsampled_gaussian(q, sigma, [alpha])[0]
        assert ours == pytest.approx(numeric_rdp(q, sigma, alpha), rel=1e-6)


def test_rdp_matches_opacus_analysis():
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = list(range(2, 64))
    for q, sigma in [(0.00512, 1.1), (0.25, 0.95), (1.0, 3.0)]:
        ours = privacy.rdp_subsampled_gaussian(q, sigma, orders)
        theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_design_doc_example_separate_entries_under_report():
    """DESIGN.md §4: 10 releases at sigma 8 beside sigma_g = 1.1, q = 0.00512, 1953 steps."""
    from opacus.accountants import RDPAccountant

    q, steps = 0.00512, 1953
    joint = RDPAccountant()
    joint.history = [(privacy.sigma_eff(1.1, [8.0] * 10), q, steps)]
    separate = RDPAccountant()
    separate.history = [(1.1, q, steps)] + [(8.0, q, steps)] * 10
    assert joint.get_epsilon(1e-5) == pytest.approx(1.445, abs=2e-3)
    assert separate.get_epsilon(1e-5) == pytest.approx(1.261, abs=2e-3)


def test_release_ledger_counts_actual_releases():
    model = nn.Sequential(
        safenorm.DPBatchNorm1d(4, expected_batch_size=8, noise_multiplier=3.0),
        nn.Linear(4, 4),
        safenorm.DPBatchNorm1d(4, expected_batch_size=8, noise_multiplier=5.0),
        safenorm.DPBatchNorm1d(4, expected_batch_size=8, frozen_statistics=True),
    )
    ledger = privacy.ReleaseLedger(model)
    x = torch.randn(8, 4)
    model(x)
    model(x)
    assert sorted(ledger.consume()) == [3.0] * 4 + [5.0] * 4
    assert ledger.consume() == ()
    model.eval()
    model(x)
    assert ledger.pending == ()
    assert privacy.planned_releases(model, forwards_per_step=2) == 8
    ledger.close()
    model.train()
    with pytest.warns(safenorm.PrivacyWarning, match="UNACCOUNTED"):
        model(x)
    assert ledger.pending == ()


def test_split_noise_recombines_to_sigma_eff():
    plan = privacy.split_noise(0.8, num_releases=6, statistics_share=0.2)
    recombined = privacy.sigma_eff(
        plan.gradient_noise_multiplier, [plan.statistics_noise_multiplier] * 6
    )
    assert recombined == pytest.approx(0.8, rel=1e-12)
    assert privacy.split_noise(0.8, 0).gradient_noise_multiplier == 0.8
    with pytest.raises(ValueError):
        privacy.split_noise(0.8, 4, statistics_share=0.0)


def test_calibration_without_opacus_lands_on_target():
    q, steps, delta = 0.01, 1000, 1e-5
    for target in (0.5, 2.0, 8.0):
        plan = privacy.calibrate_noise(target, delta, q, steps, num_releases=4)
        eps = privacy.rdp_epsilon(plan.sigma_eff, q, steps, delta)
        assert target * 0.99 <= eps <= target


def test_self_contained_epsilon_is_conservative_vs_opacus():
    """Integer orders only: never below Opacus' RDP epsilon (which also uses fractional ones)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 1000)]
    ours = privacy.rdp_epsilon(1.0, 0.01, 1000, 1e-5)
    assert acc.get_epsilon(1e-5) <= ours <= acc.get_epsilon(1e-5) * 1.05


def test_numeric_reference_is_sane():
    # q = 1: RDP of the Gaussian mechanism is alpha / (2 sigma^2) exactly.
    assert numeric_rdp(1 - 1e-12, 2.0, 5.0) == pytest.approx(5 / 8, rel=1e-6)
    assert special.ndtr(0.0) == 0.5
