"""The privacy-relevant behaviour of the clipped and DP layers, against independent references:
a per-sample loop of the documented mechanism, brute-force bounds and statistical tests."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as scipy_stats

import safenorm
from safenorm import functional as SF

EPS = 1e-5


def _loop_clip(u: torch.Tensor, bound: float) -> torch.Tensor:
    norm = float(torch.linalg.vector_norm(u))
    return u if norm <= bound else u * (bound / norm)


def _loop_release(x, *, r1, r2, sigma, denominator, center, scale, floor, generator):
    """The documented DP mechanism, one sample at a time (the independent reference)."""
    c = x.shape[1]
    flat = [x[i].reshape(c, -1).double() for i in range(x.shape[0])]
    means = [f.mean(1) for f in flat]
    spreads = [f.var(1, unbiased=False) for f in flat]
    total = sum((_loop_clip((m - center) / scale, r1) for m in means), torch.zeros(c).double())
    total = total + torch.randn((1, c), generator=generator)[0].double() * sigma * r1
    mu = center + scale * total / denominator
    total = sum(
        (
            _loop_clip((w + (m - mu) ** 2) / scale**2, r2)
            for m, w in zip(means, spreads, strict=True)
        ),
        torch.zeros(c).double(),
    )
    total = total + torch.randn((1, c), generator=generator)[0].double() * sigma * r2
    var = torch.maximum(scale**2 * total / denominator, floor * scale**2)
    return mu, var


@pytest.mark.parametrize("normalize_with", ["batch", "running"])
@pytest.mark.parametrize("batch", [6, 0])
def test_dp_layer_matches_loop_reference_and_buffers_hold_only_released_values(
    normalize_with, batch
):
    c, d, sigma = 4, 8, 3.0
    x = torch.randn(batch, c, 3, 3) * 2 + 1
    layer = safenorm.DPBatchNorm2d(
        c,
        clip_norm=1.5,
        var_clip_norm=2.5,
        noise_multiplier=sigma,
        expected_batch_size=d,
        normalize_with=normalize_with,
        var_floor=0.1,
        generator=torch.Generator().manual_seed(7),
    )
    y = layer(x)

    scale = torch.sqrt(torch.ones(c).double() + EPS)  # the reference: initial running stats
    mu, var = _loop_release(
        x, r1=1.5, r2=2.5, sigma=sigma, denominator=d, center=torch.zeros(c).double(),
        scale=scale, floor=0.1, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    unbiased = var * (d * 9) / (d * 9 - 1)
    expected_mean, expected_var = 0.1 * mu, 0.9 + 0.1 * unbiased
    torch.testing.assert_close(layer.running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), expected_var, rtol=1e-5, atol=1e-6)
    norm_mean, norm_var = (mu, var) if normalize_with == "batch" else (expected_mean, expected_var)
    shape = (1, c, 1, 1)
    y_ref = (x.double() - norm_mean.view(shape)) / torch.sqrt(norm_var.view(shape) + EPS)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert y.shape == x.shape
    assert layer.release_count == 2


def test_raw_batch_statistics_never_reach_the_buffers():
    # With a large noise multiplier, a buffer fed by raw statistics would sit far from the value
    # computed from the released statistics alone.
    x = torch.randn(32, 3, 4, 4) * 5 + 10
    layer = safenorm.DPBatchNorm2d(
        3, noise_multiplier=50.0, expected_batch_size=32, clip_reference="none", clip_norm=30.0,
        var_clip_norm=300.0, normalize_with="batch", var_floor=0.0,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    layer(x)
    released_mean, released_var = layer.last_statistics
    torch.testing.assert_close(layer.running_mean, 0.1 * released_mean)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * released_var * 512 / 511)
    raw_mean = x.mean((0, 2, 3))
    assert (layer.running_mean - 0.1 * raw_mean).abs().max() > 1e-3


def test_dp_statistics_are_detached_and_input_gradient_is_per_sample():
    layer = safenorm.DPBatchNorm2d(3, expected_batch_size=5, normalize_with="batch")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    y = layer(x)
    mean, var = layer.last_statistics
    assert not mean.requires_grad and not var.requires_grad
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected = grad_out * (layer.weight / torch.sqrt(var + EPS)).view(1, 3, 1, 1)
    torch.testing.assert_close(x.grad, expected.detach())
    # Sample 0's output does not depend on sample 1's input: its Jacobian block is zero.
    x2 = x.detach().clone().requires_grad_(True)
    layer.generator = torch.Generator().manual_seed(0)
    layer(x2)[0].sum().backward()
    assert torch.count_nonzero(x2.grad[1:]) == 0


def test_dp_noise_has_the_documented_scale():
    c, d, sigma, r1, r2 = 16, 20, 2.0, 1.0, 3.0
    # Enough clipped mass per channel that the variance floor (0) is never reached.
    x = torch.randn(40, c, 3, 3, dtype=torch.float64) * 3
    m, w = SF.per_sample_moments(x)
    groups = SF.Groups(index=torch.zeros(40, dtype=torch.long), size=torch.full((1,), float(d)))
    gen = torch.Generator().manual_seed(11)
    mean_noise, var_noise = [], []
    for _ in range(400):
        released = SF.private_statistics(
            m, w, groups, clip_norm=r1, var_clip_norm=r2, noise_multiplier=sigma, generator=gen
        )
        clean_mean = SF.clip_rows(m, r1).sum(0) / d
        mean_noise.append((released.mean[0] - clean_mean) * d / (sigma * r1))
        centred = w + (m - released.mean[0]) ** 2
        clean_var = SF.clip_rows(centred, r2).sum(0) / d
        var_noise.append((released.var[0] - clean_var) * d / (sigma * r2))
    for samples in (torch.cat(mean_noise), torch.cat(var_noise)):
        assert abs(float(samples.std()) - 1.0) < 0.05
        assert abs(float(samples.mean())) < 0.05
        assert scipy_stats.kstest(samples.numpy(), "norm").pvalue > 1e-3


def test_seed_reproduces_a_run_and_another_seed_does_not():
    def run(seed):
        layer = safenorm.DPBatchNorm2d(
            3, expected_batch_size=8, ghost_batch_size=4, normalize_with="batch",
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        torch.manual_seed(0)
        outputs = [layer(torch.randn(8, 3, 2, 2)) for _ in range(3)]
        return torch.stack(outputs), layer.running_mean.clone()

    (y1, r1), (y2, r2), (y3, _) = run(5), run(5), run(6)
    assert torch.equal(y1, y2) and torch.equal(r1, r2)
    assert not torch.equal(y1, y3)


def test_dp_ghost_groups_are_drawn_independently_of_the_data():
    def groups_of(x, seed):
        gen = torch.Generator().manual_seed(seed)
        return SF.dp_statistics(
            x, clip_norm=1.0, var_clip_norm=1.0, noise_multiplier=1.0, denominator=64,
            ghost_batch_size=8, generator=gen,
        ).groups  # fmt: skip

    a, b = torch.randn(64, 2, 3, 3), torch.randn(64, 2, 3, 3) * 100
    ga = groups_of(a, 1)
    assert torch.equal(ga.index, groups_of(b, 1).index)  # the content plays no part
    assert ga.count == 8 and torch.allclose(ga.size, torch.full((8,), 8.0))
    # Each sample's group is uniform over the 8 groups, whatever its position.
    counts = torch.zeros(8)
    for seed in range(200):
        counts += torch.bincount(groups_of(a, seed).index, minlength=8)
    assert scipy_stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_dp_with_position_sized_groups_uses_public_denominators():
    stats = SF.dp_statistics(
        torch.randn(13, 2, 2, 2), clip_norm=1.0, var_clip_norm=1.0, noise_multiplier=0.0,
        denominator=16, ghost_batch_size=4,
    )  # fmt: skip
    assert torch.allclose(stats.groups.size, torch.full((4,), 4.0))


def _adversaries(shape):
    base = torch.zeros(shape)
    return [
        base + 1e6,
        base - 1e6,
        torch.randn(shape) * 1e4,
        base.index_fill(0, torch.tensor([0]), 1e8),
    ]


@pytest.mark.parametrize("adversary", range(4))
def test_replacing_one_sample_moves_clipped_statistics_within_the_bound(adversary):
    c, n, r1, r2 = 5, 16, 1.5, 4.0
    x = torch.randn(n, c, 3, 3, dtype=torch.float64)
    reference = SF.ClipReference(
        center=torch.full((c,), 0.3, dtype=torch.float64),
        scale=torch.full((c,), 1.7, dtype=torch.float64),
    )
    x_adv = x.clone()
    x_adv[0] = _adversaries((c, 3, 3))[adversary].double()
    groups = SF.consecutive_groups(n, None, x.device)

    def clipped(data):
        m, w = SF.per_sample_moments(data)
        s = SF.clipped_statistics(m, w, groups, clip_norm=r1, var_clip_norm=r2, reference=reference)
        return m, s.mean[0], s.var[0]

    m, mu, var = clipped(x)
    _, mu_adv, var_adv = clipped(x_adv)
    s = reference.scale
    rho1, rho2 = SF.weight_floor(r1, c), SF.weight_floor(r2, c)
    # Mean: each clipped term has norm <= R1 and the denominator is >= rho D, so one replaced
    # sample moves mu by at most (2 + 1/rho) R1 / (rho D) in reference units.
    shift = float(torch.linalg.vector_norm((mu_adv - mu) / s))
    assert shift <= (2 + 1 / rho1) * r1 / (rho1 * n) + 1e-9
    # Variance: its own term as for the mean; through the centre, every other term u_j moves by
    # delta_j <= |d mu| * |2 m_j - mu - mu'| / s^2, its clipped value by at most delta_j
    # (clipping is 1-Lipschitz) and its weight by at most delta_j / R2.
    through_centre = sum(
        float(torch.linalg.vector_norm((mu_adv - mu) * (2 * m[j] - mu - mu_adv) / s**2))
        for j in range(1, n)
    )
    bound = ((2 + 1 / rho2) * r2 + (1 + 1 / rho2) * through_centre) / (rho2 * n)
    assert float(torch.linalg.vector_norm((var_adv - var) / s**2)) <= bound + 1e-9
    assert torch.isfinite(var_adv).all()


def test_adding_one_sample_moves_the_dp_mean_sum_by_at_most_r1():
    x = torch.randn(10, 4, 2, 2, dtype=torch.float64)
    x_plus = torch.cat([x, torch.full((1, 4, 2, 2), -1e7, dtype=torch.float64)])

    def mean_of(data):
        return SF.dp_statistics(
            data, clip_norm=0.7, var_clip_norm=1.0, noise_multiplier=0.0, denominator=10.0
        ).mean[0]

    shift = float(torch.linalg.vector_norm(mean_of(x_plus) - mean_of(x)))
    assert shift <= 0.7 / 10 + 1e-12
    assert shift > 0.7 / 10 * 0.99  # the adversary is clipped exactly to the bound


def test_clipped_layer_bounds_an_outlier_that_dominates_batchnorm():
    x = torch.randn(32, 4, 3, 3)
    x_adv = x.clone()
    x_adv[0] = 1e4
    clipped = safenorm.ClippedBatchNorm2d(4)
    bn = torch.nn.BatchNorm2d(4)
    clip_shift = (clipped(x_adv)[1:] - safenorm.ClippedBatchNorm2d(4)(x)[1:]).abs().max()
    bn_shift = (bn(x_adv)[1:] - torch.nn.BatchNorm2d(4)(x)[1:]).abs().max()
    assert bn_shift > 0.9  # BN: one outlier collapses every other sample's output
    assert clip_shift < 0.25 * bn_shift


def test_secure_mode_draws_standard_normals_and_refuses_a_generator():
    from safenorm.noise import gaussian_noise

    draws = gaussian_noise((20000,), secure_mode=True)
    assert draws.dtype == torch.float32
    assert abs(float(draws.std()) - 1.0) < 0.03
    assert scipy_stats.kstest(draws.numpy(), "norm").pvalue > 1e-3
    with pytest.raises(ValueError, match="secure_mode"):
        gaussian_noise((3,), secure_mode=True, generator=torch.Generator())
    with pytest.raises(ValueError, match="secure_mode"):
        safenorm.DPBatchNorm2d(3, secure_mode=True, generator=torch.Generator())
    layer = safenorm.DPBatchNorm2d(3, secure_mode=True, expected_batch_size=4)
    assert torch.isfinite(layer(torch.randn(4, 3, 2, 2))).all()


def test_dp_without_public_batch_size_warns_once():
    layer = safenorm.DPBatchNorm1d(3)
    with pytest.warns(safenorm.PrivacyWarning, match="expected_batch_size"):
        layer(torch.randn(4, 3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(4, 3))


def test_frozen_statistics_release_nothing_and_use_the_loaded_buffers():
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 3.0]))
    layer = safenorm.DPBatchNorm2d.from_batchnorm(bn, frozen_statistics=True).train()
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(layer(x), bn.eval()(x))
    assert layer.release_count == 0 and int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.tensor([0.5, -1.0, 2.0]))


def test_empty_batch_without_public_size_leaves_buffers_untouched():
    layer = safenorm.DPBatchNorm2d(3)
    y = layer(torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
    assert int(layer.num_batches_tracked) == 0 and layer.release_count == 0


def test_infinite_bounds_disable_clipping():
    u = torch.randn(4, 3) * 1e3
    assert torch.equal(SF.clip_rows(u, math.inf), u)
    clipped = SF.clip_rows(u, 2.0)
    torch.testing.assert_close(torch.linalg.vector_norm(clipped, dim=1), torch.full((4,), 2.0))


def test_clip_rows_matches_a_per_row_loop():
    """Rows within the bound stay exactly as they are (zero rows too); longer ones get norm R."""
    u = torch.cat([torch.randn(6, 5) * 3, torch.zeros(1, 5), torch.full((1, 5), 0.4)])
    bound = 2.0
    expected = []
    for row in u:
        norm = float(torch.linalg.vector_norm(row))
        expected.append(row * (bound / norm) if norm > bound else row)
    clipped = SF.clip_rows(u, bound)
    torch.testing.assert_close(clipped, torch.stack(expected))
    inside = torch.linalg.vector_norm(u, dim=1) <= bound
    assert inside.any() and torch.equal(clipped[inside], u[inside])


def test_every_releasing_forward_is_counted_and_eval_with_running_stats_releases_nothing():
    calls = []
    layer = safenorm.DPBatchNorm2d(3, expected_batch_size=4)
    layer.register_release_hook(lambda module, n: calls.append((module, n)))
    x = torch.randn(4, 3, 2, 2)
    layer(x), layer(x)  # two forwards in one step cost twice
    assert layer.release_count == 4 and [n for _, n in calls] == [2, 2]
    layer.eval()(x)
    assert layer.release_count == 4
    no_buffers = safenorm.DPBatchNorm2d(3, expected_batch_size=4, track_running_stats=False)
    no_buffers.eval()(x)  # eval with batch statistics is a release too
    assert no_buffers.release_count == 2
