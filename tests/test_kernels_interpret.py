"""The Triton launchers of ``safenorm.kernels`` against ``safenorm.functional`` and plain torch.

Without a CUDA device they run under the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest), on tiny odd shapes; bf16 only on a GPU (the interpreter's bf16 arithmetic is broken).
"""

from __future__ import annotations

import pytest
import torch

from safenorm import functional as SF

triton = pytest.importorskip("triton")

from safenorm.kernels.moments import moments_forward  # noqa: E402
from safenorm.kernels.normalize import normalize_backward, normalize_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.interpret

SHAPES = [(3, 5, 3, 3), (7, 5), (5, 3, 4), (3, 5, 2, 3, 2), (2, 3, 1, 1)]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
FORMATS = ["contiguous", "channels_last", "strided"]


def _make(shape, dtype, fmt, seed=0, scale=2.0, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + shift).to(DEVICE, dtype)
    if fmt == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    elif fmt == "channels_last" and x.dim() == 5:
        x = x.to(memory_format=torch.channels_last_3d)
    elif fmt == "strided":  # every other sample of a larger batch: not dense
        x = torch.cat([x, x], 0)[::2]
    return x


def _view(t, x):
    tail = [1] * (x.dim() - 2)
    return t.reshape(*t.shape, *tail) if t.dim() == 2 else t.reshape(1, -1, *tail)


def _spatial_sum(t):
    return t if t.dim() == 2 else t.sum(tuple(range(2, t.dim())))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("num_splits", [None, 2])
def test_moments_match_functional(shape, dtype, atol, rtol, fmt, num_splits):
    x = _make(shape, dtype, fmt)
    m, w = moments_forward(x, num_splits=num_splits)
    m_ref, w_ref = SF.per_sample_moments(x)
    assert m.dtype == torch.float32 and m.shape == (shape[0], shape[1])
    torch.testing.assert_close(m, m_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-4, rtol=1e-4)


def test_moments_stable_for_large_offset():
    # |mean| >> std: the naive E[x^2] - E[x]^2 in fp32 loses every digit here.
    x = _make((3, 4, 5, 7), torch.float32, "contiguous", scale=1e-2, shift=1e4)
    _, w = moments_forward(x, num_splits=2)
    _, w_ref = SF.per_sample_moments(x.double())
    torch.testing.assert_close(w.double(), w_ref, atol=1e-6, rtol=1e-3)


def test_moments_empty_batch():
    m, w = moments_forward(torch.empty(0, 5, 3, 3, device=DEVICE))
    assert m.shape == w.shape == (0, 5)


def test_moments_reject_float64():
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        moments_forward(torch.zeros(2, 3, 4, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_normalize_forward_matches_functional(shape, dtype, atol, rtol, fmt, per_sample):
    x = _make(shape, dtype, fmt)
    n, c = shape[:2]
    stat_shape = (n, c) if per_sample else (c,)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(stat_shape, generator=g).to(DEVICE)
    var = (torch.rand(stat_shape, generator=g) + 0.5).to(DEVICE)
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(c, generator=g).to(DEVICE)
    scale = torch.rsqrt(var + 1e-5) * weight
    y = normalize_forward(x, scale, bias - mean * scale, num_splits=2)
    y_ref = SF.normalize(x, mean, var, weight, bias, 1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape
    if fmt == "channels_last" and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_normalize_backward_frozen(shape, dtype, atol, rtol, fmt, per_sample):
    """One pass: dx and the per-sample affine sums, against autograd of SF.normalize."""
    x = _make(shape, dtype, fmt)
    n, c = shape[:2]
    stat_shape = (n, c) if per_sample else (c,)
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(stat_shape, generator=g).to(DEVICE)
    var = (torch.rand(stat_shape, generator=g) + 0.5).to(DEVICE)
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)  # contiguous even if x is not
    rstd = torch.rsqrt(var + 1e-5)
    dx, sdyx, sdy = normalize_backward(dy, x, mean, rstd, rstd * weight, num_splits=2)

    xr = x.detach().clone().requires_grad_()
    # Per-sample weights: the gradient of each row is that sample's affine gradient.
    w_ps = weight.expand(n, c).clone().requires_grad_()
    b_ps = torch.zeros(n, c, device=DEVICE, requires_grad=True)
    y = SF.normalize(xr, mean, var, None, None, 1e-5).float() * _view(w_ps, x) + _view(b_ps, x)
    y.backward(dy.float())
    torch.testing.assert_close(dx, xr.grad, atol=atol, rtol=rtol)
    # The reference rounds xhat to x's dtype before the sum; the kernel sums in fp32.
    sum_tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(sdyx, w_ps.grad, atol=sum_tol, rtol=sum_tol)
    torch.testing.assert_close(sdy, b_ps.grad, atol=sum_tol, rtol=sum_tol)


@pytest.mark.parametrize("shape", [(3, 5, 3, 3), (7, 5), (5, 3, 4)])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_normalize_backward_passes(shape, fmt):
    """Reduce-only, dx-only and dx with the moment term, against plain torch."""
    x = _make(shape, torch.float32, fmt)
    n, c = shape[:2]
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(shape, generator=g).to(DEVICE)
    mean, rstd = torch.randn(n, c, generator=g).to(DEVICE), torch.rand(c, generator=g).to(DEVICE)
    scale = torch.rand(c, generator=g).to(DEVICE)
    coef, center, offset = (torch.randn(n, c, generator=g).to(DEVICE) for _ in range(3))

    dx, sdyx, sdy = normalize_backward(dy, x, mean, rstd, None)
    assert dx is None
    torch.testing.assert_close(sdyx, _spatial_sum(dy * (x - _view(mean, x)) * _view(rstd, x)))
    torch.testing.assert_close(sdy, _spatial_sum(dy))

    dx, sdyx, sdy = normalize_backward(dy, x, None, None, scale, coef, center, offset)
    assert sdyx is None and sdy is None
    expected = dy * _view(scale, x) + _view(coef, x) * (x - _view(center, x)) + _view(offset, x)
    torch.testing.assert_close(dx, expected)


def test_normalize_backward_validation():
    x = torch.zeros(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="nothing to compute"):
        normalize_backward(x, x, None, None, None)
    with pytest.raises(ValueError, match="shape"):
        normalize_backward(x[:1], x, None, None, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="statistics of shape"):
        normalize_forward(x, torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bf16_on_gpu(fmt):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _make((8, 16, 7, 7), torch.bfloat16, fmt)
    m, w = moments_forward(x)
    m_ref, w_ref = SF.per_sample_moments(x)
    torch.testing.assert_close(m, m_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(w, w_ref, atol=1e-3, rtol=1e-3)
    mean, var = m_ref.mean(0), w_ref.mean(0) + 0.5
    weight, bias = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)
    scale = torch.rsqrt(var + 1e-5) * weight
    y = normalize_forward(x, scale, bias - mean * scale)
    torch.testing.assert_close(
        y, SF.normalize(x, mean, var, weight, bias, 1e-5), atol=3e-2, rtol=2e-2
    )


def test_autotuned_kernels_run_every_warp_candidate(monkeypatch):
    """The multi-candidate autotune (what a GPU runs) with a stand-in timer: every candidate runs,
    the key names are the kernels' arguments, and the results match the reference."""
    from safenorm.kernels import _tiling, moments, normalize

    timed = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [float(len(timed))] * len(quantiles)  # the first candidate is "fastest"

    for module, name in ((moments, "_moments_forward_kernel"),
                         (normalize, "_normalize_forward_kernel"),
                         (normalize, "_normalize_backward_kernel")):  # fmt: skip
        jit = getattr(module, name).fn
        tuned = _tiling.autotuned(jit, warps=_tiling.AUTOTUNE_WARPS, do_bench=fake_bench)
        monkeypatch.setattr(module, name, tuned)
    x = _make((4, 6, 3, 5), torch.float32, "channels_last")
    m, w = moments_forward(x)
    m_ref, w_ref = SF.per_sample_moments(x)
    torch.testing.assert_close((m, w), (m_ref, w_ref), atol=1e-5, rtol=1e-5)
    scale, shift = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    y = normalize_forward(x, scale, shift)
    torch.testing.assert_close(y, x * _view(scale, x) + _view(shift, x))
    mean, rstd = m.mean(0), w.mean(0).rsqrt()
    dx, sdyx, sdy = normalize_backward(y, x, mean, rstd, scale)
    torch.testing.assert_close(dx, y * _view(scale, x))
    xhat = (x - _view(mean, x)) * _view(rstd, x)
    torch.testing.assert_close(sdyx, _spatial_sum(y * xhat), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sdy, _spatial_sum(y), atol=1e-4, rtol=1e-4)
    assert len(timed) == 3 * len(_tiling.AUTOTUNE_WARPS)  # three kernels, every candidate
