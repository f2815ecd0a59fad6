"""What safenorm.opacus.PrivacyEngine refuses, and the warnings it gives."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm

pytest.importorskip("opacus")

import opacus
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators.errors import UnsupportedModuleError

from safenorm.opacus import CouplingLayerError, PrivacyEngine, VirtualStepError


def loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def make(norm: nn.Module, channels: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), norm, nn.Flatten(), nn.Linear(channels * 16, 2)
    )


def make_private(engine, model, **kw):
    return engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(**kw),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )


class BNSubclass(nn.BatchNorm2d):
    pass


def frozen_bn_in_train_mode():
    bn = nn.BatchNorm2d(4)
    bn.requires_grad_(False)
    return bn


@pytest.mark.parametrize(
    ("norm", "fix"),
    [
        (nn.BatchNorm2d(4), 'convert_batchnorm(model, "dp")'),
        (nn.BatchNorm2d(4, affine=False), 'convert_batchnorm(model, "dp")'),
        (frozen_bn_in_train_mode(), 'convert_batchnorm(model, "dp")'),
        (BNSubclass(4), 'convert_batchnorm(model, "dp")'),
        (nn.BatchNorm2d(4).eval(), "frozen_statistics=True"),
        (safenorm.GhostBatchNorm2d(4, ghost_batch_size=2), 'convert_batchnorm(model, "dp")'),
        (safenorm.ClippedBatchNorm2d(4), 'convert_batchnorm(model, "dp")'),
        (safenorm.DPBatchNorm2d(4, noise_multiplier=0.0), "noise_multiplier > 0"),
    ],
    ids=[
        "bn",
        "bn-affine-false",
        "bn-frozen-train",
        "bn-subclass",
        "bn-eval",
        "ghost",
        "clipped",
        "dp-zero-noise",
    ],
)
def test_coupling_layers_rejected_with_name_and_conversion(norm, fix):
    model = make(norm)
    with pytest.raises(CouplingLayerError) as info:
        make_private(PrivacyEngine(), model)
    message = str(info.value)
    assert "1 (" in message  # the layer's name in the model
    assert type(norm).__name__ in message
    assert fix in message
    assert isinstance(info.value, UnsupportedModuleError)  # catchable as Opacus' error


def test_plain_opacus_rejects_both_bn_and_dp_layers():
    with pytest.raises(UnsupportedModuleError):
        make_private(opacus.PrivacyEngine(), make(nn.BatchNorm2d(4)))
    with pytest.raises(NotImplementedError, match="buffers"):
        make_private(opacus.PrivacyEngine(), make(safenorm.DPBatchNorm2d(4)))
    make_private(PrivacyEngine(), make(safenorm.DPBatchNorm2d(4)))  # accepted


def test_opacus_other_checks_kept():
    class WithBuffer(nn.Linear):
        def __init__(self):
            super().__init__(64, 2)
            self.register_buffer("stat", torch.zeros(2))

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), WithBuffer())
    with pytest.raises(CouplingLayerError, match="buffers"):
        make_private(PrivacyEngine(), model)
    with pytest.raises(CouplingLayerError, match="training mode"):
        make_private(PrivacyEngine(), make(safenorm.DPBatchNorm2d(4)).eval())


def test_functorch_fallback_never_handles_a_dp_layer():
    class Custom(nn.Module):  # own parameter, no grad sampler: Opacus would use functorch
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.norm = safenorm.DPBatchNorm2d(4)

        def forward(self, x):
            return self.norm(x) * self.scale

    with pytest.raises(CouplingLayerError, match="functorch"):
        make_private(PrivacyEngine(), make(Custom()))
    with pytest.raises(ValueError, match="grad_sample_mode"):
        model = make(safenorm.DPBatchNorm2d(4))
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="functorch",
        )


def test_get_compatible_module_converts_to_dp():
    model = PrivacyEngine.get_compatible_module(make(nn.BatchNorm2d(4)))
    assert isinstance(model[1], safenorm.DPBatchNorm2d)


def train_with_bmm(model, physical):
    engine = PrivacyEngine(accountant="rdp")
    gs_model, opt, dp_loader = make_private(engine, model, n=64, batch=32)
    with BatchMemoryManager(
        data_loader=dp_loader, max_physical_batch_size=physical, optimizer=opt
    ) as memory_safe_loader:
        for x, y in memory_safe_loader:
            opt.zero_grad()
            F.cross_entropy(gs_model(x), y).backward()
            opt.step()
    return engine


def test_batch_memory_manager_refused_when_layers_release():
    with pytest.raises(VirtualStepError, match="BatchMemoryManager"):
        train_with_bmm(make(safenorm.DPBatchNorm2d(4)), physical=4)
    # Unsplit too: its batches come from its own loader, not tied to the step's Poisson batch.
    with pytest.raises(VirtualStepError, match="Iterate the data loader returned"):
        train_with_bmm(make(safenorm.DPBatchNorm2d(4)), physical=1000)
    engine = train_with_bmm(make(safenorm.DPBatchNorm2d(4, frozen_statistics=True)), physical=4)
    assert engine.accountant.history[0][0] == 1.0  # frozen: gradient noise only


def test_dp_layer_without_accountant_warns_once_loudly():
    layer = safenorm.DPBatchNorm2d(4, expected_batch_size=8)
    x = torch.randn(8, 4, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
        layer(x)
    unaccounted = [w for w in caught if "UNACCOUNTED PRIVACY COST" in str(w.message)]
    assert len(unaccounted) == 1
    assert issubclass(unaccounted[0].category, safenorm.PrivacyWarning)


def test_engine_attached_layer_does_not_warn():
    engine = PrivacyEngine(accountant="rdp")
    gs_model, opt, dp_loader = make_private(engine, make(safenorm.DPBatchNorm2d(4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in dp_loader:
            opt.zero_grad()
            F.cross_entropy(gs_model(x), y).backward()
            opt.step()
    assert not [w for w in caught if issubclass(w.category, safenorm.PrivacyWarning)]
