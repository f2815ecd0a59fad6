"""End-to-end behaviour of the harness on small, fast configurations."""

import numpy as np
import pytest
import torch
from safenorm.evaluation import (
    Harness,
    ImageDataset,
    apply_overrides,
    exposure,
    get_profile,
    reference_exposure,
    write_report,
)
from torch import nn


def _digits_config(variants=("bn",), models=8):
    return apply_overrides(
        get_profile("tiny"),
        [
            f"variants={','.join(variants)}",
            f"num_models={models}",
            "data.dataset=digits",
            "data.pool_size=300",
            "data.test_size=200",
            "canaries.per_type=8",
            "canaries.references_per_type=31",
            "train.epochs=30",
            "train.batch_size=32",
            "attacks.train_mode_queries=false",
            "analysis.grad_models=1",
        ],
    )


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit")
    harness = Harness(_digits_config(), out, progress=False)
    harness.run()
    return harness, harness.analyze()["bn"]


def test_overfit_bn_model_memorizes_canaries(overfit_run):
    _, result = overfit_run
    s = result.summary
    assert s["test_acc"]["mean"] > 0.8
    for attack in ("loss", "lira-online"):
        assert s["membership"]["eval"][attack]["canaries"]["auc"]["value"] > 0.75, attack
    exp = s["exposure"]
    assert exp["in"] > exp["reference"] + 1.0  # inserted canaries rank above the references
    assert abs(exp["out"] - exp["reference"]) < 0.5  # canaries a model did not see: chance
    g = s["gradients"]["grad_norm_train"]
    assert g["canary_median"] > g["typical_median"]
    assert s["gradients"]["influence"]["typical_median"] > 0  # BN couples the batch


def test_model_that_never_saw_canaries_has_reference_exposure(overfit_run):
    harness, _ = overfit_run
    u = harness.universe
    keep = np.zeros(u.num_candidates, dtype=bool)
    keep[: len(u.indices("pool"))] = np.random.default_rng(5).random(len(u.indices("pool"))) < 0.5
    arrays = harness.train_one("bn", 99, keep)
    scores = arrays["score_eval"]
    exposures = []
    for t in u.canary_types:
        c = u.indices("canary")[u.canary_type[u.indices("canary")] == t]
        r = u.indices("reference")[u.canary_type[u.indices("reference")] == t]
        exposures.append(exposure(scores[c], scores[r]))
    mean = float(np.concatenate(exposures).mean())
    assert mean == pytest.approx(reference_exposure(31), abs=0.6)


@pytest.mark.parametrize("variant", ["opacus-fix", "dp"])
def test_dp_audit_bound_never_exceeds_accountant_epsilon(tmp_path, variant):
    pytest.importorskip("opacus")
    if variant == "dp":
        pytest.importorskip("safenorm.opacus")
    cfg = apply_overrides(
        get_profile("tiny"),
        [f"variants={variant}", "num_models=3", "dp.epochs=3", "dp.noise_multiplier=0.8"],
    )
    harness = Harness(cfg, tmp_path, progress=False)
    harness.run()
    s = harness.analyze()[variant].summary
    assert s["epsilon"] is not None and 0 < s["epsilon"] < float("inf")
    assert s["audit"]["epsilon"] <= s["epsilon"]
    assert all(e <= s["epsilon"] for e in s["audit"]["per_model"])


class _UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 3),
        )

    def forward(self, x):
        return self.body(x)


def test_python_api_with_user_model_and_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (260,), generator=g)
    x = torch.rand(3, 1, 6, 6, generator=g)[y] + 0.2 * torch.randn(260, 1, 6, 6, generator=g)
    data = ImageDataset(x=x.clamp(0, 1), y=y, num_classes=3, name="mine")
    cfg = apply_overrides(
        get_profile("tiny"),
        ["variants=bn,ghost,none", "num_models=2", "data.pool_size=120", "data.test_size=60"],
    )
    harness = Harness(cfg, tmp_path, data=data, model_fn=_UserNet, progress=False)
    assert harness.run() == 6
    results = harness.analyze()
    assert set(results) == {"bn", "ghost", "none"}
    assert results["none"].summary["gradients"]["influence"]["typical_median"] == 0.0
    path = write_report(tmp_path, cfg, results, harness.unavailable(), plots=False)
    assert "| **ghost** |" in path.read_text()


@pytest.mark.slow
def test_quick_profile_dp_variants_leak_less_than_bn(tmp_path):
    """The quick protocol on bn and the DP variants (minutes on a 2-core CPU)."""
    pytest.importorskip("opacus")
    variants = ["bn", "opacus-fix"]
    try:
        import safenorm.opacus  # noqa: F401

        variants.append("dp")
    except ImportError:
        pass
    cfg = apply_overrides(get_profile("quick"), [f"variants={','.join(variants)}"])
    harness = Harness(cfg, tmp_path, progress=False)
    harness.run()
    results = harness.analyze()
    bn = results["bn"].summary
    assert bn["membership"]["eval"]["lira-online"]["canaries"]["auc"]["value"] > 0.9
    for name in variants[1:]:
        s = results[name].summary
        assert s["audit"]["epsilon"] <= s["epsilon"]
        assert s["exposure"]["in"] < bn["exposure"]["in"]
        auc = s["membership"]["eval"]["lira-online"]["pool"]["auc"]["value"]
        assert auc < bn["membership"]["eval"]["lira-online"]["pool"]["auc"]["value"]
