"""``safenorm.ops``: the layer functions of ``safenorm.functional`` through the primitives.

Each layer function runs three ways: with the Triton kernels (the fused pipeline, under the
interpreter on CPU), through the custom ops with their PyTorch implementation (what CPU runs
under torch.compile), and with the ``"torch"`` backend (the reference math); the first two must
match the reference forward, input/affine gradients and running buffers. DP releases get the
same group draw (same seed) and the same noise on every path. ``torch.library.opcheck`` checks
every op.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

from safenorm import functional as SF
from safenorm import ops
from safenorm.ops import backend, primitives, registrations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = ops.kernels_available()

pytestmark = pytest.mark.interpret


@pytest.fixture(params=["triton", "torch-ops"])
def op_backend(request, monkeypatch):
    """Route the layer functions through the primitives with one implementation."""
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.skip("triton not installed")
        monkeypatch.setattr(backend, "_backend", "triton")
    else:  # the custom ops with their PyTorch implementation (what CPU runs under torch.compile)
        monkeypatch.setattr(backend, "_backend", "auto")
        monkeypatch.setattr(ops, "routes", lambda x: True)
    return request.param


@pytest.fixture
def same_noise(monkeypatch):
    """The same standard normals on every path: the reference draws ``(G, C)`` twice, the
    kernels ``(2, G, C)`` once; both get the rows of one fixed tensor."""
    state = {}

    def fake(shape, **_):
        if len(shape) == 3:  # the kernels' one draw
            state["noise"] = torch.randn(shape, generator=torch.Generator().manual_seed(99))
            return state["noise"].to(DEVICE)
        full = torch.randn((2, *shape), generator=torch.Generator().manual_seed(99))
        k = state.get("k", 0)
        state["k"] = (k + 1) % 2
        return full[k].to(DEVICE)

    monkeypatch.setattr(SF, "gaussian_noise", fake)
    monkeypatch.setattr(primitives, "gaussian_noise", fake)


def _reference(fn, *args, **kwargs):
    with ops.use_backend("torch"):
        return _run(fn, *args, **kwargs)


def _inputs(shape, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    weight = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    bias = torch.randn(c, generator=g).to(DEVICE)
    running = (
        torch.randn(c, generator=g).to(DEVICE),
        (torch.rand(c, generator=g) + 0.5).to(DEVICE),
    )
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, weight, bias, running, dy


def _run(fn, x, weight, bias, running, dy, **kwargs):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    rm, rv = running[0].clone(), running[1].clone()
    y = fn(x, rm, rv, weight, bias, True, 0.1, 1e-5, **kwargs)
    y.backward(dy)
    return y, x.grad, weight.grad, bias.grad, rm, rv


def _assert_same(out, ref, dtype):
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (4e-3, 4e-3)
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    for name, a, b in zip(names, out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert out[0].dtype == ref[0].dtype
    assert out[0].stride() == ref[0].stride()


CASES = [
    # shape, dtype, channels_last
    ((5, 3, 3, 3), torch.float32, False),
    ((5, 3, 3, 3), torch.float32, True),
    ((5, 3, 3, 3), torch.float16, True),
    ((7, 5), torch.float32, False),
    ((5, 3, 4), torch.float16, False),
    ((3, 2, 2, 3, 2), torch.float32, False),
]


@pytest.mark.parametrize("shape, dtype, channels_last", CASES)
@pytest.mark.parametrize("ghost_batch_size", [None, 2, 3])
def test_ghost_batch_norm(op_backend, shape, dtype, channels_last, ghost_batch_size):
    args = _inputs(shape, dtype, channels_last)
    ref = _reference(SF.ghost_batch_norm, *args, ghost_batch_size=ghost_batch_size)
    out = _run(SF.ghost_batch_norm, *args, ghost_batch_size=ghost_batch_size)
    _assert_same(out, ref, dtype)


@pytest.mark.parametrize("shape, dtype, channels_last", CASES)
@pytest.mark.parametrize("ghost_batch_size", [None, 2])
@pytest.mark.parametrize("detach_statistics", [False, True])
@pytest.mark.parametrize("with_reference", [False, True])
def test_clipped_batch_norm(
    op_backend, shape, dtype, channels_last, ghost_batch_size, detach_statistics, with_reference
):
    args = _inputs(shape, dtype, channels_last)
    c = shape[1]
    reference = (
        SF.ClipReference(center=args[3][0] * 0.5, scale=args[3][1].sqrt())
        if with_reference
        else None
    )
    # Bounds that clip most samples (the clip is active in forward and backward).
    kwargs = dict(
        clip_norm=0.3 * math.sqrt(c),
        var_clip_norm=0.8 * math.sqrt(c),
        ghost_batch_size=ghost_batch_size,
        reference=reference,
        detach_statistics=detach_statistics,
    )
    ref = _reference(SF.clipped_batch_norm, *args, **kwargs)
    out = _run(SF.clipped_batch_norm, *args, **kwargs)
    _assert_same(out, ref, dtype)


@pytest.mark.parametrize("shape, dtype, channels_last", CASES[:3] + CASES[4:])
@pytest.mark.parametrize("ghost_batch_size", [None, 2])
@pytest.mark.parametrize("normalize_with", ["batch", "running"])
def test_dp_batch_norm(
    op_backend, same_noise, shape, dtype, channels_last, ghost_batch_size, normalize_with
):
    args = _inputs(shape, dtype, channels_last)
    kwargs = dict(
        clip_norm=1.0,
        var_clip_norm=2.0,
        noise_multiplier=0.5,
        denominator=6.0,
        ghost_batch_size=ghost_batch_size,
        reference=SF.ClipReference(center=args[3][0], scale=args[3][1].sqrt()),
        var_floor=0.25,
        normalize_with=normalize_with,
    )
    # The same seed must give the same group draw on both paths (and the noise is the same).
    seed = 7
    ref = _reference(
        SF.dp_batch_norm, *args, generator=torch.Generator(DEVICE).manual_seed(seed), **kwargs
    )
    out = _run(
        SF.dp_batch_norm, *args, generator=torch.Generator(DEVICE).manual_seed(seed), **kwargs
    )
    _assert_same(out, ref, dtype)


def test_dp_release_empty_batch(op_backend, same_noise):
    """A noise-only release on an empty batch (Poisson sampling), as the reference."""
    x = torch.empty(0, 3, 2, 2, device=DEVICE)
    kwargs = dict(clip_norm=1.0, var_clip_norm=1.0, noise_multiplier=1.0, denominator=4.0)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    rm2, rv2 = rm.clone(), rv.clone()
    with ops.use_backend("torch"):
        ref = SF.dp_release(x, rm, rv, generator=torch.Generator(DEVICE).manual_seed(3), **kwargs)
    out = SF.dp_release(x, rm2, rv2, generator=torch.Generator(DEVICE).manual_seed(3), **kwargs)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close((rm2, rv2), (rm, rv))


def test_consecutive_groups_match_functional():
    for n in (1, 2, 5, 7, 8):
        for g in (0, 1, 2, 3, 8, 9):
            ours = primitives.consecutive_groups(n, g, torch.device("cpu"))
            ref = SF.consecutive_groups(n, g or None, torch.device("cpu"))
            assert torch.equal(ours.index, ref.index)
            assert torch.equal(ours.size, ref.size)
            assert primitives.group_count(n, g) == ref.count


@pytest.mark.parametrize("affine", ["weight only", "bias only"])
@pytest.mark.parametrize("layer", ["ghost", "ghost groups", "clipped"])
def test_partial_affine_gets_its_gradient(op_backend, affine, layer):
    """A layer with only a weight, or only a bias, gets exactly that gradient."""
    x, weight, bias, running, dy = _inputs((6, 3, 2, 2))
    weight, bias = (weight, None) if affine == "weight only" else (None, bias)
    kwargs = {"ghost": {}, "ghost groups": {"ghost_batch_size": 4}}.get(layer)
    fn = SF.ghost_batch_norm
    if kwargs is None:
        kwargs = {"clip_norm": 2.0, "var_clip_norm": 4.0}
        fn = SF.clipped_batch_norm
    grads = []
    for backend_name in (None, "torch"):
        context = ops.use_backend(backend_name) if backend_name else contextlib.nullcontext()
        xi = x.detach().clone().requires_grad_()
        param = (weight if weight is not None else bias).detach().clone().requires_grad_()
        w, b = (param, None) if weight is not None else (None, param)
        with context:
            y = fn(xi, *(r.clone() for r in running), w, b, True, 0.1, 1e-5, **kwargs)
        y.backward(dy)
        grads.append((xi.grad, param.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n, ghost", [(1, 0), (6, 0), (7, 3), (8, 2)])
def test_closed_form_statistics_backward_matches_autograd(n, ghost):
    g = torch.Generator().manual_seed(n)
    m, w = torch.randn(n, 4, generator=g), torch.rand(n, 4, generator=g)
    d_mean, d_var = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    groups = primitives.consecutive_groups(n, ghost, torch.device("cpu"))

    def statistics(m_, w_):
        mean_, var_ = SF.batch_statistics(m_, w_, groups)
        return groups.per_sample(mean_), groups.per_sample(var_)

    _, vjp = torch.func.vjp(statistics, m, w)
    mean, _ = SF.batch_statistics(m, w, groups)
    ours = registrations._batch_statistics_backward(m, groups, mean, d_mean, d_var)
    torch.testing.assert_close(ours, vjp((d_mean, d_var)))


@pytest.mark.parametrize("clipped", [False, True])
def test_fused_pipeline_matches_the_custom_op(monkeypatch, clipped):
    """The eager pipeline (stage 2 in one kernel each way) and the custom op (stage 2 in
    PyTorch, which the compiler fuses) give the same outputs and gradients."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setattr(backend, "_backend", "triton")
    x, weight, bias, running, dy = _inputs((7, 3, 2, 3))
    bounds = dict(clip_norm=2.0, var_clip_norm=3.0) if clipped else {}
    stage2 = ops.Stage2(ghost_batch_size=3, **bounds)
    results = []
    for eager in (True, False):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        rm, rv = running[0].clone(), running[1].clone()
        if eager:
            y = ops.batch_norm_train(xi, rm, rv, wi, bi, 0.1, 1e-5, stage2)
        else:
            y = registrations.compiled_batch_norm_train(xi, rm, rv, wi, bi, 0.1, 1e-5, stage2)
        y.backward(dy)
        results.append((y, rm, rv, xi.grad, wi.grad, bi.grad))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_size_cache_is_not_filled_under_inference_mode(op_backend):
    """A training-mode call under inference mode must not leave tensors autograd cannot use."""
    primitives._cached_sizes.cache_clear()
    x, weight, bias, running, dy = _inputs((5, 3, 2, 2))
    with torch.inference_mode():
        SF.ghost_batch_norm(x, None, None, weight, bias, True, ghost_batch_size=2)
    assert primitives._cached_sizes.cache_info().currsize == 0
    out = _run(SF.ghost_batch_norm, x, weight, bias, running, dy, ghost_batch_size=2)
    ref = _reference(SF.ghost_batch_norm, x, weight, bias, running, dy, ghost_batch_size=2)
    _assert_same(out, ref, torch.float32)


@pytest.mark.parametrize("per_sample_stats", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_affine_grads(op_backend, per_sample_stats, channels_last):
    """Against a loop that differentiates each sample on its own."""
    x, weight, bias, _, dy = _inputs((4, 3, 3, 5), channels_last=channels_last)
    g = torch.Generator().manual_seed(5)
    shape = (4, 3) if per_sample_stats else (3,)
    mean = torch.randn(shape, generator=g).to(DEVICE)
    var = (torch.rand(shape, generator=g) + 0.5).to(DEVICE)
    grad_weight, grad_bias = ops.per_sample_affine_grads(x, dy, mean, var, 1e-5)
    for i in range(x.shape[0]):
        w_i = weight.clone().requires_grad_()
        b_i = bias.clone().requires_grad_()
        stats = (mean[i], var[i]) if per_sample_stats else (mean, var)
        y = SF.frozen_normalize(x[i : i + 1], *stats, w_i, b_i, 1e-5)
        y.backward(dy[i : i + 1])
        torch.testing.assert_close(grad_weight[i], w_i.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_bias[i], b_i.grad, atol=1e-5, rtol=1e-5)


def test_per_sample_affine_grads_shape_check():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="shape"):
        ops.per_sample_affine_grads(x, x[:1], torch.zeros(3), torch.ones(3), 1e-5)


# -- backend switch -----------------------------------------------------------------------------


def test_backend_switch():
    assert ops.get_backend() in ops.BACKENDS
    previous = ops.get_backend()
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
        x = torch.randn(4, 3, 2, 2, device=DEVICE)
        assert not ops.routes(x)
    assert ops.get_backend() == previous
    with pytest.raises(ValueError, match="unknown safenorm backend"):
        ops.set_backend("cudnn")


def test_auto_backend_keeps_eager_cpu_on_functional():
    if DEVICE != "cpu":
        pytest.skip("CPU behaviour")
    with ops.use_backend("auto"):
        assert not ops.routes(torch.zeros(2, 3))


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    if DEVICE != "cpu" or not HAS_TRITON:
        pytest.skip("CPU with triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.routes(torch.zeros(2, 3))


def test_backend_env_var():
    code = "import safenorm.ops as o; print(o.get_backend())"
    env = {**os.environ, ops.BACKEND_ENV: "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr
    env[ops.BACKEND_ENV] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown safenorm backend" in out.stderr


# -- opcheck ------------------------------------------------------------------------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=False):
        return torch.randn(shape, generator=g).to(DEVICE).requires_grad_(grad)

    x = t(5, 3, 3, 3, grad=True)
    w, b = (torch.rand(3, generator=g) + 0.5).to(DEVICE).requires_grad_(), t(3, grad=True)
    var = (torch.rand(3, generator=g) + 0.5).to(DEVICE)
    ps_var = (torch.rand(5, 3, generator=g) + 0.5).to(DEVICE)
    scale = (torch.rand(3, generator=g) + 0.5).to(DEVICE)
    return [
        ("moments", (t(5, 3, 3, 3),)),
        ("moments", (t(5, 3),)),
        ("batch_norm_train", (x, w, b, None, None, 1e-5, 2, False, math.inf, math.inf, False)),
        ("batch_norm_train", (x, w, b, t(3), scale, 1e-5, 0, True, 1.0, 2.0, False)),
        ("batch_norm_train", (x, None, None, None, None, 1e-5, 3, True, 1.0, 2.0, True)),
        ("normalize", (x, t(3), var, w, b, 1e-5)),
        ("normalize", (x, t(5, 3), ps_var, w, None, 1e-5)),
        ("affine_grad_sums", (t(5, 3, 3, 3), t(5, 3, 3, 3), t(3), var)),
        ("normalize_backward", (t(5, 3, 4), t(5, 3, 4), var, t(5, 3), t(5, 3), t(5, 3))),
        ("normalize_backward", (t(5, 3, 4), t(5, 3, 4), var, None, None, None)),
        ("frozen_normalize_backward", (t(5, 3, 4), t(5, 3, 4), t(3), var, scale)),
        # Deterministic release (no noise, one group): opcheck runs the op several times.
        ("dp_statistics", (t(5, 3), var[None].expand(5, 3).clone(), t(3), scale, 1.0, 2.0, 0.0,
                           6.0, 0, 0.25, False, True, "linear")),
        ("dp_statistics", (t(5, 3), var[None].expand(5, 3).clone(), t(3), scale, 1.0, 2.0, 0.0,
                           6.0, 0, 0.25, False, True, "log")),
        ("running_update", (t(3), var.clone(), t(2, 3), var[None].expand(2, 3).clone(),
                            torch.tensor([3.0, 2.0], device=DEVICE), 9, 0.1)),
    ]  # fmt: skip


def test_opcheck_fused_batch_norm(monkeypatch):
    """The fused ops (Triton only): schema, autograd registration, fake tensors."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setattr(backend, "_backend", "triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 2, 3, generator=g).to(DEVICE).requires_grad_()
    w = (torch.rand(3, generator=g) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(3, generator=g).to(DEVICE).requires_grad_()
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in ((x, w, b, rm, rv, 0.1, 1e-5, 3), (x, None, None, None, None, 0.1, 1e-5, 0)):
        torch.library.opcheck(torch.ops.safenorm.fused_batch_norm.default, args, test_utils=tests)
    y, mean, rstd, scale, _, _ = torch.ops.safenorm.fused_batch_norm(x, w, b, rm, rv, 0.1, 1e-5, 3)
    dy = torch.randn_like(y)
    backward_args = (dy, x.detach(), mean, rstd, scale, 3)
    torch.library.opcheck(
        torch.ops.safenorm.fused_batch_norm_backward.default, backward_args, test_utils=tests
    )


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_opcheck(impl, monkeypatch):
    if impl == "triton":
        if not HAS_TRITON:
            pytest.skip("triton not installed")
        monkeypatch.setattr(backend, "_backend", "triton")
    for name, args in _opcheck_cases():
        op = getattr(torch.ops.safenorm, name).default
        # test_aot_dispatch_dynamic is covered by the torch.compile tests (it is the slow part).
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
        if name in ("batch_norm_train", "normalize") and impl == "torch":
            tests = (*tests, "test_aot_dispatch_dynamic")
        torch.library.opcheck(op, args, test_utils=tests)


# -- layers on the kernels: the finite check folded into the combine ----------------------------

LAYERS = {
    "ghost": lambda c: __import__("safenorm").GhostBatchNorm2d(c, ghost_batch_size=3),
    "clipped": lambda c: __import__("safenorm").ClippedBatchNorm2d(c),
    "dp": lambda c: __import__("safenorm").DPBatchNorm2d(c, expected_batch_size=6),
    "dp ghost batch": lambda c: __import__("safenorm").DPBatchNorm2d(
        c, expected_batch_size=6, ghost_batch_size=3, normalize_with="batch"
    ),
}


def _layer(name, c, **kwargs):
    layer = LAYERS[name](c)
    for key, value in kwargs.items():
        setattr(layer, key, value)
    if name.startswith("dp"):
        layer.register_release_hook(lambda *_: None)
        layer.generator = torch.Generator().manual_seed(4)
    return layer.to(DEVICE)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_defaults_on_the_kernels_match_the_reference(monkeypatch, same_noise, name):
    """Two training steps of each layer in its default configuration (the check on)."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    x, _, _, _, dy = _inputs((6, 4, 3, 3))
    results = []
    for backend_name in ("triton", "torch"):
        monkeypatch.setattr(backend, "_backend", backend_name)
        layer = _layer(name, 4)
        for _ in range(2):
            xi = x.detach().clone().requires_grad_()
            layer(xi).backward(dy)
        results.append((layer(x), xi.grad, layer.weight.grad, layer.bias.grad, *layer.buffers()))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("defer", [False, True])
def test_non_finite_statistics_on_the_kernels_keep_the_buffers(monkeypatch, name, defer):
    """The combine writes nothing non-finite and undoes the counter; the layer raises (at once,
    or at its next forward when deferred as on CUDA)."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setattr(backend, "_backend", "triton")
    unclipped = {} if name == "ghost" else {"clip_norm": math.inf, "var_clip_norm": math.inf}
    if name.startswith("dp"):
        unclipped["noise_multiplier"] = 0.0  # nothing bounds a NaN then
    layer = _layer(name, 3, **unclipped)
    monkeypatch.setattr(type(layer), "_defers_check", lambda self, x: defer)
    layer(torch.randn(6, 3, 2, 2, device=DEVICE))
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, 3, 2, 2, device=DEVICE)
    x[0, 1, 0, 0] = float("nan")
    if defer:
        layer(x)
        with pytest.raises(ValueError, match="NaN or infinite"):
            layer(torch.randn(6, 3, 2, 2, device=DEVICE))
    else:
        with pytest.raises(ValueError, match="NaN or infinite"):
            layer(x)
    for key, value in saved.items():
        assert torch.equal(layer.state_dict()[key], value), key
