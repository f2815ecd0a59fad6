"""The layers on a CUDA device (the Triton path) against the same layers on CPU (the reference).

Run by ``benchmarks/gpu_run.sh`` on the GPU machine; skipped elsewhere.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import safenorm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FAMILIES = {
    "ghost": lambda c: safenorm.GhostBatchNorm2d(c, ghost_batch_size=3),
    "clipped": lambda c: safenorm.ClippedBatchNorm2d(c, clip_norm=3.0, var_clip_norm=6.0),
    "dp": lambda c: safenorm.DPBatchNorm2d(c, expected_batch_size=8, noise_multiplier=0.0),
}


def _step(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.float(), x.grad.float(), layer.weight.grad, layer.running_mean, layer.running_var


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_layer_matches_cpu(family, dtype, channels_last):
    torch.manual_seed(0)
    cpu = FAMILIES[family](16)
    if family == "dp":
        cpu.register_release_hook(lambda *_: None)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(8, 16, 6, 5) * 3 + 1
    dy = torch.randn_like(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref = _step(cpu, x.to(dtype).float(), dy.to(dtype).float())
    out = _step(gpu, x.cuda().to(dtype).to(memory_format=fmt), dy.cuda().to(dtype))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("y", "dx", "dweight", "mean", "var"), out, ref, strict=True):
        torch.testing.assert_close(
            a.cpu(), b, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_cuda_finite_check_is_deferred_and_restores_the_buffers():
    layer = safenorm.GhostBatchNorm2d(4).cuda()
    layer(torch.randn(4, 4, 3, 3, device="cuda"))
    saved = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, 4, 3, 3, device="cuda")
    x[0, 1, 0, 0] = float("nan")
    layer(x)
    torch.testing.assert_close((layer.running_mean, layer.running_var), saved)
    message = "GhostBatchNorm2d: batch statistics of the previous training forward"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, 4, 3, 3, device="cuda"))


def test_cuda_finite_check_at_once_when_not_deferred():
    # Unclipped and noiseless: clipping would give the non-finite sample zero weight.
    unbounded = dict(clip_norm=math.inf, var_clip_norm=math.inf, noise_multiplier=0.0)
    layer = safenorm.DPBatchNorm2d(4, expected_batch_size=4, **unbounded).cuda()
    layer.register_release_hook(lambda *_: None)
    layer.defer_statistics_check = False
    x = torch.randn(4, 4, 3, 3, device="cuda")
    x[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="DPBatchNorm2d: batch statistics are NaN"):
        layer(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_capture_in_a_cuda_graph_with_the_check_on(family):
    """Graph capture cannot sync: the check (in the combine kernel) keeps the buffers on the
    device and the step replays."""
    layer = FAMILIES[family](4).cuda()
    if family == "dp":
        layer.register_release_hook(lambda *_: None)
    x = torch.randn(4, 4, 3, 3, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            layer(x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x).sum().backward()
    before = layer.running_mean.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(layer.running_mean, before)
    assert torch.isfinite(layer.running_var).all()
