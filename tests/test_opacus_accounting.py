"""safenorm.opacus.PrivacyEngine accounting: one subsampled Gaussian per step with sigma_eff."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, special
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm
from safenorm import privacy

pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant

from safenorm.opacus import PrivacyEngine
from test_privacy_accounting import numeric_rdp

DELTA = 1e-5
N_DATA, BATCH = 48, 12  # q = 1/4, 4 steps per epoch


def mlp(layer_sigmas: list[float]) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    for sigma in layer_sigmas:
        layers += [safenorm.DPBatchNorm1d(8, noise_multiplier=sigma), nn.ReLU(), nn.Linear(8, 8)]
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers)


def loader(n=N_DATA, batch=BATCH, seed=0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def train(engine, model, epochs=1, forwards=1, sigma_g=1.1, mode="hooks", **kw):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader(),
        noise_multiplier=sigma_g,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        **kw,
    )
    gs_model, dp_opt, dp_loader = out[0], out[1], out[-1]
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    steps = 0
    for _ in range(epochs):
        for x, y in dp_loader:
            dp_opt.zero_grad()
            loss = sum(criterion(gs_model(x), y) for _ in range(forwards))
            loss.backward()
            dp_opt.step()
            steps += 1
    return steps


def independent_sigma_eff(sigma_g, layer_sigmas, forwards):
    return (1 / sigma_g**2 + sum(2 * forwards / s**2 for s in layer_sigmas)) ** -0.5


def numeric_rdp_epsilon(sigma, q, steps, delta):
    """Independent: numerically integrated RDP at Opacus' orders, Balle et al. conversion."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    eps = [
        steps * numeric_rdp(q, sigma, a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        + math.log((a - 1) / a)
        for a in orders
    ]
    return min(eps)


def gdp_closed_form_epsilon(sigma, q, steps, delta):
    """Independent: CLT mu-GDP of Poisson-subsampled Gaussian (Bu et al. 2020), solved for eps."""
    mu = q * math.sqrt(steps * (math.exp(sigma**-2) - 1))

    def delta_of(eps):
        return special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2)

    return optimize.brentq(lambda e: delta_of(e) - delta, 0, 500)


@pytest.mark.parametrize(
    ("layer_sigmas", "forwards"),
    [([], 1), ([6.0], 1), ([4.0, 6.0, 8.0], 1), ([5.0, 7.0], 2)],
    ids=["0-layers", "1-layer", "3-layers", "2-layers-2-forwards"],
)
def test_epsilon_equals_subsampled_gaussian_with_sigma_eff(layer_sigmas, forwards):
    engine = PrivacyEngine(accountant="rdp")
    steps = train(engine, mlp(layer_sigmas), epochs=2, forwards=forwards)
    q = BATCH / N_DATA
    sigma = independent_sigma_eff(1.1, layer_sigmas, forwards)
    eps = engine.get_epsilon(DELTA)

    direct = RDPAccountant()
    direct.history = [(sigma, q, steps)]
    assert eps == pytest.approx(direct.get_epsilon(DELTA), rel=1e-9)
    assert eps == pytest.approx(numeric_rdp_epsilon(sigma, q, steps, DELTA), rel=1e-5)
    if layer_sigmas:  # the statistics cost something
        plain = RDPAccountant()
        plain.history = [(1.1, q, steps)]
        assert eps > plain.get_epsilon(DELTA) * 1.01


@pytest.mark.parametrize("layer_sigmas", [[], [3.0, 6.0]])
def test_gdp_accountant_matches_closed_form(layer_sigmas):
    engine = PrivacyEngine(accountant="gdp")
    steps = train(engine, mlp(layer_sigmas), epochs=2)
    sigma = independent_sigma_eff(1.1, layer_sigmas, 1)
    expected = gdp_closed_form_epsilon(sigma, BATCH / N_DATA, steps, DELTA)
    assert engine.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-3)


def test_ghost_mode_accounts_like_hooks():
    engine = PrivacyEngine(accountant="rdp")
    steps = train(engine, mlp([4.0, 6.0]), epochs=1, mode="ghost")
    sigma = independent_sigma_eff(1.1, [4.0, 6.0], 1)
    assert engine.accountant.history == [(pytest.approx(sigma, rel=1e-12), 0.25, steps)]


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_make_private_with_epsilon_hits_target(accountant):
    target = 3.0
    engine = PrivacyEngine(accountant=accountant)
    model = mlp([6.0, 6.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    epochs = 3
    gs_model, dp_opt, dp_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=opt,
        data_loader=loader(),
        target_epsilon=target,
        target_delta=DELTA,
        epochs=epochs,
        max_grad_norm=1.0,
        statistics_share=0.2,
    )
    plan = engine.noise_plan
    assert plan.num_releases == 4 and plan.statistics_share == 0.2
    assert dp_opt.noise_multiplier == pytest.approx(plan.gradient_noise_multiplier)
    assert all(
        layer.noise_multiplier == pytest.approx(plan.statistics_noise_multiplier)
        for _, layer in privacy.dp_layers(model)
    )
    for _ in range(epochs):
        for x, y in dp_loader:
            dp_opt.zero_grad()
            nn.functional.cross_entropy(gs_model(x), y).backward()
            dp_opt.step()
    eps = engine.get_epsilon(DELTA)
    assert target * 0.99 <= eps <= target * 1.0001
    # the gradient noise alone would give a smaller epsilon: the statistics were paid for
    grad_only = RDPAccountant()
    grad_only.history = [(plan.gradient_noise_multiplier, 0.25, 12)]
    assert grad_only.get_epsilon(DELTA) < eps


def test_more_forwards_than_planned_warns_and_is_still_accounted():
    engine = PrivacyEngine(accountant="rdp")
    model = mlp([6.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gs_model, dp_opt, dp_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=opt,
        data_loader=loader(),
        target_epsilon=2.0,
        target_delta=DELTA,
        epochs=1,
        max_grad_norm=1.0,
    )
    x, y = next(iter(dp_loader))
    dp_opt.zero_grad()
    (nn.functional.cross_entropy(gs_model(x), y) * 2).backward()
    gs_model(x)  # a second forward in the same step
    with pytest.warns(safenorm.PrivacyWarning, match="planned 2"):
        dp_opt.step()
    plan = engine.noise_plan
    expected = privacy.sigma_eff(
        plan.gradient_noise_multiplier, [plan.statistics_noise_multiplier] * 4
    )
    assert engine.accountant.history[0][0] == pytest.approx(expected)


def test_empty_poisson_batches_still_release_and_step():
    torch.manual_seed(3)
    engine = PrivacyEngine(accountant="rdp")
    model = mlp([6.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gs_model, dp_opt, dp_loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader(n=16, batch=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    empties = steps = 0
    for _ in range(3):
        for x, y in dp_loader:
            empties += x.shape[0] == 0
            dp_opt.zero_grad()
            nn.functional.cross_entropy(gs_model(x), y).backward()
            dp_opt.step()
            steps += 1
    assert empties > 0
    assert model[1].release_count == 2 * steps  # noise-only releases on empty batches
    assert engine.accountant.history == [
        (pytest.approx(privacy.sigma_eff(1.0, [6.0, 6.0])), 1 / 8, steps)
    ]
    assert np.isfinite(engine.get_epsilon(DELTA))


def test_pending_releases_warn_in_get_epsilon():
    engine = PrivacyEngine(accountant="rdp")
    model = mlp([6.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gs_model, _, dp_loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader(), noise_multiplier=1.0, max_grad_norm=1.0
    )
    x, _ = next(iter(dp_loader))
    gs_model(x)  # a training forward on the step's batch, before its optimizer step
    with pytest.warns(safenorm.PrivacyWarning, match="not yet accounted"):
        engine.get_epsilon(DELTA)


def test_expected_batch_size_comes_from_the_optimizer():
    engine = PrivacyEngine(accountant="rdp")
    model = mlp([6.0, 6.0])
    model[1].expected_batch_size = 99
    with pytest.warns(safenorm.PrivacyWarning, match="replaced"):
        train(engine, model)
    assert [layer.expected_batch_size for _, layer in privacy.dp_layers(model)] == [12.0, 12.0]
