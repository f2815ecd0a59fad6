"""Data loaders, canaries, configs and the variant registry of safenorm.evaluation."""

import numpy as np
import pytest
import torch
from safenorm.evaluation.canaries import CANARIES, build_universe, membership_masks
from safenorm.evaluation.config import (
    CanaryConfig,
    DataConfig,
    EvalConfig,
    apply_overrides,
    get_profile,
)
from safenorm.evaluation.data import load_dataset, write_cifar10_batches
from safenorm.evaluation.models import ResNet, SmallCNN, build_model
from safenorm.evaluation.variants import VARIANTS, Variant, get_variant, register_variant
from torch import nn


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 50)
    tx = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    ty = rng.integers(0, 10, 20)
    write_cifar10_batches(tmp_path / "cifar-10-batches-py", x, y, tx, ty)
    return tmp_path, x, y, tx, ty


def test_cifar10_pickle_loader(cifar_dir):
    parent, x, y, _tx, ty = cifar_dir
    for root in (parent, parent / "cifar-10-batches-py"):  # the directory or its parent
        ds = load_dataset(DataConfig(dataset="cifar10", root=str(root)))
        assert ds.x.shape == (50, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
        np.testing.assert_allclose(ds.x.numpy(), x / 255.0, atol=1e-6)
        np.testing.assert_array_equal(ds.y.numpy(), y)
        np.testing.assert_array_equal(ds.test_y.numpy(), ty)
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        load_dataset(DataConfig(dataset="cifar10", root=str(parent / "missing")))


def test_digits_and_synthetic():
    digits = load_dataset(DataConfig(dataset="digits"))
    assert digits.x.shape == (1797, 1, 8, 8) and digits.num_classes == 10
    assert digits.x.min() >= 0 and digits.x.max() <= 1
    synth = load_dataset(DataConfig(dataset="synth", synthetic_size=100))
    again = load_dataset(DataConfig(dataset="synthetic", synthetic_size=100))
    assert torch.equal(synth.x, again.x) and synth.num_classes == 4


def test_universe_layout_and_canaries(cifar_dir):
    ds = load_dataset(DataConfig(dataset="digits"))
    cc = CanaryConfig(per_type=5, references_per_type=9)
    u = build_universe(ds, DataConfig(pool_size=300, test_size=100), cc, seed=0)
    assert len(u.indices("pool")) == 300 and len(u.indices("test")) == 100
    assert len(u.indices("canary")) == 20 and len(u.indices("reference")) == 36
    assert u.num_candidates == 320 and u.canary_types == ["mislabeled", "noise", "blank", "ood"]
    assert u.indices("canary").min() == 300  # candidates come first
    pool = u.x[u.indices("pool")]
    assert pool.mean().abs() < 1e-4 and (pool.std() - 1).abs() < 0.05
    blank = u.x[u.indices("canary")][u.canary_type[u.indices("canary")] == "blank"]
    assert torch.all(blank.flatten(1).std(1) < 1e-5)  # constant images
    again = build_universe(ds, DataConfig(pool_size=300, test_size=100), cc, seed=0)
    assert torch.equal(u.x, again.x) and torch.equal(u.y, again.y)
    # a CIFAR-style dataset with an official test split
    parent = cifar_dir[0]
    cif = load_dataset(DataConfig(dataset="cifar10", root=str(parent)))
    uc = build_universe(
        cif,
        DataConfig(pool_size=20, test_size=10),
        CanaryConfig(per_type=2, references_per_type=3),
        seed=1,
    )
    assert uc.x.shape[1:] == (3, 32, 32) and len(uc.indices("test")) == 10
    with pytest.raises(ValueError, match="held-out"):
        build_universe(
            cif,
            DataConfig(pool_size=45, test_size=10),
            CanaryConfig(per_type=4, references_per_type=4),
            seed=1,
        )
    assert CANARIES.canonical("label-flip") == "mislabeled"


def test_membership_masks_are_stable_and_fair():
    a = membership_masks(8, 5000, seed=3)
    b = membership_masks(12, 5000, seed=3)
    np.testing.assert_array_equal(a, b[:8])  # adding models keeps earlier ones
    assert abs(a.mean() - 0.5) < 0.01
    assert not np.array_equal(a[0], a[1])


def test_config_round_trip_and_overrides():
    cfg = get_profile("quick")
    assert EvalConfig.from_dict(cfg.to_dict()) == cfg
    new = apply_overrides(
        cfg,
        [
            "train.epochs=3",
            "attacks.fprs=0.1,0.01",
            "variants=bn,gn",
            "options.clip_norm=2.5",
            "attacks.train_mode_queries=false",
        ],
    )
    assert new.train.epochs == 3 and new.attacks.fprs == (0.1, 0.01)
    assert new.variants == ("bn", "gn") and new.options.clip_norm == 2.5
    assert new.attacks.train_mode_queries is False
    assert cfg.model_fingerprint("bn") != new.model_fingerprint("bn")
    assert cfg.model_fingerprint("bn") != cfg.model_fingerprint("ghost")
    more = apply_overrides(cfg, ["num_models=64", "attacks.ci=bootstrap"])
    assert more.model_fingerprint("bn") == cfg.model_fingerprint("bn")  # cache reused
    with pytest.raises(KeyError, match="unknown config field"):
        apply_overrides(cfg, ["train.epoch=3"])


def test_models_use_batchnorm():
    for model, x in (
        (build_model("auto", 1, 10, 8), torch.randn(4, 1, 8, 8)),
        (build_model("auto", 3, 10, 32), torch.randn(4, 3, 32, 32)),
    ):
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert model(x).shape == (4, 10)
    assert isinstance(build_model("cnn", 1, 10), SmallCNN)
    assert isinstance(build_model("resnet", 3, 10), ResNet)


@pytest.mark.parametrize(
    "name",
    ["bn", "ghost", "clipped", "groupnorm", "instancenorm", "layernorm", "none", "opacus-fix"],
)
def test_variants_convert_and_run(name):
    variant = get_variant(name)
    if variant.unavailable_reason():
        pytest.skip(variant.unavailable_reason())
    model = variant.prepare(SmallCNN(1, 10), get_profile("tiny"))
    out = model.train()(torch.randn(8, 1, 8, 8))
    assert out.shape == (8, 10)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == (name == "bn")


def test_dp_variant_converts():
    pytest.importorskip("safenorm.opacus")
    import safenorm

    variant = get_variant("dp-bn")
    assert variant.name == "dp" and variant.dp and variant.unavailable_reason() is None
    model = variant.prepare(SmallCNN(1, 10), get_profile("tiny"))
    assert any(isinstance(m, safenorm.DPBatchNorm2d) for m in model.modules())


def test_variant_registry():
    assert set(VARIANTS.names()) >= {
        "bn",
        "ghost",
        "clipped",
        "dp",
        "opacus-fix",
        "groupnorm",
        "instancenorm",
        "layernorm",
        "none",
    }
    assert VARIANTS.canonical("GN") == "groupnorm"
    with pytest.raises(KeyError, match="known variants: bn, ghost, clipped, dp"):
        get_variant("batchrenorm")
    custom = Variant("test-instancenorm", "InstanceNorm", lambda m, c: m)
    register_variant(custom, aliases=("test-in",))
    try:
        assert get_variant("test-in") is custom
        with pytest.raises(ValueError, match="already registered"):
            register_variant(custom)
    finally:
        VARIANTS._items.pop("test-instancenorm")
        VARIANTS._aliases.pop("test-in")
    missing = Variant("x", "x", lambda m, c: m, requires=("not_a_module_xyz",))
    assert "not_a_module_xyz" in missing.unavailable_reason()
