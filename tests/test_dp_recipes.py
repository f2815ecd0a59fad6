"""DPBatchNorm's from-scratch options: the log-scale variance release and the per-sample
projected backward (docs/PRIVACY.md, "The log variance release"; evaluation/utility.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import safenorm
from safenorm import functional as SF


def _reference(c: int, seed: int = 0) -> SF.ClipReference:
    g = torch.Generator().manual_seed(seed)
    return SF.ClipReference(
        center=torch.randn(c, generator=g, dtype=torch.float64),
        scale=torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
    )


def test_log_release_is_the_geometric_mean_of_clamped_ratios_by_a_per_sample_loop():
    torch.manual_seed(0)
    c, r2, d = 4, 1.2, 9.0
    x = (
        torch.randn(7, c, 3, 3, dtype=torch.float64)
        * torch.tensor([0.2, 1.0, 3.0, 30.0]).view(1, c, 1, 1).double()
    )
    reference = _reference(c)
    stats = SF.dp_statistics(
        x, clip_norm=2.0, var_clip_norm=r2, noise_multiplier=0.0, denominator=d,
        reference=reference, var_release="log",
    )  # fmt: skip
    mu = stats.mean[0]
    bound = r2 / math.sqrt(c)
    expected = torch.empty(c, dtype=torch.float64)
    for ch in range(c):
        total = 0.0
        for sample in x:
            second_moment = float(((sample[ch] - mu[ch]) ** 2).mean())
            ratio = second_moment / float(reference.scale[ch]) ** 2
            total += min(max(math.log(ratio), -bound), bound)
        expected[ch] = float(reference.scale[ch]) ** 2 * math.exp(total / d)
    assert torch.allclose(stats.var[0], expected, rtol=1e-12)
    # The mean release is the linear one, unchanged.
    linear = SF.dp_statistics(
        x, clip_norm=2.0, var_clip_norm=r2, noise_multiplier=0.0, denominator=d,
        reference=reference,
    )  # fmt: skip
    assert torch.equal(linear.mean, stats.mean)


@pytest.mark.parametrize("value", [0.0, 1e-300, 1e300, math.inf, -math.inf, math.nan])
def test_log_contribution_of_any_sample_has_norm_at_most_r2(value):
    c, r2 = 6, 0.9
    honest = torch.rand(1, c, dtype=torch.float64) + 0.5
    adversary = honest.clone()
    adversary[0, ::2] = value
    for row in (honest, adversary):
        contribution = SF.log_ratio_contributions(row, r2)
        assert torch.isfinite(contribution).all()
        assert float(torch.linalg.vector_norm(contribution)) <= r2 * (1 + 1e-12)
    # Every entry is within r2 / sqrt(C): an extreme ratio sits at the bound.
    extreme = SF.log_ratio_contributions(torch.full((1, c), 1e300, dtype=torch.float64), r2)
    assert float(torch.linalg.vector_norm(extreme)) == pytest.approx(r2, rel=1e-12)


def test_log_release_of_a_huge_finite_sample_stays_finite():
    x = torch.randn(8, 3, 2, 2)
    x_adv = torch.cat([x, torch.full((1, 3, 2, 2), 3e38)])
    layer = safenorm.DPBatchNorm2d(3, var_release="log", expected_batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(x_adv)
    assert torch.isfinite(layer.running_var).all() and torch.isfinite(out[:-1]).all()


def _train_forwards(layer: torch.nn.Module, x: torch.Tensor, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            layer(x)


def test_log_release_follows_activations_that_the_linear_release_cannot():
    # Activations with 100x the running variance: the linear release, bounded by about
    # R2 / sqrt(C) = 1 running-variance unit per channel, stays put; the log release grows by
    # up to exp(R2 / sqrt(C)) per release and reaches the activations' variance.
    torch.manual_seed(0)
    x = torch.randn(64, 4, 6, 6) * 10.0
    options = {"noise_multiplier": 0.0, "expected_batch_size": 64}
    linear = safenorm.DPBatchNorm2d(4, **options)
    log = safenorm.DPBatchNorm2d(4, var_release="log", **options)
    _train_forwards(linear, x, 150)
    _train_forwards(log, x, 150)
    true_var = x.var(dim=(0, 2, 3))
    assert (linear.running_var < 1.2).all()
    # The geometric mean of 36-value per-sample variances is a little below the variance.
    ratio = log.running_var / true_var
    assert ((ratio > 0.85) & (ratio < 1.05)).all(), ratio


def test_log_release_noise_factor_is_mean_one():
    torch.manual_seed(1)
    x = torch.randn(32, 2, 4, 4) * 2.0
    # A negligible mean bound: its noise would move mu~, hence every ratio (to second order).
    common = {
        "clip_norm": 1e-6, "var_clip_norm": 1.0, "denominator": 32.0, "var_release": "log",
        "reference": SF.ClipReference(center=torch.zeros(2), scale=torch.full((2,), 2.0)),
    }  # fmt: skip
    exact = SF.dp_statistics(x, noise_multiplier=0.0, **common).var[0]
    sigma = 10.0  # tau = sigma R2 / D = 0.31: a factor exp(0.05) without the correction
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([
        SF.dp_statistics(x, noise_multiplier=sigma, generator=g, **common).var[0]
        for _ in range(4000)
    ])  # fmt: skip
    assert torch.allclose(draws.mean(0), exact, rtol=0.03)
    tau = sigma * 1.0 / 32.0
    assert float((draws.log() - exact.log()).std()) == pytest.approx(tau, rel=0.1)


@pytest.mark.parametrize("option", [{"var_release": "log"}, {"project_gradient": True}])
def test_options_needing_space_name_the_layer_on_flat_input(option):
    layer = safenorm.DPBatchNorm1d(5, expected_batch_size=8, **option)
    with pytest.raises(ValueError, match=r"DPBatchNorm1d.*needs input with spatial dimensions"):
        layer(torch.randn(8, 5))
    layer.eval()(torch.randn(8, 5))  # eval mode releases and projects nothing: fine
    with pytest.raises(ValueError, match="var_release must be one of"):
        safenorm.DPBatchNorm2d(5, var_release="sqrt")


# ----------------------------------------------------------------------------- projection


def _projected(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    (SF.project_gradient_per_sample(x) * g).sum().backward()
    return x.grad


def test_projected_gradient_is_instance_norms_backward_times_the_sample_std():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64) * 3 + 1
    g = torch.randn_like(x)
    # Independent reference: autograd through InstanceNorm, y = (x - m_i) / s_i, whose input
    # gradient is the projection of g divided by the per-sample std s_i.
    xr = x.clone().requires_grad_()
    (F.instance_norm(xr, eps=0.0) * g).sum().backward()
    std = x.var(dim=(2, 3), unbiased=False, keepdim=True).sqrt()
    assert torch.allclose(_projected(x, g), std * xr.grad, atol=1e-10)


def test_projection_removes_exactly_the_span_and_keeps_the_rest():
    torch.manual_seed(1)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    p = _projected(x, g)
    centred = x - x.mean(2, keepdim=True)
    assert torch.allclose(p.sum(2), torch.zeros(4, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((p * centred).sum(2), torch.zeros(4, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(_projected(x, p), p, atol=1e-12)  # idempotent: a projection
    # A constant sample channel has no direction to remove beyond the mean.
    flat = torch.ones(1, 1, 5, dtype=torch.float64)
    gf = torch.randn_like(flat)
    assert torch.allclose(_projected(flat, gf), gf - gf.mean(), atol=1e-12)


def test_projection_is_finite_for_huge_finite_inputs_and_keeps_the_dtype():
    x = torch.randn(3, 2, 4, 4)
    x[0, 0, 0, 0] = 3e38
    assert torch.isfinite(_projected(x, torch.randn_like(x))).all()
    for dtype in (torch.float16, torch.bfloat16):
        xh = torch.randn(3, 2, 4, 4).to(dtype)
        gh = torch.randn(3, 2, 4, 4).to(dtype)
        got = _projected(xh, gh)
        assert got.dtype == dtype
        want = _projected(xh.float(), gh.float())
        assert torch.allclose(got.float(), want, atol=0.05, rtol=0.05)


def test_projected_layer_keeps_each_samples_gradient_its_own():
    layer = safenorm.DPBatchNorm2d(3, project_gradient=True, expected_batch_size=6)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(x)
    (grad,) = torch.autograd.grad((out[0] * torch.randn_like(out[0])).sum(), x)
    assert torch.all(grad[1:] == 0) and grad[0].abs().sum() > 0
    # The forward is the layer's without projection.
    twin = safenorm.DPBatchNorm2d(3, expected_batch_size=6, noise_multiplier=0.0)
    plain = safenorm.DPBatchNorm2d(3, project_gradient=True, expected_batch_size=6,
                                   noise_multiplier=0.0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(twin(x), plain(x))


def test_opacus_checker_accepts_per_sample_gradients_through_a_projected_layer(monkeypatch):
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleHooks
    from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

    import safenorm.opacus  # registers the DP layers' grad samplers

    # Opacus' checker validates strictly, rejecting any layer with buffers; the engine replaces
    # that check by validate_model (the DP layer's buffers are released or public values).
    monkeypatch.setattr(GradSampleHooks, "validate", classmethod(lambda cls, module, strict: []))
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    layer = safenorm.DPBatchNorm2d.from_batchnorm(bn, frozen_statistics=True,
                                                  project_gradient=True)  # fmt: skip
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), layer, torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    )  # fmt: skip
    x = torch.randn(6, 2, 5, 5)
    assert check_per_sample_gradients_are_correct(x, model, grad_sample_mode="hooks")
    # The conv's gradient is the projected one, not the plain chain rule through eval-mode BN.
    projected = torch.autograd.grad(model(x[:1]).square().sum(), model[0].weight)[0]
    plain = torch.nn.Sequential(model[0], bn.eval(), *list(model)[2:])
    chain_rule = torch.autograd.grad(plain(x[:1]).square().sum(), model[0].weight)[0]
    assert not torch.allclose(projected, chain_rule, atol=1e-4)


@pytest.mark.parametrize("option", [{"var_release": "log"}, {"project_gradient": True}])
def test_options_compile_to_one_graph_that_matches_eager(option):
    torch.manual_seed(0)
    common = {"expected_batch_size": 8, "noise_multiplier": 0.0, **option}
    compiled_layer, eager_layer = (
        safenorm.DPBatchNorm2d(4, **common),
        safenorm.DPBatchNorm2d(4, **common),
    )
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torch.compile(compiled_layer, fullgraph=True)(x)
        want = eager_layer(x)
    g = torch.randn_like(y)
    (got_grad,) = torch.autograd.grad((y * g).sum(), x)
    (want_grad,) = torch.autograd.grad((want * g).sum(), x)
    assert torch.allclose(y, want, atol=1e-5) and torch.allclose(got_grad, want_grad, atol=1e-5)
    assert torch.allclose(compiled_layer.running_var, eager_layer.running_var)


def test_log_release_keeps_the_running_statistics_when_they_would_overflow(monkeypatch):
    # On the kernels the linear release's check is folded into the combine kernel; the log
    # release runs on the reference primitives, so the layer must not take that route (it would
    # leave inf in the buffers). Simulated on CPU by claiming the kernels would check.
    from safenorm import ops

    monkeypatch.setattr(ops, "checks_in_kernel", lambda x: True)
    layer = safenorm.DPBatchNorm2d(2, var_release="log", expected_batch_size=16,
                                   noise_multiplier=0.0)  # fmt: skip
    layer.running_var.fill_(3e38)  # public; second moments ~1e39 give ratios above e^b
    before = [b.clone() for b in (layer.running_mean, layer.running_var)]
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="left unchanged"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(torch.randn(16, 2, 4, 4) * 3e19)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == 0 and layer.release_count == 2  # still counted


def test_log_release_warns_when_its_noise_factor_is_heavy_tailed():
    x = torch.randn(64, 4, 3, 3)
    quiet = safenorm.DPBatchNorm2d(
        4, var_release="log", expected_batch_size=64, noise_multiplier=4.0, var_clip_norm=2.0
    )  # tau = 0.125
    heavy = safenorm.DPBatchNorm2d(
        4, var_release="log", expected_batch_size=64, noise_multiplier=8.0, ghost_batch_size=4
    )  # tau = 8 * 2 / 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet(x), heavy(x), heavy(x)
    messages = [str(w.message) for w in caught if "heavy-tailed" in str(w.message)]
    assert len(messages) == 1 and "tau = sigma * var_clip_norm / (D / groups) = 4" in messages[0]


def test_projection_of_huge_same_sign_values_is_finite():
    x = torch.full((2, 2, 4, 4), 3e38)
    x[0, 0, 0, 0] = 1e38
    got = _projected(x, torch.randn_like(x))
    assert torch.isfinite(got).all()
    assert torch.allclose(got.sum((2, 3)), torch.zeros(2, 2), atol=1e-4)


def test_flat_input_refusal_spares_frozen_statistics_and_keeps_the_rank_error_first():
    frozen = safenorm.DPBatchNorm1d(5, var_release="log", frozen_statistics=True)
    frozen(torch.randn(8, 5))  # nothing is released: the log release is not used
    layer = safenorm.DPBatchNorm2d(5, project_gradient=True, expected_batch_size=8)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(8, 5))


def _released_model(seed: int, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [
        safenorm.DPBatchNorm2d(4, expected_batch_size=8,
                               generator=torch.Generator().manual_seed(seed + k), **options)
        for k in range(2)
    ]  # fmt: skip
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), layers[0], torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), layers[1], torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    )  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {"project_gradient": True, "var_release": "log"},
        {"project_gradient": True, "ghost_batch_size": 4, "normalize_with": "batch"},
    ],
)
def test_opacus_per_sample_gradients_with_released_statistics_and_projection_match_a_loop(options):
    pytest.importorskip("opacus")
    from opacus import GradSampleModule

    from safenorm.opacus.grad_samplers import record_statistics

    private, reference = _released_model(1, **options), _released_model(1, **options)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(private, strict=False, loss_reduction="sum")
        record_statistics(private)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        # Same generators, same releases: each sample's loss from one forward of the twin.
        out = reference(x)
    assert torch.equal(private[1].last_statistics[1], reference[1].last_statistics[1])
    for i in range(8):
        loss = F.cross_entropy(out[i : i + 1], y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(reference.parameters()), retain_graph=True)
        for p, g in zip(private.parameters(), grads, strict=True):
            assert torch.allclose(p.grad_sample[i], g, atol=1e-5)


def test_compiled_log_release_in_secure_mode_draws_fresh_noise():
    layer = safenorm.DPBatchNorm2d(3, var_release="log", secure_mode=True, expected_batch_size=8)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(8, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x)
        first = layer.last_statistics[1].clone()
        compiled(x)
    assert torch.isfinite(first).all() and not torch.equal(first, layer.last_statistics[1])
