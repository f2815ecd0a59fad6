"""``safenorm.kernels.batch_norm`` (the five-launch standard BN) against ``nn.BatchNorm``.

Shapes cross the combine kernels' 32 x 32 tiles (N and C above 32) and force spatial splits, so
every loop and mask runs; under the Triton interpreter without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safenorm import functional as SF

triton = pytest.importorskip("triton")

from safenorm.kernels.batch_norm import batch_norm_backward, batch_norm_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.interpret


def _reference(x, dy, affine, momentum):
    bn = nn.BatchNorm1d if x.dim() < 4 else nn.BatchNorm2d
    bn = bn(x.shape[1], momentum=momentum, affine=affine).to(DEVICE)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, x.shape[1]))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, x.shape[1]))
    xr = x.detach().double().requires_grad_()
    bn = bn.double()
    y = bn(xr)
    y.backward(dy.double())
    grads = (bn.weight.grad, bn.bias.grad) if affine else (None, None)
    return y, xr.grad, *grads, bn.running_mean, bn.running_var, bn


@pytest.mark.parametrize(
    # (4, 34, 1, 1): few values per channel (with two, fp32 nn.BatchNorm itself is off by 4e-3)
    "shape",
    [(70, 40, 3, 5), (33, 3, 2, 2), (5, 65), (3, 33, 7), (4, 34, 1, 1)],
)
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_nn_batchnorm(shape, num_splits, affine, channels_last):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3 + 50).to(DEVICE)  # far-from-zero mean
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to(DEVICE)
    y_ref, dx_ref, dw_ref, db_ref, rm_ref, rv_ref, bn = _reference(x, dy, affine, 0.3)
    weight = bn.weight.detach().float() if affine else None
    bias = bn.bias.detach().float() if affine else None
    rm, rv = torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)
    y, mean, rstd, scale = batch_norm_forward(x, weight, bias, 1e-5, rm, rv, 0.3,
                                              num_splits=num_splits)  # fmt: skip
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, rstd, scale, num_splits=num_splits)
    close = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(y.double(), y_ref, **close)
    torch.testing.assert_close(dx.double(), dx_ref, **close)
    torch.testing.assert_close((rm.double(), rv.double()), (rm_ref, rv_ref), **close)
    if affine:
        torch.testing.assert_close((dweight.double(), dbias.double()), (dw_ref, db_ref), **close)
    assert y.stride() == x.stride() and dx.stride() == x.stride()


def test_half_input_keeps_fp32_statistics_and_buffers():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, 4, 4, generator=g) + 2).to(DEVICE, torch.float16)
    rm, rv = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    y, mean, rstd, _ = batch_norm_forward(x, None, None, 1e-5, rm, rv, 1.0)
    assert y.dtype == torch.float16 and mean.dtype == rstd.dtype == torch.float32
    xd = x.double()
    torch.testing.assert_close(mean[0].double(), xd.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv.double(), xd.var((0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_single_value_per_channel_keeps_the_variance_biased():
    """One value per channel has no degree of freedom: no division by zero in the update."""
    x = torch.tensor([[1.0, 2.0, 3.0]], device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    batch_norm_forward(x, None, None, 1e-5, rm, rv, 0.5)
    torch.testing.assert_close(rv, torch.full((3,), 0.5, device=DEVICE))
    torch.testing.assert_close(rm, torch.tensor([0.5, 1.0, 1.5], device=DEVICE))


@pytest.mark.parametrize("group_size, num_splits", [(32, None), (7, 2), (1, None), (69, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_groups_match_batchnorm_per_group(group_size, num_splits, channels_last):
    """Each consecutive group (the last one ragged) is an independent batch norm."""
    g = torch.Generator().manual_seed(group_size)
    x = (torch.randn(70, 40, 3, 5, generator=g) * 2 - 20).to(DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    weight, bias = (
        torch.linspace(0.5, 2, 40, device=DEVICE),
        torch.linspace(-1, 1, 40, device=DEVICE),
    )
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y_ref = torch.cat([
        nn.functional.batch_norm(chunk, None, None, wr, br, True, 0.0, 1e-5)
        for chunk in xr.split(group_size)
    ])  # fmt: skip
    y_ref.backward(dy.double())
    rm, rv = torch.zeros(40, device=DEVICE), torch.ones(40, device=DEVICE)
    rm_ref, rv_ref = rm.double(), rv.double()
    SF.ghost_batch_norm(x.double(), rm_ref, rv_ref, None, None, True, 0.2, 1e-5, group_size)
    y, mean, rstd, scale = batch_norm_forward(
        x, weight, bias, 1e-5, rm, rv, 0.2, group_size=group_size, num_splits=num_splits
    )
    dx, dweight, dbias = batch_norm_backward(
        dy, x, mean, rstd, scale, group_size=group_size, num_splits=num_splits
    )
    close = dict(atol=2e-4, rtol=2e-4)
    assert mean.shape == (-(-70 // group_size), 40)
    torch.testing.assert_close(y.double(), y_ref, **close)
    torch.testing.assert_close(dx.double(), xr.grad, **close)
    torch.testing.assert_close((dweight.double(), dbias.double()), (wr.grad, br.grad), **close)
    torch.testing.assert_close((rm.double(), rv.double()), (rm_ref, rv_ref), **close)
