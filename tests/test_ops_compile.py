"""``torch.compile(fullgraph=True)`` of a small model with each safenorm layer matches eager.

On CPU the compiled model runs the custom ops with their PyTorch implementation (the eager model
runs :mod:`safenorm.functional`), so this also checks the ops against the reference; with the
DP layer the noise comes from the global generator inside an op, so the same seed gives the
same release in both. Compilation is slow: few cases.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import safenorm

pytestmark = pytest.mark.interpret


def _model(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), layer, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2)
    )


def _step(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    y = model(x)
    y.square().sum().backward()
    return y


@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: safenorm.GhostBatchNorm2d(4, ghost_batch_size=4),
        lambda: safenorm.ClippedBatchNorm2d(4, ghost_batch_size=4, clip_norm=1.0),
        lambda: safenorm.DPBatchNorm2d(
            4, noise_multiplier=1.0, expected_batch_size=6, ghost_batch_size=3
        ),
    ],
    ids=["ghost", "clipped", "dp"],
)
def test_compiled_model_matches_eager(make_layer):
    layer = make_layer()  # the finite check traces as a device-side restore (no host sync)
    releases: list[int] = []
    if isinstance(layer, safenorm.DPBatchNorm):
        layer.register_release_hook(lambda _, k: releases.append(k))
    eager = _model(layer)
    compiled_model = copy.deepcopy(eager)
    if isinstance(layer, safenorm.DPBatchNorm):  # a copy starts unaccounted (no hooks)
        compiled_model[1].register_release_hook(lambda _, k: releases.append(k))
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for step in range(2):
        y_ref = _step(eager, x, seed=10 + step)
        y = _step(compiled, x, seed=10 + step)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for (name, p_ref), p in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)
    for (name, b_ref), b in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-6, msg=name)
    if isinstance(layer, safenorm.DPBatchNorm):
        assert sum(releases) == 2 * 2 * 2  # two models, two steps, two releases per forward


def test_compiled_layer_restores_buffers_after_non_finite_statistics():
    """Under torch.compile the finite check cannot raise; it keeps the buffers finite instead."""
    layer = safenorm.GhostBatchNorm2d(3)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(torch.randn(4, 3, 2, 2))
    saved = layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    compiled(x)
    after = layer.running_mean, layer.running_var, layer.num_batches_tracked
    for before, now in zip(saved, after, strict=True):
        assert torch.equal(before, now)


def test_compiled_ghost_layer_with_the_fused_kernels_matches_eager(monkeypatch):
    """Compiled with the Triton backend (interpreter on CPU), ghost BN runs the fused op."""
    pytest.importorskip("triton")
    from safenorm.kernels import batch_norm

    from safenorm import ops

    calls = []
    forward = batch_norm.batch_norm_forward
    monkeypatch.setattr(
        batch_norm, "batch_norm_forward", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    layer = safenorm.GhostBatchNorm2d(4, ghost_batch_size=4)
    eager = _model(layer)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with ops.use_backend("triton"):
        compiled = torch.compile(compiled_model, fullgraph=True)
        for step in range(2):
            y = _step(compiled, x, seed=step)
            with ops.use_backend("torch"):
                y_ref = _step(eager, x, seed=step)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for (name, p_ref), p in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)
    for (name, b_ref), b in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-6, msg=name)
    assert len(calls) == 2  # one fused forward per compiled step
