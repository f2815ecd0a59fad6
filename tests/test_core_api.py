"""Drop-in compatibility with nn.BatchNorm*d: constructor calls, state_dicts, eval behaviour,
errors that name the layer, and the edge cases users hit."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import safenorm

FAMILIES = ["GhostBatchNorm", "ClippedBatchNorm", "DPBatchNorm"]
RANKS = {"1d": (nn.BatchNorm1d, (4, 3, 5)), "2d": (nn.BatchNorm2d, (4, 3, 5, 2)),
         "3d": (nn.BatchNorm3d, (4, 3, 2, 3, 2))}  # fmt: skip
ALL_CLASSES = [getattr(safenorm, f"{fam}{rank}") for fam in FAMILIES for rank in RANKS]

# Constructor calls that build nn.BatchNorm*d (after PyTorch's own module test inputs).
BATCHNORM_CALLS = [
    ((3,), {}),
    ((3, 1e-3, 0.3), {}),
    ((3, 1e-3, None), {}),
    ((3,), {"affine": False}),
    ((3, 1e-3, 0.3, False), {}),
    ((3, 1e-3, 0.3, True, False), {}),
    ((3,), {"track_running_stats": False, "momentum": None}),
    ((3,), {"bias": False}),
    ((3,), {"device": "cpu", "dtype": torch.float64}),
    ((3, 1e-5, 0.1, True, True, "cpu", torch.float64), {"bias": True}),
]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_signature_starts_with_batchnorms(cls):
    ref = list(inspect.signature(nn.BatchNorm2d.__init__).parameters.values())
    ours = list(inspect.signature(cls.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(ref)]] == [
        (p.name, p.kind, p.default) for p in ref
    ]
    extra = ours[len(ref) :]
    assert extra and all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra)


@pytest.mark.parametrize(("args", "kwargs"), BATCHNORM_CALLS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rank", list(RANKS))
def test_every_batchnorm_call_builds_each_variant(family, rank, args, kwargs):
    ref_cls, _ = RANKS[rank]
    ref = ref_cls(*args, **kwargs)
    layer = getattr(safenorm, f"{family}{rank}")(*args, **kwargs)
    assert list(layer.state_dict()) == list(ref.state_dict())
    for name, tensor in ref.state_dict().items():
        assert layer.state_dict()[name].dtype == tensor.dtype
        assert torch.equal(layer.state_dict()[name], tensor)
    assert layer.extra_repr().startswith(ref.extra_repr())


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_state_dict_round_trip_and_exact_eval(cls):
    rank = cls.__name__[-2:]
    ref_cls, shape = RANKS[rank]
    ref = ref_cls(3)
    ref.train()
    for _ in range(3):
        ref(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    layer = cls(3)
    layer.load_state_dict(ref.state_dict())
    back = ref_cls(3)
    back.load_state_dict(layer.state_dict())
    ref.eval(), layer.eval(), back.eval()
    x = torch.randn(shape)
    assert torch.equal(layer(x), ref(x))
    assert torch.equal(back(x), ref(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_an_old_state_dict_without_num_batches_tracked(family):
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    layer = getattr(safenorm, f"{family}2d")(3)
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_without_running_stats_eval_uses_batch_statistics_like_batchnorm(family):
    kwargs = {"GhostBatchNorm": {"ghost_batch_size": 64},
              "ClippedBatchNorm": {"clip_norm": math.inf, "var_clip_norm": math.inf},
              "DPBatchNorm": {"noise_multiplier": 0.0, "clip_norm": math.inf,
                              "var_clip_norm": math.inf, "expected_batch_size": 6,
                              "var_floor": 0.0}}[family]  # fmt: skip
    layer = getattr(safenorm, f"{family}2d")(3, track_running_stats=False, **kwargs).eval()
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()


def test_extra_repr_shows_privacy_parameters():
    text = repr(safenorm.DPBatchNorm2d(4, noise_multiplier=2.5, expected_batch_size=64))
    assert "noise_multiplier=2.5" in text and "expected_batch_size=64" in text
    assert "clip_norm=2.0" in text  # default sqrt(4) in reference units
    assert "ghost_batch_size=7" in repr(safenorm.GhostBatchNorm1d(4, ghost_batch_size=7))
    assert "var_clip_norm=3.0" in repr(safenorm.ClippedBatchNorm3d(4, var_clip_norm=3.0))


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_wrong_channel_count_and_rank_raise_value_errors_naming_the_layer(cls):
    layer = cls(3)
    rank = cls.__name__[-2:]
    shape = list(RANKS[rank][1])
    shape[1] = 5
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*5 channels.*num_features=5"):
        layer(torch.randn(shape))
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected .* input \(got 6D input\)"):
        layer(torch.randn(2, 3, 2, 2, 2, 2))


def test_converted_layer_errors_carry_the_model_path():
    model = safenorm.convert_batchnorm(nn.Sequential(nn.Sequential(nn.BatchNorm2d(3))), "ghost")
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d '0\.0'"):
        model(torch.randn(2, 4, 3, 3))


def test_non_finite_input_raises_and_keeps_the_buffers():
    family = "GhostBatchNorm"  # clipped and DP layers give a non-finite sample zero weight
    layer = getattr(safenorm, f"{family}2d")(3, **_public(family))
    layer(torch.randn(4, 3, 2, 2))
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{family}2d: batch statistics are NaN"):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("family", ["GhostBatchNorm", "ClippedBatchNorm"])
def test_deferred_finite_check_restores_now_and_raises_at_the_next_forward(family, monkeypatch):
    """The CUDA guard (forced here on CPU): no host sync, buffers kept, error one forward late."""
    monkeypatch.setattr(safenorm.SafeBatchNormBase, "_defers_check", lambda self, x: True)
    layer = getattr(safenorm, f"{family}2d")(3, **_unclipped(family))
    layer(torch.randn(4, 3, 2, 2))
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 0] = float("nan")
    layer(x)  # no error yet: raising would need the host to wait for the device
    for key, value in layer.state_dict().items():
        assert torch.equal(value, saved[key]), key
    clone = copy.deepcopy(layer)  # a check in flight is not copied
    message = f"{family}2d: batch statistics of the previous training forward"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, 3, 2, 2))
    clone(torch.randn(4, 3, 2, 2))
    layer(torch.randn(4, 3, 2, 2))  # reported once; the layer trains on
    assert torch.isfinite(layer.running_mean).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deferred_finite_check_keeps_the_native_backward_working(dtype, monkeypatch):
    """Before: the deferred restore wrote the running buffers in place after the native batch
    norm had saved them, and backward raised 'modified by an inplace operation' (CUDA without
    the kernels, or float64)."""
    monkeypatch.setattr(safenorm.SafeBatchNormBase, "_defers_check", lambda self, x: True)
    layer = safenorm.GhostBatchNorm2d(3).to(dtype)
    reference = nn.BatchNorm2d(3).to(dtype)
    x = torch.randn(4, 3, 2, 2, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def _public(family: str) -> dict:
    return {"expected_batch_size": 4} if family == "DPBatchNorm" else {}


def _unclipped(family: str) -> dict:
    # Clipping gives a non-finite sample zero weight; unclipped statistics propagate a NaN.
    return {"clip_norm": math.inf, "var_clip_norm": math.inf} if family != "GhostBatchNorm" else {}


@pytest.mark.parametrize("family", ["GhostBatchNorm", "ClippedBatchNorm"])
def test_empty_batch_gives_empty_output_and_leaves_buffers(family):
    layer = getattr(safenorm, f"{family}2d")(3)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 4, 4)
    y.sum().backward()
    assert layer.weight.grad is not None and torch.count_nonzero(layer.weight.grad) == 0
    for key, value in layer.state_dict().items():
        assert torch.equal(value, saved[key])


def test_dp_empty_batch_with_public_size_makes_a_noise_only_release():
    layer = safenorm.DPBatchNorm2d(3, expected_batch_size=16)
    y = layer(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    assert layer.release_count == 2 and int(layer.num_batches_tracked) == 1
    assert not torch.equal(layer.running_mean, torch.zeros(3))  # moved by noise alone


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_one(family):
    layer = getattr(safenorm, f"{family}2d")(3, **_public(family))
    y = layer(torch.randn(1, 3, 4, 4))
    assert y.shape == (1, 3, 4, 4) and torch.isfinite(y).all()
    if family != "DPBatchNorm":
        ref = nn.BatchNorm1d(3)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ref(torch.randn(1, 3))
        with pytest.raises(ValueError, match=f"{family}1d: expected more than 1 value"):
            getattr(safenorm, f"{family}1d")(3)(torch.randn(1, 3))
    else:
        assert torch.isfinite(
            safenorm.DPBatchNorm1d(3, expected_batch_size=8)(torch.randn(1, 3))
        ).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_input_accumulates_in_fp32(family, dtype):
    kwargs = {"GhostBatchNorm": {"ghost_batch_size": 3}, "ClippedBatchNorm": {},
              "DPBatchNorm": {"expected_batch_size": 8, "normalize_with": "batch",
                              "generator": torch.Generator().manual_seed(0)}}[family]  # fmt: skip
    x32 = torch.randn(8, 4, 6, 6) * 3 + 100  # a large mean: fp16 sums would lose it
    layer16 = getattr(safenorm, f"{family}2d")(4, **kwargs)
    if family == "DPBatchNorm":
        kwargs["generator"] = torch.Generator().manual_seed(0)
    layer32 = getattr(safenorm, f"{family}2d")(4, **kwargs)
    y16 = layer16(x32.to(dtype))
    y32 = layer32(x32.to(dtype).float())
    assert y16.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y16.float(), y32, atol=tol, rtol=tol)
    torch.testing.assert_close(layer16.running_mean, layer32.running_mean)
    assert layer16.running_mean.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_non_contiguous_input(family):
    base = torch.randn(5, 8, 6, 3)
    x = base.transpose(1, 3)[:, :, ::2]  # (5, 3, 3, 8), non-contiguous
    assert not x.is_contiguous()
    kwargs = {"GhostBatchNorm": {"ghost_batch_size": 2}, "ClippedBatchNorm": {},
              "DPBatchNorm": {"expected_batch_size": 5}}[family]  # fmt: skip
    torch.manual_seed(0)
    a = getattr(safenorm, f"{family}2d")(3, **kwargs)(x)
    torch.manual_seed(0)
    b = getattr(safenorm, f"{family}2d")(3, **kwargs)(x.contiguous())
    torch.testing.assert_close(a, b)


def test_invalid_variant_arguments_are_refused():
    with pytest.raises(ValueError, match="ghost_batch_size"):
        safenorm.GhostBatchNorm2d(3, ghost_batch_size=0)
    for family in ("ClippedBatchNorm2d", "DPBatchNorm2d"):
        with pytest.raises(ValueError, match=f"{family}: ghost_batch_size must be a positive int"):
            getattr(safenorm, family)(3, ghost_batch_size=0)
    with pytest.raises(ValueError, match="positive"):
        safenorm.ClippedBatchNorm2d(3, clip_norm=-1.0)
    with pytest.raises(ValueError, match="normalize_with='running' needs"):
        safenorm.DPBatchNorm2d(3, track_running_stats=False, normalize_with="running")
    with pytest.raises(ValueError, match="frozen_statistics"):
        safenorm.DPBatchNorm2d(3, track_running_stats=False, frozen_statistics=True)
    with pytest.raises(ValueError, match="clip_reference"):
        safenorm.ClippedBatchNorm2d(3, clip_reference="batch")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 9),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    g=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_property_ghost_and_unclipped_match_groupwise_batchnorm(n, c, spatial, g, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=gen, dtype=torch.float64)
    groups = x.split(g)
    if any(grp.numel() == c for grp in groups):
        return  # a single-value group is covered by test_ghost_equals_batchnorm_per_group
    ref = torch.cat(
        [torch.nn.functional.batch_norm(grp, None, None, training=True) for grp in groups]
    )
    ghost = safenorm.functional.ghost_batch_norm(
        x, None, None, None, None, True, ghost_batch_size=g
    )
    clipped = safenorm.functional.clipped_batch_norm(
        x, None, None, None, None, True, ghost_batch_size=g
    )
    torch.testing.assert_close(ghost, ref)
    torch.testing.assert_close(clipped, ref)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    c=st.integers(1, 6),
    r1=st.floats(0.05, 10.0),
    r2=st.floats(0.05, 10.0),
    scale=st.floats(1e-3, 1e3),
)
def test_property_clipped_statistics_stay_within_the_clip_ball(n, c, r1, r2, scale):
    x = torch.randn(n, c, 3, dtype=torch.float64) * scale
    m, w = safenorm.functional.per_sample_moments(x)
    groups = safenorm.functional.consecutive_groups(n, None, x.device)
    stats = safenorm.functional.clipped_statistics(m, w, groups, clip_norm=r1, var_clip_norm=r2)
    # Every contribution has norm <= R and every denominator is >= rho D, so the
    # self-normalized averages have norm <= R / rho.
    rho1, rho2 = (safenorm.functional.weight_floor(r, c) for r in (r1, r2))
    assert float(torch.linalg.vector_norm(stats.mean[0])) <= r1 / rho1 * (1 + 1e-9)
    assert float(torch.linalg.vector_norm(stats.var[0])) <= r2 / rho2 * (1 + 1e-9)
    assert (stats.var >= 0).all()


def test_dp_with_public_denominator_one_keeps_a_biased_running_variance():
    layer = safenorm.DPBatchNorm1d(3, expected_batch_size=1, noise_multiplier=0.0, var_floor=0.0,
                                   clip_norm=math.inf, var_clip_norm=math.inf)  # fmt: skip
    x = torch.randn(1, 3)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(layer.running_var, torch.full((3,), 0.9))  # 0.9 * 1 + 0.1 * 0
