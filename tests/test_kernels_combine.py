"""The stage-2 combine kernels against :mod:`safenorm.functional`, the reviewed reference.

Both sides get the same per-sample moments and the same noise (the reference draws it through
``safenorm.functional.gaussian_noise``, replaced here by the kernel's draw), so the release, the
running statistics, the coefficients and the gradients must agree to float32 rounding (1e-6
relative) across ghost groups (consecutive and random), empty and one-sample batches, variance
floors, clip references, fp16/bf16 inputs and both memory formats. Runs under the Triton
interpreter on CPU (``TRITON_INTERPRET=1``, set by conftest); triton 3.6's interpreter needs
numpy < 2.3 (it converts one-element arrays to Python scalars), 3.9's does not.
"""

from __future__ import annotations

import math

import pytest
import torch

from safenorm import functional as SF

triton = pytest.importorskip("triton")

from safenorm.kernels import combine as K  # noqa: E402
from safenorm.kernels.moments import moments_partials  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-6

pytestmark = pytest.mark.interpret


def _close(actual, expected, name):
    # 1e-6 relative, against the largest value of the tensor for entries near zero.
    scale = expected.abs().max().clamp_min(1e-30).item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{name}: {m}"
    )


def _moments(n, c, spatial, dtype=torch.float32, seed=0, outlier=True):
    """Per-sample moments of data with a far-off mean and, optionally, one outlier sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, spatial, generator=g) * 2 + 3
    if outlier and n > 1:
        x[1] *= 40
    return SF.per_sample_moments(x.to(DEVICE, dtype))


def _groups(kind, n, denominator, generator):
    if kind == "random":
        return SF.dp_groups(n, denominator, max(1, round(denominator / 3)), DEVICE, generator)
    if kind == "dp-one":
        return SF.dp_groups(n, denominator, None, DEVICE, generator)
    size = {"one": None, "ghost 2": 2, "ghost 3": 3}[kind]
    return SF.consecutive_groups(n, size, torch.device(DEVICE))


def _reference(m, w, groups, noise, monkeypatch, **kwargs):
    draws = iter([noise[0], noise[1]])
    monkeypatch.setattr(SF, "gaussian_noise", lambda shape, **_: next(draws))
    return SF.private_statistics(m, w, groups, **kwargs)


CASES = [
    # n, c, groups, clip_norm, var_clip_norm, sigma, var_floor, with_reference
    (7, 5, "one", 1.0, 2.0, 0.0, 0.0, False),
    (7, 5, "ghost 3", 0.5, 1.0, 0.0, 0.0, True),
    (8, 3, "ghost 2", math.inf, math.inf, 0.0, 0.0, False),
    (9, 130, "one", 3.0, 5.0, 0.0, 0.1, True),  # channels in two tiles
    (9, 6, "dp-one", 1.0, 1.0, 2.0, 0.25, True),
    (9, 6, "random", 1.0, 2.0, 1.5, 0.25, True),
    (1, 4, "dp-one", 1.0, 1.0, 1.0, 0.25, True),  # one sample
    (0, 4, "dp-one", 1.0, 1.0, 1.0, 0.25, True),  # empty batch: a noise-only release
    (0, 4, "random", 1.0, 1.0, 1.0, 0.0, False),
    (20, 4, "random", 0.1, 0.1, 0.5, 0.0, True),  # everything clipped, samples in two tiles
]


@pytest.mark.parametrize("n, c, kind, r1, r2, sigma, floor, with_reference", CASES)
@pytest.mark.parametrize("coef_mode", [K.COEF_GROUPS, K.COEF_SAMPLES, K.COEF_RUNNING])
def test_forward_matches_functional(
    monkeypatch, n, c, kind, r1, r2, sigma, floor, with_reference, coef_mode
):
    spatial = 6
    m, w = _moments(n, c, spatial)
    generator = torch.Generator(DEVICE).manual_seed(3)
    denominator = float(max(n, 1)) if kind not in ("dp-one", "random") else 8.0
    groups = _groups(kind, n, denominator, generator)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(2, groups.count, c, generator=g).to(DEVICE)
    center = torch.randn(c, generator=g).to(DEVICE) if with_reference else None
    scale = (torch.rand(c, generator=g) + 0.5).to(DEVICE) if with_reference else None
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(c, generator=g).to(DEVICE)
    running = torch.randn(c, generator=g).to(DEVICE), (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    ref = _reference(
        m,
        w,
        groups,
        noise,
        monkeypatch,
        clip_norm=r1,
        var_clip_norm=r2,
        noise_multiplier=sigma,
        reference=SF.ClipReference(center=center, scale=scale),
        var_floor=floor,
    )
    rm, rv = running[0].clone(), running[1].clone()
    SF.pooled_running_update(rm, rv, ref.mean, ref.var, groups.size, spatial, 0.1)
    km, kv = running[0].clone(), running[1].clone()
    out = K.combine_forward(
        (m, w),
        spatial,
        groups.size,
        index=groups.index if kind == "random" else None,
        group_size=0 if kind in ("one", "dp-one") else int(kind[-1]) if "ghost" in kind else 0,
        center=center,
        scale=scale,
        clip_norm=r1,
        var_clip_norm=r2,
        noise=noise,
        noise_multiplier=sigma,
        var_floor=floor,
        weight=weight,
        bias=bias,
        eps=1e-5,
        running_mean=km,
        running_var=kv,
        momentum=0.1,
        coef_mode=coef_mode,
    )
    _close(out.mean, ref.mean, "mean")
    _close(out.var, ref.var, "var")
    _close(km, rm, "running_mean")
    _close(kv, rv, "running_var")
    assert out.finite.item() == 1
    if coef_mode == K.COEF_RUNNING:
        norm_mean, norm_var = rm[None], rv[None]
    elif coef_mode == K.COEF_SAMPLES:
        norm_mean, norm_var = groups.per_sample(ref.mean), groups.per_sample(ref.var)
    else:
        norm_mean, norm_var = ref.mean, ref.var
    rstd = torch.rsqrt(norm_var + 1e-5)
    _close(out.norm_mean, norm_mean, "norm_mean")
    _close(out.norm_var, norm_var, "norm_var")
    _close(out.rstd, rstd, "rstd")
    _close(out.gain, rstd * weight, "gain")
    _close(out.shift, bias - norm_mean * rstd * weight, "shift")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_from_stage_one_partials(monkeypatch, dtype, channels_last):
    """Moments combined from the stage-1 partials of fp16/bf16 input in either memory format;
    the reference gets the same moments (the kernel returns them)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 5, 3, 4, generator=g) * 2 + 1).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        x = x.float()  # the interpreter's bf16 arithmetic is broken (DESIGN.md §6)
    partials = moments_partials(x, num_splits=2)
    groups = SF.consecutive_groups(6, 4, torch.device(DEVICE))
    out = K.combine_forward(partials, 12, groups.size, group_size=4, clip_norm=1.0,
                            var_clip_norm=2.0)  # fmt: skip
    m_ref, w_ref = SF.per_sample_moments(x)
    torch.testing.assert_close(out.m, m_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.w, w_ref, atol=1e-4, rtol=1e-4)
    ref = SF.private_statistics(out.m, out.w, groups, clip_norm=1.0, var_clip_norm=2.0)
    _close(out.mean, ref.mean, "mean")
    _close(out.var, ref.var, "var")


def test_non_finite_statistics_leave_the_buffers_and_set_the_flag():
    m, w = _moments(4, 3, 5, outlier=False)
    m[2, 1] = float("nan")  # unclipped: the NaN reaches the statistics
    groups = SF.consecutive_groups(4, None, torch.device(DEVICE))
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    batches = torch.tensor(5, device=DEVICE)
    out = K.combine_forward((m, w), 5, groups.size, running_mean=rm, running_var=rv,
                            num_batches_tracked=batches)  # fmt: skip
    assert out.finite.item() == 0
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))
    assert torch.equal(rv, torch.ones(3, device=DEVICE))
    assert batches.item() == 4  # the forward's increment undone
    # Clipped: the non-finite sample contributes zero, the statistics stay finite.
    clip = dict(clip_norm=1.0, var_clip_norm=1.0)
    out = K.combine_forward((m, w), 5, groups.size, running_mean=rm, running_var=rv,
                            num_batches_tracked=batches, **clip)  # fmt: skip
    ref = SF.private_statistics(m, w, groups, clip_norm=1.0, var_clip_norm=1.0)
    assert out.finite.item() == 1 and batches.item() == 4
    _close(out.mean, ref.mean, "mean")
    _close(out.var, ref.var, "var")


def test_huge_rows_clip_without_overflow():
    """Rows whose squared norm overflows fp32 still clip to norm R (as ``clip_rows``)."""
    m = torch.full((3, 4), 3e20, device=DEVICE)
    m[0] = 1.0
    w = torch.zeros_like(m)
    groups = SF.consecutive_groups(3, None, torch.device(DEVICE))
    out = K.combine_forward((m, w), 1, groups.size, clip_norm=2.0, var_clip_norm=2.0)
    ref = SF.private_statistics(m, w, groups, clip_norm=2.0, var_clip_norm=2.0)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.var).all()
    _close(out.mean, ref.mean, "mean")
    _close(out.var, ref.var, "var")


BACKWARD_CASES = [
    # n, c, ghost, clip_norm, var_clip_norm, var_floor, with_reference
    (7, 5, 0, 1.0, 2.0, 0.0, False),
    (7, 5, 3, 0.5, 1.0, 0.0, True),
    (8, 3, 2, math.inf, math.inf, 0.0, False),
    (9, 130, 0, 3.0, 5.0, 0.0, True),
    (20, 4, 0, 0.1, 0.1, 0.0, True),
    (6, 4, 4, 0.5, 0.05, 0.4, True),  # the floor holds some groups' variance
    (2, 3, 0, 1.0, 1.0, 0.0, False),
]


@pytest.mark.parametrize("n, c, ghost, r1, r2, floor, with_reference", BACKWARD_CASES)
def test_backward_matches_autograd_through_functional(n, c, ghost, r1, r2, floor, with_reference):
    spatial = 6
    m, w = _moments(n, c, spatial, seed=n)
    g = torch.Generator().manual_seed(5)
    center = torch.randn(c, generator=g).to(DEVICE) if with_reference else None
    scale = (torch.rand(c, generator=g) + 0.5).to(DEVICE) if with_reference else None
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    groups = SF.consecutive_groups(n, ghost or None, torch.device(DEVICE))
    kwargs = dict(clip_norm=r1, var_clip_norm=r2, var_floor=floor)
    reference = SF.ClipReference(center=center, scale=scale)
    out = K.combine_forward((m, w), spatial, groups.size, group_size=ghost, center=center,
                            scale=scale, weight=weight, **kwargs)  # fmt: skip
    sdyx = torch.randn(n, c, 2, generator=g).to(DEVICE)
    sdy = torch.randn(n, c, 2, generator=g).to(DEVICE)
    coef, offset, dweight, dbias = K.combine_backward(
        sdyx, sdy, out, spatial, groups.size, group_size=ghost, center=center, scale=scale,
        **kwargs,
    )  # fmt: skip
    # Reference: autograd through functional, with the normalization's cotangents.
    leaves = m.clone().requires_grad_(), w.clone().requires_grad_()
    ref = SF.private_statistics(*leaves, groups, reference=reference, **kwargs)
    mean_i, var_i = groups.per_sample(ref.mean), groups.per_sample(ref.var)
    rstd = torch.rsqrt(var_i + 1e-5)
    gain = rstd * weight
    d_mean = -(gain * sdy.sum(2))
    d_var = -0.5 * gain * rstd * sdyx.sum(2)
    dm, dw = torch.autograd.grad((mean_i, var_i), leaves, (d_mean.detach(), d_var.detach()))
    _close(offset * spatial, dm, "dm")
    _close(coef * spatial / 2, dw, "dw")
    _close(dweight, sdyx.sum((0, 2)), "dweight")
    _close(dbias, sdy.sum((0, 2)), "dbias")


@pytest.mark.parametrize("coef_mode", [K.COEF_GROUPS, K.COEF_RUNNING])
def test_reference_read_from_the_running_buffers(monkeypatch, coef_mode):
    """``reference_eps``: the kernel clips in units of the running statistics as they were
    before its own update (``ClipReference.from_running``) and returns that snapshot."""
    n, c, spatial = 9, 6, 4
    m, w = _moments(n, c, spatial)
    g = torch.Generator().manual_seed(8)
    rm = torch.randn(c, generator=g).to(DEVICE)
    rv = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    groups = SF.dp_groups(n, 8.0, None, DEVICE)
    noise = torch.randn(2, 1, c, generator=g).to(DEVICE)
    bounds = dict(clip_norm=1.0, var_clip_norm=1.5, noise_multiplier=2.0, var_floor=0.25)
    reference = SF.ClipReference.from_running(rm, rv, 1e-3)
    ref = _reference(m, w, groups, noise, monkeypatch, reference=reference, **bounds)
    expected_mean, expected_var = rm.clone(), rv.clone()
    SF.pooled_running_update(expected_mean, expected_var, ref.mean, ref.var, groups.size,
                             spatial, 0.1)  # fmt: skip
    out = K.combine_forward((m, w), spatial, groups.size, noise=noise, running_mean=rm,
                            running_var=rv, momentum=0.1, coef_mode=coef_mode,
                            reference_eps=1e-3, **bounds)  # fmt: skip
    _close(out.reference[0], reference.center, "center")
    _close(out.reference[1], reference.scale, "scale")
    _close(out.mean, ref.mean, "mean")
    _close(out.var, ref.var, "var")
    _close(rm, expected_mean, "running_mean")
    _close(rv, expected_var, "running_var")
    with pytest.raises(ValueError, match="running buffers"):
        K.combine_forward((m, w), spatial, groups.size, reference_eps=1e-3)


def _weight_floors(r1, r2, c):
    return SF.weight_floor(r1, c), SF.weight_floor(r2, c)


@pytest.mark.parametrize("n, c, ghost, r1, r2, floor, with_reference", BACKWARD_CASES)
def test_self_normalized_clipped_statistics_match_functional(
    n, c, ghost, r1, r2, floor, with_reference
):
    """The clipped layer's statistics (each clipped sum divided by ``max(sum f_i, rho D)``),
    forward and backward, against :func:`safenorm.functional.clipped_statistics`."""
    del floor  # the clipped layer has none
    spatial = 6
    floors = _weight_floors(r1, r2, c)
    m, w = _moments(n, c, spatial, seed=n + 1)
    g = torch.Generator().manual_seed(6)
    center = torch.randn(c, generator=g).to(DEVICE) if with_reference else None
    scale = (torch.rand(c, generator=g) + 0.5).to(DEVICE) if with_reference else None
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    groups = SF.consecutive_groups(n, ghost or None, torch.device(DEVICE))
    bounds = dict(clip_norm=r1, var_clip_norm=r2)
    reference = SF.ClipReference(center=center, scale=scale)
    leaves = m.clone().requires_grad_(), w.clone().requires_grad_()
    ref = SF.clipped_statistics(*leaves, groups, reference=reference, **bounds)
    out = K.combine_forward((m, w), spatial, groups.size, group_size=ghost, center=center,
                            scale=scale, weight=weight, weight_floors=floors, **bounds)  # fmt: skip
    _close(out.mean, ref.mean.detach(), "mean")
    _close(out.var, ref.var.detach(), "var")
    sdyx = torch.randn(n, c, 1, generator=g).to(DEVICE)
    sdy = torch.randn(n, c, 1, generator=g).to(DEVICE)
    coef, offset, _, _ = K.combine_backward(
        sdyx, sdy, out, spatial, groups.size, group_size=ghost, center=center, scale=scale,
        weight_floors=floors, **bounds,
    )  # fmt: skip
    mean_i, var_i = groups.per_sample(ref.mean), groups.per_sample(ref.var)
    rstd = torch.rsqrt(var_i + 1e-5)
    gain = rstd * weight
    cotangents = (-(gain * sdy.sum(2))).detach(), (-0.5 * gain * rstd * sdyx.sum(2)).detach()
    dm, dw = torch.autograd.grad((mean_i, var_i), leaves, cotangents)
    _close(offset * spatial, dm, "dm")
    _close(coef * spatial / 2, dw, "dw")


def test_self_normalized_statistics_are_exact_when_every_sample_is_clipped_alike():
    """Copies of one sample exceed the bounds by one factor (less than ``1 / rho``): the weights
    cancel and the statistics are exactly the data's (what the self-normalization is for)."""
    bounds = dict(clip_norm=2.0, var_clip_norm=0.4)  # ||m_i|| = 3.74, ||w_i|| = 0.87
    floors = _weight_floors(2.0, 0.4, 3)
    m = torch.tensor([[1.0, 2.0, 3.0]], device=DEVICE).expand(4, 3).contiguous()
    w = torch.full((4, 3), 0.5, device=DEVICE)
    groups = SF.consecutive_groups(4, None, torch.device(DEVICE))
    out = K.combine_forward((m, w), 5, groups.size, weight_floors=floors, **bounds)
    ref = SF.clipped_statistics(m, w, groups, **bounds)
    _close(out.mean, ref.mean, "mean")
    _close(out.var, ref.var, "var")
    torch.testing.assert_close(out.mean[0], m[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.var[0], w[0], rtol=1e-6, atol=1e-6)
