"""Per-sample gradients of models with DP layers are exact (hooks and ghost modes, frozen mode)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm
from safenorm import functional as SF
from safenorm import privacy

pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleHooks
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

from safenorm.opacus import PrivacyEngine

N, BATCH = 64, 16


def cnn(**dp_kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    # Non-trivial statistics, declared public so the conversion keeps them.
    return safenorm.convert_batchnorm(model, "dp", statistics_are_public=True, **dp_kwargs)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 6, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


class FixedNorm(nn.Module):
    """Normalizes with given (released) statistics: the per-sample reference."""

    def __init__(self, layer: safenorm.DPBatchNorm, mean, var):
        super().__init__()
        self.weight, self.bias, self.eps = layer.weight, layer.bias, layer.eps
        self.mean, self.var, self.row = mean, var, None

    def forward(self, x):
        mean, var = self.mean, self.var
        if mean.dim() == 2:
            mean, var = mean[self.row : self.row + 1], var[self.row : self.row + 1]
        return SF.frozen_normalize(x, mean, var, self.weight, self.bias, self.eps)


def reference_per_sample_grads(ref: nn.Module, stats: dict, x, y) -> dict[str, torch.Tensor]:
    """Loop over samples, each through the model with the statistics this batch released."""
    for name, (mean, var) in stats.items():
        parent, _, child = name.rpartition(".")
        owner = ref.get_submodule(parent) if parent else ref
        setattr(owner, child, FixedNorm(owner.get_submodule(child), mean, var))
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, _ in ref.named_parameters()}
    for i in range(x.shape[0]):
        for m in ref.modules():
            if isinstance(m, FixedNorm):
                m.row = i
        ref.zero_grad()
        F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in ref.named_parameters():
            grads[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def private_batch(mode: str, **dp_kwargs):
    model = cnn(**dp_kwargs)
    ref = copy.deepcopy(model)
    x, y = data()
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1.0,
        max_grad_norm=1e6,
        grad_sample_mode=mode,
        poisson_sampling=False,
    )
    gs_model = out[0]
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    xb, yb = x[:BATCH], y[:BATCH]
    loss = criterion(gs_model(xb), yb)
    stats = {name: layer.last_statistics for name, layer in privacy.dp_layers(model)}
    loss.backward()
    return model, ref, stats, xb, yb, gs_model


@pytest.mark.parametrize(
    "dp_kwargs",
    [
        {},
        {"normalize_with": "batch"},
        {"normalize_with": "batch", "ghost_batch_size": 4},
    ],
    ids=["running", "batch", "ghost-groups"],
)
def test_hooks_per_sample_gradients_equal_per_sample_loop(dp_kwargs):
    model, ref, stats, x, y, _ = private_batch("hooks", **dp_kwargs)
    if "ghost_batch_size" in dp_kwargs:
        assert all(mean.dim() == 2 for mean, _ in stats.values())
    expected = reference_per_sample_grads(ref, stats, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], atol=1e-5, rtol=1e-4)


def test_ghost_per_sample_norms_equal_per_sample_loop():
    _, ref, stats, x, y, gs_model = private_batch("ghost")
    expected = reference_per_sample_grads(ref, stats, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).norm(dim=0)
    torch.testing.assert_close(gs_model.per_sample_gradient_norms, norms, atol=1e-5, rtol=1e-4)


def test_two_forwards_per_step_use_their_own_statistics():
    model = cnn(normalize_with="batch")
    ref = copy.deepcopy(model)
    x, y = data()
    engine = PrivacyEngine(accountant="rdp")
    gs_model, _, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    xb, yb = x[:BATCH], y[:BATCH]
    out1 = gs_model(xb)
    stats1 = {n: layer.last_statistics for n, layer in privacy.dp_layers(model)}
    out2 = gs_model(xb)
    stats2 = {n: layer.last_statistics for n, layer in privacy.dp_layers(model)}
    (F.cross_entropy(out1, yb) + F.cross_entropy(out2, yb)).backward()
    g1 = reference_per_sample_grads(copy.deepcopy(ref), stats1, xb, yb)
    g2 = reference_per_sample_grads(copy.deepcopy(ref), stats2, xb, yb)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, g1[name] + g2[name], atol=1e-5, rtol=1e-4)


# -- frozen-statistics mode ------------------------------------------------------------------------


def test_frozen_mode_passes_opacus_checker(monkeypatch):
    # Opacus' checker wraps with strict validation, which rejects any layer with buffers; the
    # engine replaces that check by validate_model (DP layers' buffers are released values).
    monkeypatch.setattr(GradSampleHooks, "validate", classmethod(lambda cls, module, strict: []))
    model = cnn(frozen_statistics=True)
    x, _ = data()
    assert check_per_sample_gradients_are_correct(x[:8], model, grad_sample_mode="hooks")


def test_frozen_mode_uses_loaded_statistics_and_costs_nothing():
    plain = cnn()  # same seed: same weights; a "pre-trained" plain-BN state_dict
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    model = cnn(frozen_statistics=True)
    model.load_state_dict(state)
    x, y = data()
    layer, h = model[1], model[0](x[:4]).detach()
    out = layer(h)
    expected = F.batch_norm(
        h,
        state["1.running_mean"],
        state["1.running_var"],
        layer.weight,
        layer.bias,
        False,
        0.0,
        layer.eps,
    )
    assert torch.equal(out, expected)

    engine = PrivacyEngine(accountant="rdp")
    gs_model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1.3,
        max_grad_norm=1.0,
    )
    steps = 0
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(gs_model(xb), yb).backward()
        opt.step()
        steps += 1
    buffers = {k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    assert all(torch.equal(v, state[k]) for k, v in buffers.items())
    assert not torch.equal(model[1].weight, state["1.weight"])  # the affine parameters trained
    grad_only = RDPAccountant()
    grad_only.history = [(1.3, BATCH / N, steps)]
    assert engine.get_epsilon(1e-5) == pytest.approx(grad_only.get_epsilon(1e-5), rel=1e-12)
    assert all(layer.release_count == 0 for _, layer in privacy.dp_layers(model))


def test_state_dict_keys_are_batchnorm_keys():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.randn(2, 3, 5, 5))
    keys = list(plain.state_dict().keys())
    model = safenorm.convert_batchnorm(copy.deepcopy(plain), "dp")
    assert list(model.state_dict().keys()) == keys
    engine = PrivacyEngine(accountant="rdp")
    x, y = torch.randn(8, 3, 5, 5), torch.randint(0, 2, (8,))
    engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert list(model.state_dict().keys()) == keys
    plain.load_state_dict(model.state_dict())
