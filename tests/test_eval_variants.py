"""Every variant's model is what its name says, on every built-in model."""

from __future__ import annotations

import pytest
import torch
from safenorm.evaluation.config import get_profile
from safenorm.evaluation.models import MODELS, build_model
from safenorm.evaluation.variants import (
    VARIANTS,
    ChannelBias,
    describe_norm_layers,
    ensure_variant,
    get_variant,
    groupnorm_groups,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import safenorm

IN_SHAPE = {"small-cnn": (1, 8), "small-cnn-wide": (1, 8), "digits-dp-cnn": (1, 8)}


def _bn_channels(model: nn.Module) -> list[int]:
    return [m.num_features for m in model.modules() if isinstance(m, _BatchNorm)]


def _build(name: str) -> nn.Module:
    c, size = IN_SHAPE.get(name, (3, 32))
    return build_model(name, c, 10, size)


def _groupnorms(model: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


@pytest.mark.parametrize("model_name", MODELS.names())
def test_per_sample_norm_variants_are_what_they_say(model_name):
    config = get_profile("tiny")
    cpg = config.options.groupnorm_channels_per_group
    channels = _bn_channels(_build(model_name))
    assert channels, "every built-in model has BatchNorm layers to swap"
    expect = {
        "groupnorm": lambda c: (c // cpg, cpg),  # every built-in width is divisible by 4
        "instancenorm": lambda c: (c, 1),
        "layernorm": lambda c: (1, c),
    }
    for variant, shape in expect.items():
        model = get_variant(variant).prepare(_build(model_name), config)
        gns = _groupnorms(model)
        assert not _bn_channels(model) and len(gns) == len(channels), variant
        for gn, c in zip(gns, channels, strict=True):
            groups, per_group = shape(c)
            assert gn.num_channels == c and gn.num_groups == groups, (variant, c, gn)
            assert c // gn.num_groups == per_group and gn.affine
        if variant == "groupnorm":  # a real GroupNorm: neither InstanceNorm nor LayerNorm
            assert all(1 < g.num_groups < g.num_channels for g in gns)
    x = torch.randn(4, *((1, 8, 8) if IN_SHAPE.get(model_name) else (3, 32, 32)))
    assert model(x).shape == (4, 10)


@pytest.mark.parametrize("model_name", MODELS.names())
def test_none_keeps_a_per_channel_bias_and_nothing_normalizes(model_name):
    model = get_variant("none").prepare(_build(model_name), get_profile("tiny"))
    channels = _bn_channels(_build(model_name))
    biases = [m for m in model.modules() if isinstance(m, ChannelBias)]
    assert [b.num_features for b in biases] == channels
    assert not _groupnorms(model) and not _bn_channels(model)
    assert not any(isinstance(m, safenorm.SafeBatchNormBase) for m in model.modules())
    # the bias is learnable and adds per channel: output = input + bias[c]
    b = biases[0]
    assert b.bias.requires_grad
    with torch.no_grad():
        b.bias.copy_(torch.arange(b.num_features, dtype=torch.float32))
    x = torch.randn(2, b.num_features, 3, 3)
    ref = x + torch.arange(b.num_features, dtype=torch.float32).view(1, -1, 1, 1)
    torch.testing.assert_close(b(x), ref)


@pytest.mark.parametrize("model_name", MODELS.names())
def test_batch_variants_use_the_safenorm_layer_on_every_bn(model_name):
    config = get_profile("tiny")
    n = len(_bn_channels(_build(model_name)))
    for variant, cls in (
        ("ghost", safenorm.GhostBatchNorm2d),
        ("clipped", safenorm.ClippedBatchNorm2d),
        ("dp", safenorm.DPBatchNorm2d),
    ):
        model = get_variant(variant).prepare(_build(model_name), config)
        assert sum(isinstance(m, cls) for m in model.modules()) == n, variant
    assert len(_bn_channels(get_variant("bn").prepare(_build(model_name), config))) == n


def test_opacus_fix_is_labelled_for_what_opacus_builds():
    pytest.importorskip("opacus")
    variant = get_variant("dp-groupnorm")  # the old name is an alias
    assert variant.name == "opacus-fix" and variant.dp
    model = variant.prepare(_build("small-cnn"), get_profile("tiny"))
    gns = _groupnorms(model)
    # ModuleValidator.fix builds GroupNorm(min(32, C), C): InstanceNorm on 16/32/32 channels
    assert [(g.num_groups, g.num_channels) for g in gns] == [(16, 16), (32, 32), (32, 32)]
    assert describe_norm_layers(model) == "InstanceNorm 16x1, 2 x InstanceNorm 32x1"


def test_describe_norm_layers_names_the_layout():
    config = get_profile("tiny")
    gn = get_variant("groupnorm").prepare(_build("small-cnn"), config)
    assert describe_norm_layers(gn) == "GroupNorm 4x4, 2 x GroupNorm 8x4"
    ln = get_variant("layernorm").prepare(_build("small-cnn"), config)
    assert describe_norm_layers(ln) == "LayerNorm 1x16, 2 x LayerNorm 1x32"
    assert describe_norm_layers(_build("small-cnn")) == "BatchNorm2d(16), 2 x BatchNorm2d(32)"
    assert describe_norm_layers(nn.Linear(2, 2)) == "no normalization layers"


def test_groupnorm_rule():
    assert groupnorm_groups(16, 4) == 4 and groupnorm_groups(32, 4) == 8
    assert groupnorm_groups(64, 8) == 8
    assert groupnorm_groups(24, 5) == 4  # largest divisor with >= 5 channels per group (6)
    assert groupnorm_groups(6, 4) == 3  # too narrow for 4: 2 channels per group, 3 groups
    assert groupnorm_groups(4, 4) == 2
    for c in (2, 3, 7, 13):  # only InstanceNorm or LayerNorm possible: refuse, naming the layer
        with pytest.raises(ValueError, match=r"'features\.1' has"):
            groupnorm_groups(c, 4, "features.1")
    with pytest.raises(ValueError, match="instancenorm"):
        groupnorm_groups(16, 1)


def test_groupnorm_variant_refuses_a_layer_it_cannot_group():
    model = nn.Sequential(nn.Conv2d(1, 7, 3), nn.BatchNorm2d(7))
    with pytest.raises(ValueError, match="layer '1' has 7 channels"):
        get_variant("groupnorm").prepare(model, get_profile("tiny"))


def test_swept_variant_names():
    config = get_profile("tiny")
    assert ensure_variant("ghost@4") == "ghost@4" and ensure_variant("gbn@4.0") == "ghost@4"
    model = get_variant("ghost@4").prepare(_build("small-cnn"), config)
    assert {m.ghost_batch_size for m in model.modules() if hasattr(m, "ghost_batch_size")} == {4}
    half = get_variant("clipped@0.5").prepare(_build("small-cnn"), config)
    full = get_variant("clipped").prepare(_build("small-cnn"), config)
    pairs = [
        (h, f)
        for h, f in zip(half.modules(), full.modules(), strict=True)
        if isinstance(f, safenorm.ClippedBatchNorm2d)
    ]
    assert len(pairs) == 3
    for h, f in pairs:  # the layer defaults are 2 sqrt(C) and 4 sqrt(C)
        c = f.num_features
        assert f.clip_norm == pytest.approx(2 * c**0.5) and f.var_clip_norm == pytest.approx(
            4 * c**0.5
        )
        assert h.clip_norm == pytest.approx(f.clip_norm / 2)
        assert h.var_clip_norm == pytest.approx(f.var_clip_norm / 2)
    with pytest.raises(ValueError, match="no swept parameter"):
        ensure_variant("groupnorm@2")
    with pytest.raises(ValueError, match="not a number"):
        ensure_variant("ghost@x")
    with pytest.raises(KeyError, match="known variants"):
        ensure_variant("nonexistent@2")


def test_every_registered_variant_is_inspected():
    tested = {"bn", "ghost", "clipped", "dp", "opacus-fix", "groupnorm", "instancenorm"}
    tested |= {"layernorm", "none"}
    base = {n for n in VARIANTS.names() if "@" not in n and not n.startswith("test-")}
    assert base <= tested, f"variants without a test of their modules: {base - tested}"
