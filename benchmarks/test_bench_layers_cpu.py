"""CPU benchmark of every safenorm layer vs nn.BatchNorm2d and nn.GroupNorm (forward + backward).

Run side by side in one process, so the ratios are comparable::

    python -m pytest benchmarks/test_bench_layers_cpu.py -o addopts="" \\
        --benchmark-json=benchmarks/results/cpu_layers.json
    python benchmarks/summarize_cpu.py benchmarks/results/cpu_layers.json \\
        > benchmarks/results/cpu_layers.md
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import safenorm

# Typical CNN activations that fit a 2-core CPU run: CIFAR-ResNet stages and a ResNet-50 late stage.
SHAPES = [(64, 64, 32, 32), (64, 128, 16, 16), (128, 256, 8, 8), (32, 512, 7, 7)]
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _layers(channels: int, batch: int) -> dict[str, nn.Module]:
    return {
        "batchnorm": nn.BatchNorm2d(channels),
        "groupnorm": nn.GroupNorm(min(32, channels), channels),
        "ghost": safenorm.GhostBatchNorm2d(channels, ghost_batch_size=16),
        "clipped": safenorm.ClippedBatchNorm2d(channels),
        "dp": safenorm.DPBatchNorm2d(channels, expected_batch_size=batch),
    }


PROVIDERS = list(_layers(8, 8))


# The top decorator varies fastest: all providers of one shape run back to back, so a change in
# machine load between shapes does not skew their ratios.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("memory_format", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(benchmark, provider, shape, memory_format):
    warnings.simplefilter("ignore", safenorm.PrivacyWarning)
    torch.manual_seed(0)
    layer = _layers(shape[1], shape[0])[provider]
    x = torch.randn(shape).contiguous(memory_format=FORMATS[memory_format]).requires_grad_(True)
    grad = torch.randn(shape).contiguous(memory_format=FORMATS[memory_format])
    benchmark.group = f"{'x'.join(map(str, shape))}-{memory_format}"
    benchmark.extra_info.update(provider=provider, shape=list(shape), memory_format=memory_format)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    benchmark.pedantic(step, rounds=40, warmup_rounds=5, iterations=1)
