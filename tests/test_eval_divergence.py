"""A diverged model is recorded (step, layer), left out of the attacks, and the run goes on."""

from __future__ import annotations

import pytest
import torch
from safenorm.evaluation import Harness, apply_overrides, cli, get_profile, write_report
from safenorm.evaluation.training import DivergenceError, first_nonfinite_module
from safenorm.evaluation.variants import VARIANTS, Variant, register_variant
from torch import Tensor, nn

DIVERGE_STEP = 3


class FailAt(nn.Module):
    """Identity until its ``step``-th training forward, then NaN (or a safenorm-style error)."""

    def __init__(self, step: int, armed: bool, raise_error: bool) -> None:
        super().__init__()
        self.step, self.armed, self.raise_error, self.calls = step, armed, raise_error, 0

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.armed:
            self.calls += 1
            if self.calls > self.step:
                if self.raise_error:
                    raise ValueError(
                        "ClippedBatchNorm2d 'features.4': batch statistics are NaN or infinite; "
                        "the input (or an earlier layer) produced non-finite values"
                    )
                return x * float("nan")
        return x


def _variant(name: str, seeds: set[int], raise_error: bool = False) -> str:
    # the harness seeds torch with the model's seed right before prepare: it picks the models
    def prepare(model: nn.Module, config) -> nn.Module:
        armed = torch.initial_seed() in seeds
        return nn.Sequential(model, FailAt(DIVERGE_STEP, armed, raise_error))

    register_variant(Variant(name, "diverges on chosen models", prepare), overwrite=True)
    return name


@pytest.fixture
def config():
    cfg = apply_overrides(
        get_profile("tiny"), ["num_models=4", "analysis.grad_models=0", "variants=bn"]
    )
    yield cfg
    for name in [n for n in VARIANTS.names() if n.startswith("test-div")]:
        VARIANTS._items.pop(name)


def test_diverged_model_is_recorded_and_excluded(tmp_path, config):
    probe = Harness(config, tmp_path / "probe", progress=False)
    name = _variant("test-div-nan", {probe.model_seed(1)})
    cfg = apply_overrides(config, [f"variants=bn,{name}"])
    harness = Harness(cfg, tmp_path, progress=False)
    assert harness.run() == 8  # the run went on past the diverged model
    div = harness.diverged(name)
    assert div == [{"index": 1, "step": DIVERGE_STEP, "layer": "1", "reason": div[0]["reason"]}]
    assert "loss is nan" in div[0]["reason"]
    assert harness.diverged("bn") == []
    results = harness.analyze()
    s = results[name].summary
    assert s["num_models"] == 3 and s["diverged"]["count"] == 1 and s["diverged"]["of"] == 4
    assert results["bn"].summary["num_models"] == 4
    # the attacks saw the three converged models only
    assert results[name].raw["keep"].shape[0] == 3
    path = write_report(tmp_path, cfg, results, plots=False)
    text = path.read_text()
    assert f"| **{name}** (1/4 diverged) |" in text
    assert (
        "1 of 4 models diverged** and are excluded from the attacks "
        f"(#1 at step {DIVERGE_STEP} in 1)" in text
    )
    assert harness.run() == 0  # cached: a resumed run does not retrain the diverged model


def test_safenorm_layer_error_names_its_layer(tmp_path, config):
    probe = Harness(config, tmp_path / "probe", progress=False)
    name = _variant("test-div-err", {probe.model_seed(0), probe.model_seed(2)}, raise_error=True)
    cfg = apply_overrides(config, [f"variants={name}"])
    harness = Harness(cfg, tmp_path, progress=False)
    harness.run()
    assert [(d["index"], d["step"], d["layer"]) for d in harness.diverged(name)] == [
        (0, DIVERGE_STEP, "features.4"),
        (2, DIVERGE_STEP, "features.4"),
    ]
    assert harness.analyze()[name].summary["diverged"]["count"] == 2


def test_too_few_converged_models_are_reported_not_analysed(tmp_path, config):
    probe = Harness(config, tmp_path / "probe", progress=False)
    name = _variant("test-div-all", {probe.model_seed(i) for i in range(3)})
    cfg = apply_overrides(config, [f"variants={name}"])
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "run",
                "--config",
                _write(cfg, tmp_path),
                "--out",
                str(out),
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    harness = Harness(cfg, out, progress=False)
    assert name not in harness.analyze()
    assert "3 of 4 models diverged" in harness.too_few_converged()[name]
    assert "3 of 4 models diverged" in (out / "report.md").read_text()


def test_fail_fast_stops_at_the_first_diverged_model(tmp_path, config, capsys):
    probe = Harness(config, tmp_path / "probe", progress=False)
    name = _variant("test-div-ff", {probe.model_seed(1)})
    cfg = apply_overrides(config, [f"variants={name}"])
    with pytest.raises(DivergenceError) as info:
        Harness(cfg, tmp_path / "a", progress=False, fail_fast=True).run()
    assert info.value.step == DIVERGE_STEP and info.value.layer == "1"
    argv = ["run", "--config", _write(cfg, tmp_path), "--no-progress", "--fail-fast"]
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 2
    assert (
        f"error: training diverged at step {DIVERGE_STEP} at layer '1'" in capsys.readouterr().err
    )
    assert not list((tmp_path / "b").glob("cache/*/model_0001.npz"))  # nothing recorded


def test_first_nonfinite_module_finds_the_first_bad_layer():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    assert first_nonfinite_module(model, torch.randn(2, 3)) == ""
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    assert first_nonfinite_module(model, torch.randn(2, 3) + 10) == "2"
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    assert first_nonfinite_module(model, torch.randn(2, 3)) == "0"


def _write(cfg, tmp_path) -> str:
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)
