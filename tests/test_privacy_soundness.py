"""Paths around the DP mechanism that must not leak or under-report: overflowing inputs, copies
and pickles of layers, secure-mode group draws, conversion of trained BatchNorms, compiled
graphs. (Accounting paths of the engine are in test_opacus_soundness.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch

import safenorm
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
