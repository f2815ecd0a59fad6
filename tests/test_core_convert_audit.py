"""convert_batchnorm on a ResNet-style model, and find_unsafe_layers vs Opacus' own validator."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import safenorm


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class _MyBatchNorm(nn.BatchNorm2d):
    """A subclass that only renames: Opacus' exact-type validator misses it."""


def small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _Block(8),
        _Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 10),
    )


def _trained(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["ghost", "clipped", "dp"])
def test_converted_resnet_is_exact_in_eval_and_state_dicts_cross_load(kind):
    original = _trained(small_resnet())
    public = {"statistics_are_public": True} if kind == "dp" else {}  # else reset: see below
    converted = safenorm.convert_batchnorm(copy.deepcopy(original), kind, **public)
    kinds = {type(m).__name__ for m in converted.modules()}
    prefix = {"ghost": "Ghost", "clipped": "Clipped", "dp": "DP"}[kind]
    assert {f"{prefix}BatchNorm2d", f"{prefix}BatchNorm1d"} <= kinds
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(converted(x), original(x))

    fresh = small_resnet().eval()
    fresh.load_state_dict(converted.state_dict())
    assert torch.equal(fresh(x), original(x))
    target = safenorm.convert_batchnorm(small_resnet(), kind).eval()
    target.load_state_dict(original.state_dict())
    assert torch.equal(target(x), original(x))


def test_conversion_shares_parameters_and_keeps_flags_device_dtype():
    model = small_resnet().double()
    model[3].bn1.weight.requires_grad_(False)
    model[3].bn2.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    converted = safenorm.convert_batchnorm(
        model, "dp", noise_multiplier=3.0, statistics_are_public=True
    )
    assert converted is model
    for name, p in converted.named_parameters():
        assert p is params[name]
    for name, b in converted.named_buffers():
        assert b is buffers[name]
    assert not converted[3].bn1.weight.requires_grad
    assert converted[3].bn2.training is False and converted[3].bn1.training is True
    assert converted[1].running_mean.dtype == torch.float64
    assert converted[1].noise_multiplier == 3.0 and converted[3].bn1.layer_name == "3.bn1"
    # The existing optimizer still trains the converted model.
    before = converted[1].weight.detach().clone()
    converted.eval()
    converted(torch.randn(4, 3, 8, 8, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, converted[1].weight)


def test_dp_conversion_resets_trained_statistics_unless_declared_public():
    """Before: a trained BN's raw running statistics seeded the DP layer's EMA, clip reference
    and variance floor (and shipped), while the docs said they start from constants."""
    original = _trained(small_resnet())
    saved = {k: v.clone() for k, v in original.state_dict().items()}
    with pytest.warns(safenorm.PrivacyWarning, match="reset to their initial values"):
        converted = safenorm.convert_batchnorm(copy.deepcopy(original), "dp")
    for name, module in converted.named_modules():
        if isinstance(module, safenorm.DPBatchNorm):
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean)), name
            assert torch.equal(module.running_var, torch.ones_like(module.running_var)), name
            assert int(module.num_batches_tracked) == 0
    for key, value in original.state_dict().items():  # the source model is left as it was
        assert torch.equal(value, saved[key]), key
    frozen = safenorm.convert_batchnorm(copy.deepcopy(original), "dp", frozen_statistics=True)
    kept = safenorm.convert_batchnorm(copy.deepcopy(original), "dp", statistics_are_public=True)
    for model in (frozen, kept):
        assert torch.equal(model[1].running_mean, original[1].running_mean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # untrained statistics: reset silently
        safenorm.convert_batchnorm(small_resnet(), "dp")
    with pytest.raises(ValueError, match="kind='dp' only"):
        safenorm.convert_batchnorm(small_resnet(), "clipped", statistics_are_public=True)


def test_root_sync_and_subclass_conversion():
    root = safenorm.convert_batchnorm(nn.BatchNorm2d(4), "ghost", ghost_batch_size=2)
    assert type(root) is safenorm.GhostBatchNorm2d and root.ghost_batch_size == 2
    sync = safenorm.convert_batchnorm(nn.SyncBatchNorm(4), "clipped")
    assert type(sync) is safenorm.ClippedBatchNorm  # rank-agnostic: SyncBatchNorm takes any rank
    assert sync(torch.randn(3, 4, 2, 2, 2)).shape == (3, 4, 2, 2, 2)
    sub = safenorm.convert_batchnorm(nn.Sequential(_MyBatchNorm(4)), "dp")
    assert type(sub[0]) is safenorm.DPBatchNorm2d
    again = safenorm.convert_batchnorm(sub, "clipped")
    assert type(again[0]) is safenorm.ClippedBatchNorm2d


def test_subclass_with_its_own_forward_warns():
    class BatchNormRelu(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    with pytest.warns(safenorm.ConversionWarning, match="its own forward"):
        safenorm.convert_batchnorm(nn.Sequential(BatchNormRelu(3)), "ghost")


def test_unknown_kind_and_uninitialized_lazy_layer():
    with pytest.raises(ValueError, match="known kinds"):
        safenorm.convert_batchnorm(nn.BatchNorm2d(3), "groupnorm")
    with pytest.raises(ValueError, match="uninitialized"):
        safenorm.convert_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()), "dp")
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    lazy(torch.randn(2, 3, 2, 2))
    assert type(safenorm.convert_batchnorm(lazy, "dp")[0]) is safenorm.DPBatchNorm2d


def _kinds_by_name(model):
    found: dict[str, set[str]] = {}
    for finding in safenorm.find_unsafe_layers(model):
        found.setdefault(finding.name, set()).add(finding.kind)
    return found


@pytest.mark.parametrize("case", ["affine-false", "frozen-in-train", "subclass", "plain"])
def test_audit_reports_what_opacus_validator_misses(case):
    from opacus.validators import ModuleValidator

    layer = {
        "affine-false": lambda: nn.BatchNorm2d(4, affine=False),
        "frozen-in-train": lambda: nn.BatchNorm2d(4).requires_grad_(False),
        "subclass": lambda: _MyBatchNorm(4),
        "plain": lambda: nn.BatchNorm2d(4),
    }[case]()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer)
    opacus_errors = ModuleValidator.validate(model, strict=False)
    assert len(opacus_errors) == (1 if case == "plain" else 0)  # Opacus misses all but plain BN
    findings = safenorm.find_unsafe_layers(model)
    assert {f.kind for f in findings} == {"couples-samples", "releases-statistics"}
    assert all(f.name == "1" for f in findings)
    text = " ".join(str(f) for f in findings)
    expected = {
        "affine-false": "no affine parameters",
        "frozen-in-train": "frozen",
        "subclass": "subclass",
        "plain": 'convert_batchnorm(model, "dp")',
    }[case]
    assert expected in text


def test_audit_of_eval_layers_variants_and_instancenorm():
    bn_eval = nn.BatchNorm2d(4).eval()
    model = nn.Sequential(
        bn_eval,
        safenorm.GhostBatchNorm2d(4),
        safenorm.ClippedBatchNorm2d(4),
        safenorm.DPBatchNorm2d(4),
        safenorm.DPBatchNorm2d(4, noise_multiplier=0.0),
        nn.InstanceNorm2d(4, track_running_stats=True),
        nn.GroupNorm(2, 4),
    )
    found = _kinds_by_name(model)
    assert found["0"] == {"releases-statistics"}
    assert found["1"] == found["2"] == {"couples-samples", "releases-statistics"}
    assert "3" not in found and found["4"] == {"couples-samples"}
    assert found["5"] == {"releases-statistics"} and "6" not in found
    assert safenorm.find_unsafe_layers(safenorm.convert_batchnorm(small_resnet(), "dp")) == []


def test_conversion_can_override_eps_and_momentum_only():
    model = safenorm.convert_batchnorm(
        nn.Sequential(nn.BatchNorm2d(3)), "dp", momentum=0.3, eps=1e-3
    )
    assert model[0].momentum == 0.3 and model[0].eps == 1e-3
    with pytest.raises(ValueError, match="cannot be overridden"):
        safenorm.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), "ghost", affine=False)
