"""Every variant reproduces nn.BatchNorm*d where its parameters make it BN, and ghost BN equals
BN applied to each group separately."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import safenorm
from safenorm import functional as SF

INF = math.inf

# (rank name, reference class, safenorm suffix, input shape)
SHAPES = [
    ("1d-2D", nn.BatchNorm1d, "1d", (6, 5)),
    ("1d-3D", nn.BatchNorm1d, "1d", (6, 5, 7)),
    ("2d", nn.BatchNorm2d, "2d", (6, 5, 4, 3)),
    ("2d-cl", nn.BatchNorm2d, "2d", (6, 5, 4, 3)),
    ("3d", nn.BatchNorm3d, "3d", (4, 5, 3, 2, 3)),
    ("3d-cl", nn.BatchNorm3d, "3d", (4, 5, 3, 2, 3)),
]


def _bn_equivalent_layer(kind: str, suffix: str, n: int) -> nn.Module:
    if kind == "ghost":
        return getattr(safenorm, f"GhostBatchNorm{suffix}")(5, ghost_batch_size=n)
    if kind == "clipped":
        return getattr(safenorm, f"ClippedBatchNorm{suffix}")(5, clip_norm=INF, var_clip_norm=INF)
    return getattr(safenorm, f"DPBatchNorm{suffix}")(
        5,
        clip_norm=INF,
        var_clip_norm=INF,
        noise_multiplier=0.0,
        expected_batch_size=n,
        normalize_with="batch",
        var_floor=0.0,
    )


def _make_input(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3 + 1.5
    if name.endswith("-cl"):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _detached_bn_reference(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """BN's train-mode output with the batch statistics treated as constants."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims).detach()
    var = x.var(dims, unbiased=False).detach()
    shape = (1, -1, *([1] * (x.dim() - 2)))
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


@pytest.mark.parametrize("kind", ["ghost", "clipped", "dp"])
@pytest.mark.parametrize(("name", "ref_cls", "suffix", "shape"), SHAPES, ids=[s[0] for s in SHAPES])
def test_variant_reproduces_batchnorm(kind, name, ref_cls, suffix, shape):
    n = shape[0]
    ref = ref_cls(5)
    layer = _bn_equivalent_layer(kind, suffix, n)
    with torch.no_grad():
        for module in (ref, layer):
            module.weight.copy_(torch.linspace(0.5, 2.0, 5))
            module.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    x_ref = _make_input(name, shape).requires_grad_(True)
    x_var = _make_input(name, shape).requires_grad_(True)
    grad_out = _make_input(name, shape, seed=1)

    for _ in range(2):  # two steps: the running update composes as in BN
        y_ref = ref(x_ref) if kind != "dp" else _detached_bn_reference(x_ref, ref)
        if kind == "dp":
            ref(x_ref.detach())  # BN's own running-stat update
        y = layer(x_var)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.running_var, ref.running_var, atol=1e-6, rtol=1e-5)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 2

    (y_ref * grad_out).sum().backward()
    (y * grad_out).sum().backward()
    torch.testing.assert_close(x_var.grad, x_ref.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["ghost", "clipped", "dp"])
def test_output_keeps_memory_format(kind):
    x = _make_input("2d-cl", (6, 5, 4, 3))
    y = _bn_equivalent_layer(kind, "2d", 6)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["ghost", "clipped", "dp"])
def test_momentum_and_cumulative_average_match_batchnorm(kind, momentum):
    ref = nn.BatchNorm2d(5, momentum=momentum)
    layer = _bn_equivalent_layer(kind, "2d", 6)
    layer.momentum = momentum
    for step in range(4):
        x = _make_input("2d", (6, 5, 4, 3), seed=step)
        ref(x)
        layer(x)
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)


def _batch_norm_of_group(chunk, weight, bias):
    if chunk.numel() > chunk.shape[1]:
        return F.batch_norm(chunk, None, None, weight, bias, True, 0.0, 1e-5)
    # One value per channel (a ragged last group of one (N, C) sample), which F.batch_norm
    # refuses: the group's statistics are the value itself, so the output is the bias.
    return (chunk - chunk) * weight / math.sqrt(1e-5) + bias


@pytest.mark.parametrize(
    ("n", "g", "shape_tail"),
    [(8, 3, (4, 3)), (7, 2, (5,)), (9, 4, ()), (5, 1, (3, 3)), (10, 5, (2, 2, 2))],
)
def test_ghost_equals_batchnorm_per_group(n, g, shape_tail):
    c = 4
    x = (torch.randn(n, c, *shape_tail, dtype=torch.float64) * 2 + 0.3).requires_grad_(True)
    weight = torch.linspace(0.5, 1.5, c, dtype=torch.float64).requires_grad_(True)
    bias = torch.linspace(-0.2, 0.2, c, dtype=torch.float64).requires_grad_(True)
    running_mean = torch.zeros(c, dtype=torch.float64)
    running_var = torch.ones(c, dtype=torch.float64)
    y = safenorm.functional.ghost_batch_norm(
        x, running_mean, running_var, weight, bias, True, 0.1, 1e-5, ghost_batch_size=g
    )

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True)
    chunks = [_batch_norm_of_group(chunk, w_ref, b_ref) for chunk in x_ref.split(g)]
    y_ref = torch.cat(chunks)
    torch.testing.assert_close(y, y_ref)

    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)

    # Running statistics: batch mean and the pooled unbiased within-group variance.
    flat = x.detach().transpose(0, 1).reshape(c, n, -1)
    groups = flat.split(g, dim=1)
    squares = sum(((grp - grp.mean((1, 2), keepdim=True)) ** 2).sum((1, 2)) for grp in groups)
    dof = sum(grp.shape[1] * grp.shape[2] - 1 for grp in groups)
    torch.testing.assert_close(running_mean, 0.1 * flat.mean((1, 2)))
    torch.testing.assert_close(running_var, 0.9 + 0.1 * squares / dof)


def test_ghost_module_with_ragged_group_matches_functional():
    layer = safenorm.GhostBatchNorm2d(3, ghost_batch_size=4)
    x = torch.randn(10, 3, 2, 2)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    expected = safenorm.functional.ghost_batch_norm(
        x, running_mean, running_var, layer.weight, layer.bias, True, 0.1, 1e-5, 4
    )
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_var, running_var)


@pytest.mark.parametrize("shape", [(3, 2, 5), (2, 3, 2, 3), (2, 2, 1, 2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_moments_values_and_gradient(shape, channels_last):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 7
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    m, w = safenorm.functional.per_sample_moments(x)
    flat = x.detach().reshape(*shape[:2], -1)
    torch.testing.assert_close(m, flat.mean(-1))
    torch.testing.assert_close(w, flat.var(-1, unbiased=False))
    torch.autograd.gradcheck(
        lambda t: safenorm.functional.per_sample_moments(t), (x,), check_batched_grad=False
    )


@pytest.mark.parametrize("size, spatial", [(5.0, 4), (1.0, 1), (0.5, 1), (7.0, 1)])
def test_running_update_with_a_host_size_matches_the_tensor_form(size, spatial):
    """One group whose size the host knows (the fast path) updates exactly as the general form."""
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(1, 6, generator=g), torch.rand(1, 6, generator=g) + 0.1
    buffers = [(torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5) for _ in range(2)]
    buffers[1] = (buffers[0][0].clone(), buffers[0][1].clone())
    SF.pooled_running_update(*buffers[0], mean, var, torch.tensor([size]), spatial, 0.1)
    SF.pooled_running_update(*buffers[1], mean, var, size, spatial, 0.1)
    torch.testing.assert_close(buffers[1], buffers[0])
