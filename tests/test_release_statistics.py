"""Checkpoint release: DP recomputation of running statistics and its reported cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm
from safenorm.release import gaussian_delta, release_statistics


def numeric_gaussian_delta(mu: float, eps: float) -> float:
    """Independent: delta(eps) = E_{x ~ N(mu, 1)}[max(0, 1 - exp(eps - L(x)))] with the privacy
    loss L(x) = mu x - mu^2 / 2, by numerical integration."""
    x0 = (eps + mu**2 / 2) / mu  # where L(x) = eps

    def integrand(x):
        return (
            math.exp(-((x - mu) ** 2) / 2)
            / math.sqrt(2 * math.pi)
            * (1 - math.exp(eps - mu * x + mu**2 / 2))
        )

    value, _ = integrate.quad(integrand, x0, x0 + 40, limit=200, epsabs=1e-14)
    return value


def model_and_data(n=256, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(n, 5)
    model.train()
    for _ in range(20):  # raw running statistics, as after training
        model(x)
    return model, DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=64)


def exact_moments(model, loader):
    with torch.no_grad():
        h = model[0](loader.dataset.tensors[0]).double()
    return h.mean(0), h.var(0, unbiased=False)


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 1e-5), (0.3, 1e-6), (4.0, 1e-5)])
def test_reported_cost_matches_numeric_privacy_loss_integral(epsilon, delta):
    model, loader = model_and_data()
    report = release_statistics(model, loader, epsilon, delta)
    assert report.num_releases == 2 and report.layers == ("1",)
    assert report.mu == pytest.approx(math.sqrt(2) / report.noise_multiplier)
    assert report.epsilon == pytest.approx(epsilon, rel=1e-9)
    assert numeric_gaussian_delta(report.mu, report.epsilon) == pytest.approx(delta, rel=1e-6)
    assert gaussian_delta(report.mu, epsilon) <= delta * (1 + 1e-9)


def test_noise_has_the_documented_scale():
    """(released mean - exact mean) * D / (sigma R1) is standard normal (nothing clipped)."""
    z_mean = []
    big = 1e3
    for seed in range(40):
        model, loader = model_and_data(n=128, seed=0)
        mean, _ = exact_moments(model, loader)
        gen = torch.Generator().manual_seed(seed)
        report = release_statistics(
            model, loader, 1.0, 1e-5, clip_norm=big, var_clip_norm=big, generator=gen
        )
        released = model[1].running_mean.double()
        z_mean.append((released - mean) * 128 / (report.noise_multiplier * big))
    z = torch.cat(z_mean).numpy()
    assert abs(z.mean()) < 0.15
    assert np.std(z) == pytest.approx(1.0, abs=0.1)


def test_low_noise_release_recovers_the_statistics_and_replaces_raw_ones():
    model, loader = model_and_data()
    raw_mean = model[1].running_mean.clone()
    mean, var = exact_moments(model, loader)
    report = release_statistics(model, loader, epsilon=200.0, delta=1e-5)
    assert report.noise_multiplier < 0.1
    torch.testing.assert_close(model[1].running_mean.double(), mean, atol=0.02, rtol=0)
    n = len(loader.dataset)
    torch.testing.assert_close(model[1].running_var.double(), var * n / (n - 1), atol=0.05, rtol=0)
    assert not torch.equal(model[1].running_mean, raw_mean)
    assert model.training  # mode restored


def test_later_layers_see_released_earlier_statistics_and_dp_layers_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 4),
        safenorm.DPBatchNorm1d(4),
    )
    dp_before = model[5].running_mean.clone()
    loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=16)
    report = release_statistics(model, loader, 2.0, 1e-5)
    assert report.layers == ("1", "3") and report.num_releases == 4
    assert torch.equal(model[5].running_mean, dp_before)


class _HeadDefinedFirst(nn.Module):
    """Definition order head_bn, stem_bn; execution order stem_bn, then head_bn."""

    def __init__(self) -> None:
        super().__init__()
        self.head_bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 4)
        self.stem = nn.Linear(4, 4)
        self.stem_bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_bn(self.head(self.stem_bn(self.stem(x))))


def test_release_follows_execution_order_not_definition_order():
    """Before: head_bn was released first, on inputs normalized with stem_bn's RAW statistics,
    so changing only stem_bn's raw running_mean moved head_bn's released mean."""
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=16)
    released = []
    for stem_mean in (0.0, 5.0):
        torch.manual_seed(0)
        model = _HeadDefinedFirst()
        with torch.no_grad():
            model.stem_bn.running_mean.fill_(stem_mean)
        report = release_statistics(
            model, loader, 2.0, 1e-5, generator=torch.Generator().manual_seed(1)
        )
        assert report.layers == ("stem_bn", "head_bn")
        released.append(model.head_bn.running_mean.clone())
    torch.testing.assert_close(released[0], released[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "before",
    [
        nn.InstanceNorm1d(4, affine=False, track_running_stats=True),  # unreleased statistics
        nn.BatchNorm1d(4, track_running_stats=False),  # batch statistics in eval: coupling
    ],
    ids=["instancenorm-running-stats", "batch-statistics-in-eval"],
)
def test_release_refuses_a_coupling_or_unreleased_layer_before_a_released_one(before):
    loader = DataLoader(TensorDataset(torch.randn(32, 4, 3)), batch_size=8)
    model = nn.Sequential(nn.Conv1d(4, 4, 1), before, nn.BatchNorm1d(4))
    saved = model[2].running_mean.clone()
    with pytest.raises(ValueError, match="runs before the released layers"):
        release_statistics(model, loader, 2.0, 1e-5)
    assert torch.equal(model[2].running_mean, saved)  # nothing released


def test_release_refuses_a_layer_called_twice_and_dp_layers_without_running_statistics():
    bn = nn.BatchNorm1d(4)
    loader = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8)
    with pytest.raises(ValueError, match="runs 2 times per forward"):
        release_statistics(nn.Sequential(bn, nn.Linear(4, 4), bn), loader, 2.0, 1e-5)
    dp = safenorm.DPBatchNorm1d(4, track_running_stats=False, expected_batch_size=8)
    with pytest.raises(ValueError, match="no running statistics"):
        release_statistics(nn.Sequential(dp, nn.BatchNorm1d(4)), loader, 2.0, 1e-5)


def test_release_refuses_loaders_that_repeat_samples():
    model, loader = model_and_data(n=64)
    saved = model[1].running_mean.clone()
    dataset = loader.dataset
    with_replacement = DataLoader(
        dataset, batch_size=16, sampler=torch.utils.data.RandomSampler(dataset, replacement=True)
    )
    with pytest.raises(ValueError, match="at most once per pass"):
        release_statistics(model, with_replacement, 2.0, 1e-5)
    twice = DataLoader(dataset, batch_size=16, sampler=list(range(64)) * 2)
    with pytest.raises(ValueError, match="yielded 128 samples"):
        release_statistics(model, twice, 2.0, 1e-5)
    assert torch.equal(model[1].running_mean, saved)
