"""Paths around the DP mechanism that must not leak or under-report: overflowing inputs, copies
and pickles of layers, secure-mode group draws, conversion of trained BatchNorms, compiled
graphs. (Accounting paths of the engine are in test_opacus_soundness.py.)"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import safenorm
import safenorm.noise
import safenorm.privacy
from safenorm import functional as SF
from safenorm.warnings import PrivacyWarning

# -- overflow-safe clipping --------------------------------------------------------------------


def _loop_clip(row: torch.Tensor, bound: float) -> torch.Tensor:
    row = row.double()
    norm = float(torch.linalg.vector_norm(row))
    return row if norm <= bound else row * (bound / norm)


@pytest.mark.parametrize("magnitude", [1e20, 3e38])
def test_clip_rows_clips_rows_whose_norm_overflows_and_zeroes_non_finite_rows(magnitude):
    u = torch.randn(6, 16)
    u[1] = magnitude  # ||u_1||^2 (and for 3e38 ||u_1|| itself) overflows float32
    u[2, 3] = -magnitude
    u[4, 0] = float("nan")
    u[5, 7] = float("inf")
    clipped = SF.clip_rows(u, 2.0)
    assert torch.isfinite(clipped).all()
    for i in (0, 1, 2, 3):
        torch.testing.assert_close(
            clipped[i].double(), _loop_clip(u[i], 2.0), rtol=1e-6, atol=1e-37
        )
    assert torch.equal(clipped[4:], torch.zeros(2, 16))
    assert float(torch.linalg.vector_norm(clipped[1].double())) <= 2.0 * (1 + 1e-6)


@pytest.mark.parametrize("magnitude", [1e20, 3e38])
@pytest.mark.parametrize("where", ["whole sample", "one value"])
def test_a_huge_finite_sample_moves_the_dp_release_only_through_its_clipped_contribution(
    magnitude, where
):
    """Before: the row norm (or the moment) overflowed, inf * 0 = NaN, and the layer raised
    exactly when that sample was drawn (a data-dependent event)."""
    c, d, r1, r2 = 8, 16, 1.5, 2.5
    torch.manual_seed(0)
    clean = torch.randn(d - 1, c, 4, 4)
    outlier = torch.zeros(1, c, 4, 4)
    if where == "whole sample":
        outlier[:] = magnitude
    else:
        outlier[0, 2, 1, 1] = magnitude

    def release(x):
        layer = safenorm.DPBatchNorm2d(
            c, clip_norm=r1, var_clip_norm=r2, noise_multiplier=0.0, expected_batch_size=d,
            normalize_with="batch", var_floor=0.0, clip_reference="none",
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrivacyWarning)
            layer(x)  # no error: the release does not depend on whether the outlier is drawn
        assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
        return layer.last_statistics

    mean_with, var_with = release(torch.cat([clean, outlier]))
    mean_without, _ = release(clean)
    # The mean sum moves by the outlier's clipped contribution: norm at most R1 (here exactly R1
    # or, when the per-sample mean overflowed upstream, 0).
    shift = float(torch.linalg.vector_norm((mean_with - mean_without).double() * d))
    assert shift <= r1 * (1 + 1e-5)
    assert torch.isfinite(var_with).all()


def test_clipped_layer_statistics_stay_finite_with_a_huge_finite_sample():
    layer = safenorm.ClippedBatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3)
    x[2] = 3e38
    layer(x)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()


# -- copies and pickles ------------------------------------------------------------------------


def _dp_model(**kwargs) -> nn.Module:
    kwargs = {"expected_batch_size": 8, **kwargs}
    return nn.Sequential(nn.Conv2d(3, 4, 3), safenorm.DPBatchNorm2d(4, **kwargs), nn.ReLU())


def _releases_warn_unaccounted(model: nn.Module) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()(torch.randn(8, 3, 6, 6))
    return any("UNACCOUNTED" in str(w.message) for w in caught)


def test_an_averaged_model_copy_is_unaccounted_and_warns():
    """Before: deepcopy copied the bound release hooks, so the EMA/SWA copy reported to a private
    copy of the ledger: its releases were never accounted and nothing warned."""
    model = _dp_model()
    ledger = safenorm.privacy.ReleaseLedger(model)
    model(torch.randn(8, 3, 6, 6))
    assert ledger.total_releases == 2
    averaged = torch.optim.swa_utils.AveragedModel(model)
    assert _releases_warn_unaccounted(averaged)
    assert ledger.total_releases == 2  # the copy's releases are not the original's
    assert not _releases_warn_unaccounted(model)  # the original is still watched
    assert ledger.total_releases == 4
    # A ledger attached to the copy accounts for it.
    copy_ledger = safenorm.privacy.ReleaseLedger(averaged)
    averaged(torch.randn(8, 3, 6, 6))
    assert copy_ledger.total_releases == 2


def test_a_pickled_layer_carries_no_generator_no_last_statistics_and_no_hooks():
    """Before: torch.save(layer) shipped the seeded generator (from which the noise, hence the
    exact clipped sums, can be regenerated) and the last release."""
    model = _dp_model(generator=torch.Generator().manual_seed(5), ghost_batch_size=2)
    ledger = safenorm.privacy.ReleaseLedger(model)
    model(torch.randn(8, 3, 6, 6))
    layer = model[1]
    assert layer.generator is not None and layer.last_statistics is not None
    layer.activations = [torch.randn(8, 4, 4, 4)]  # what Opacus keeps until the backward
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for restored in (loaded[1], pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert restored.generator is None
        assert restored.last_statistics is None
        assert not restored._release_hooks
        assert not hasattr(restored, "activations")
        for name in ("running_mean", "running_var", "weight", "bias"):
            assert torch.equal(getattr(restored, name), getattr(layer, name))
        assert restored.ghost_batch_size == 2 and restored.expected_batch_size == 8
    assert _releases_warn_unaccounted(loaded)
    assert ledger.total_releases == 2


# -- secure mode -------------------------------------------------------------------------------


def test_secure_mode_draws_ghost_groups_from_the_os_csprng():
    """Before: the groups came from torch's global RNG even in secure_mode (predictable)."""
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        groups = SF.dp_groups(2000, 200.0, 20, torch.device("cpu"), secure_mode=True)
        assert torch.equal(torch.get_rng_state(), state)  # torch's RNG untouched
        draws.append(groups.index)
    assert not torch.equal(draws[0], draws[1])
    counts = torch.bincount(draws[0], minlength=10).double()
    chi2 = float(((counts - 200) ** 2 / 200).sum())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    # The layer end to end: a secure-mode ghost forward never touches torch's global RNG.
    layer = safenorm.DPBatchNorm2d(4, expected_batch_size=16, ghost_batch_size=4, secure_mode=True)
    safenorm.privacy.ReleaseLedger(layer)
    state = torch.get_rng_state()
    x = torch.randn(16, 4, 3, 3)
    state = torch.get_rng_state()
    layer(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_secure_uniform_integers_are_uniform_and_refuse_a_generator():
    values = safenorm.noise.uniform_integers(7, 70000, secure_mode=True)
    assert values.dtype == torch.int64 and int(values.min()) >= 0 and int(values.max()) <= 6
    counts = torch.bincount(values, minlength=7).double()
    assert float(((counts - 10000) ** 2 / 10000).sum()) < 22.5  # 6 dof, p = 0.001
    with pytest.raises(ValueError, match="secure_mode"):
        safenorm.noise.uniform_integers(3, 4, secure_mode=True, generator=torch.Generator())


# -- compiled graphs ---------------------------------------------------------------------------


def test_fullgraph_compile_of_an_unaccounted_dp_layer_works_and_still_warns():
    """Before: torch.compile(fullgraph=True) failed: warnings.warn cannot be traced."""
    torch._dynamo.reset()
    model = _dp_model()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert _releases_warn_unaccounted(compiled)
    ledger = safenorm.privacy.ReleaseLedger(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert not _releases_warn_unaccounted(compiled)
    assert ledger.total_releases == 2


def test_dp_layer_warns_when_its_variance_bound_cannot_follow_the_activations():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safenorm.DPBatchNorm2d(16)  # the defaults do not warn
        safenorm.DPBatchNorm2d(16, var_clip_norm=0.5, clip_reference="none")  # raw units
    with pytest.warns(UserWarning, match="measured to diverge"):
        safenorm.DPBatchNorm2d(16, var_clip_norm=0.5 * 4)  # half the default: diverged
