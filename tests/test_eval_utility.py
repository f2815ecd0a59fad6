"""The from-scratch privacy-utility study and the machinery it shares with the fine-tuning one."""

from __future__ import annotations

import json
import math
import statistics
import warnings

import pytest

pytest.importorskip("opacus")
pytest.importorskip("sklearn")

import torch
from safenorm.evaluation import dpstudy
from safenorm.evaluation.models import WSConv2d, weight_standardized
from safenorm.evaluation.utility import (
    METHODS,
    UTILITY_STUDY,
    UtilityConfig,
    build_method,
    run_utility_study,
)
from torch import nn

import safenorm

TINY = UtilityConfig(epochs=1, seeds=(0, 1), lrs=(0.5, 1.0), validation_repeats=1, workers=1)


def test_t_interval_matches_the_closed_form():
    # Two values: t_{0.975, 1} = 12.7062..., stdev = 0.1 * sqrt(2), n = 2.
    expected = 12.7062047 * 0.1 * math.sqrt(2) / math.sqrt(2)
    assert dpstudy.t_interval([0.5, 0.7]) == pytest.approx(expected)
    assert math.isnan(dpstudy.t_interval([0.5]))


# ----------------------------------------------------------------------------- the methods


def _norms(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, safenorm.DPBatchNorm)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _groups(model: nn.Module) -> list[tuple[int, int]]:
    norms = _norms(model)
    assert all(type(m) is nn.GroupNorm for m in norms) and len(norms) == 2
    return [(m.num_groups, m.num_channels) for m in norms]


def _plain_convs(model: nn.Module) -> bool:
    return [type(m) for m in _convs(model)] == [nn.Conv2d, nn.Conv2d]


def _ws_convs(model: nn.Module) -> bool:
    return [type(m) for m in _convs(model)] == [WSConv2d, WSConv2d]


def _dp_layers(model: nn.Module) -> list[safenorm.DPBatchNorm2d]:
    norms = _norms(model)
    assert len(norms) == 2 and all(type(m) is safenorm.DPBatchNorm2d for m in norms)
    return norms


def _slow(layer: safenorm.DPBatchNorm2d) -> bool:
    return (
        layer.momentum == 0.03 and layer.clip_norm == 0.5 * math.sqrt(layer.num_features)
        and layer.var_clip_norm == math.sqrt(layer.num_features)
        and layer.var_release == "linear" and not layer.project_gradient
    )  # fmt: skip


CHECKS = {
    # GroupNorm with 4 channels per group: more than one channel per group (not InstanceNorm)
    # and more than one group (not LayerNorm).
    "groupnorm": lambda m: _groups(m) == [(4, 16), (8, 32)] and _plain_convs(m),
    "opacus-fix": lambda m: _groups(m) == [(16, 16), (32, 32)] and _plain_convs(m),
    "layernorm": lambda m: _groups(m) == [(1, 16), (1, 32)] and _plain_convs(m),
    "none": lambda m: not _norms(m) and all(c.bias is not None for c in _convs(m)),
    "groupnorm-ws": lambda m: _groups(m) == [(4, 16), (8, 32)] and _ws_convs(m),
    "dp": lambda m: _plain_convs(m) and all(
        d.var_release == "linear" and not d.project_gradient
        and d.var_clip_norm == math.sqrt(d.num_features) for d in _dp_layers(m)
    ),
    "dp-log": lambda m: _plain_convs(m) and all(
        d.var_release == "log" and not d.project_gradient
        and d.var_clip_norm == pytest.approx(0.5 * math.sqrt(d.num_features))
        for d in _dp_layers(m)
    ),
    "dp-projection": lambda m: _plain_convs(m) and all(
        d.var_release == "linear" and d.project_gradient for d in _dp_layers(m)
    ),
    "dp-ws": lambda m: _ws_convs(m) and all(
        d.var_release == "linear" and not d.project_gradient for d in _dp_layers(m)
    ),
    "dp-ws-projection": lambda m: _ws_convs(m) and all(
        d.var_release == "linear" and d.project_gradient for d in _dp_layers(m)
    ),
    "dp-slow": lambda m: _plain_convs(m) and all(_slow(d) for d in _dp_layers(m)),
    "dp-ws-slow": lambda m: _ws_convs(m) and all(_slow(d) for d in _dp_layers(m)),
}  # fmt: skip


def test_every_method_is_checked_and_roles_are_right():
    assert set(CHECKS) == set(METHODS) == set(UtilityConfig().methods)
    assert {m for m, spec in METHODS.items() if spec.safenorm} == {m for m in METHODS if "dp" in m}
    assert {m for m, spec in METHODS.items() if spec.anchor} == {
        "groupnorm", "opacus-fix", "layernorm", "none", "groupnorm-ws"
    }  # fmt: skip
    assert all(
        spec.engine == ("safenorm" if spec.safenorm else "opacus") for spec in METHODS.values()
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_builds_what_its_name_says(method):
    model = build_method(method, 0, TINY)
    assert CHECKS[method](model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # Seeded: the same seed builds the same initial model, another seed another one.
    again, other = build_method(method, 0, TINY), build_method(method, 1, TINY)
    first = _convs(model)[0].weight
    assert torch.equal(first, _convs(again)[0].weight)
    assert not torch.equal(first, _convs(other)[0].weight)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_weight_standardization_gives_each_filter_mean_zero_and_variance_one_over_fan_in():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    conv.weight.data.mul_(7).add_(2)
    (ws,) = _convs(weight_standardized(nn.Sequential(conv)))
    assert torch.equal(ws.weight, conv.weight) and torch.equal(ws.bias, conv.bias)
    w = ws.standardized_weight().double()
    assert torch.allclose(w.mean((1, 2, 3)), torch.zeros(5, dtype=torch.float64), atol=1e-7)
    fan_in = 3 * 9
    assert torch.allclose(w.var((1, 2, 3), unbiased=False) * fan_in, torch.ones(5).double(), 1e-4)
    x = torch.randn(4, 3, 6, 6)
    reference = nn.functional.conv2d(x, w.float(), conv.bias, padding=1)
    assert torch.allclose(ws(x), reference, atol=1e-5)


def test_opacus_per_sample_gradients_through_weight_standardization_match_a_loop():
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = build_method("groupnorm-ws", 0, TINY)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    loop = []
    for i in range(5):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        loop.append([p.grad.clone() for p in model.parameters()])
    gsm = GradSampleModule(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gsm(x), y).backward()
    for j, p in enumerate(model.parameters()):
        assert torch.allclose(p.grad_sample, torch.stack([g[j] for g in loop]), atol=1e-5), j


def test_normalized_second_moment_diagnostic_matches_a_direct_computation():
    model = build_method("dp", 0, TINY)
    for layer in _dp_layers(model):
        layer.expected_batch_size = 16
    diagnostic = dpstudy.NormalizedSecondMoment(model)
    x = torch.randn(16, 1, 8, 8) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train()(x)
    conv, layer = model[0], model[1]
    h = conv(x).detach()
    # normalize_with="running": the running statistics after this forward's update
    z = (h - layer.running_mean.view(1, -1, 1, 1)) ** 2 / (
        layer.running_var.view(1, -1, 1, 1) + layer.eps
    )
    assert diagnostic.means()["1"] == pytest.approx(float(z.mean()), rel=1e-5)
    assert set(diagnostic.means()) == {"1", "5"}
    model.eval()(x)  # eval forwards are not counted
    assert diagnostic.means()["1"] == pytest.approx(float(z.mean()), rel=1e-5)
    diagnostic.remove()


# ----------------------------------------------------------------------------- the study


def test_tiny_study_writes_runs_table_paired_differences_and_resumes(tmp_path):
    config = UtilityConfig(
        methods=("groupnorm", "none", "dp-log"), epsilons=(8.0,), seeds=(0, 1),
        lrs=(0.5, 1.0), max_lr_extensions=1, epochs=1, validation_repeats=2, workers=1,
    )  # fmt: skip
    summary = run_utility_study(config, tmp_path, log=lambda _: None)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    for r in runs:
        assert {"method", "epsilon", "seed", "split", "accuracy", "lr", "safenorm"} <= set(r)
        assert r["safenorm"] == METHODS[r["method"]].safenorm
        assert 0.99 * 8.0 <= r["epsilon_spent"] <= 8.0 * 1.0001
        assert ("xhat_sq" in r) == r["safenorm"]
    for row in summary["rows"]:
        assert row["validation"][str(row["lr"])] == max(row["validation"].values())
        assert row["lr_at_end"] == (len(row["lr_grid"]) == 3 and row["lr"] in (
            min(row["lr_grid"]), max(row["lr_grid"])
        ))  # fmt: skip
    (comparison,) = summary["comparisons"]
    tests = {(r["method"], r["seed"]): r["accuracy"] for r in runs if r["split"] == "test"}
    means = {m: statistics.fmean(tests[m, s] for s in (0, 1)) for m in config.methods}
    anchor = max(("groupnorm", "none"), key=means.get)
    assert comparison["best_anchor"] == anchor
    diffs = [tests["dp-log", s] - tests[anchor, s] for s in (0, 1)]
    got = comparison["differences"]["dp-log"]
    assert got["mean"] == pytest.approx(statistics.fmean(diffs))
    assert got["ci95"] == pytest.approx(dpstudy.t_interval(diffs), nan_ok=True)
    assert comparison["goal_met"] == (got["mean"] >= 0)  # margin 0 at eps 8
    text = (tmp_path / "utility.md").read_text()
    assert "| dp-log (S) |" in text and "best anchor" in text and "E[xhat^2]" in text
    assert (tmp_path / "utility.png").exists()
    before = (tmp_path / "runs.jsonl").read_text()
    run_utility_study(config, tmp_path, log=lambda _: None)  # resumes: nothing retrained
    assert (tmp_path / "runs.jsonl").read_text() == before


def _fake_runs(config: UtilityConfig, accuracy) -> dict[str, dict]:
    runs = {}
    for m in config.methods:
        for e in config.epsilons:
            for lr in config.lrs:
                key = dpstudy.val_key("digits", m, e, lr)
                runs[key] = {"accuracy": accuracy(m, e, None) + (0.01 if lr == 0.5 else 0.0)}
            for s in config.seeds:
                runs[dpstudy.test_key("digits", m, e, 0.5, s)] = {
                    "accuracy": accuracy(m, e, s), "epsilon_spent": e,
                }  # fmt: skip
    return runs


def test_goal_rule_allows_three_points_at_eps_1_and_none_above():
    config = UtilityConfig(methods=("groupnorm", "dp"), epsilons=(1.0, 3.0), seeds=(0, 1, 2),
                           lrs=(0.25, 0.5, 1.0), validation_repeats=1)  # fmt: skip
    noise = {0: 0.0, 1: 0.004, 2: -0.004, None: 0.0}
    # safenorm trails the anchor by 2 points at both epsilons.
    runs = _fake_runs(config, lambda m, e, s: (0.9 if m == "groupnorm" else 0.88) + noise[s])
    best = {("digits", m, e): (0.5, config.lrs) for m in config.methods for e in config.epsilons}
    summary = dpstudy.summarize(UTILITY_STUDY, config, runs, best)
    verdicts = {c["epsilon"]: c for c in summary["comparisons"]}
    assert verdicts[1.0]["goal_met"] and not verdicts[3.0]["goal_met"]
    assert verdicts[1.0]["differences"]["dp"]["mean"] == pytest.approx(-0.02)
    assert verdicts[3.0]["differences"]["dp"]["verdict"] == "loss"
    assert all(c["recipe"] == "dp" for c in summary["comparisons"])


def test_a_cache_of_another_protocol_is_refused(tmp_path):
    config = UtilityConfig(
        methods=("none",), epsilons=(8.0,), seeds=(0,), lrs=(0.5, 1.0, 2.0), max_lr_extensions=0,
        epochs=1, validation_repeats=1, workers=1,
    )  # fmt: skip
    run_utility_study(config, tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match=r"from-scratch runs of another protocol.*epochs"):
        run_utility_study(
            UtilityConfig(**{**config.__dict__, "epochs": 2}), tmp_path, log=lambda _: None
        )
    with pytest.raises(ValueError, match=r"unknown from-scratch method 'bn'.*groupnorm"):
        run_utility_study(UtilityConfig(methods=("bn",)), tmp_path / "other")
    # A method listed twice would widen its lr grid twice per round and read an unrun point.
    with pytest.raises(ValueError, match=r"from-scratch methods listed twice"):
        run_utility_study(UtilityConfig(methods=("dp", "none", "dp")), tmp_path / "other")


def test_cli_utility_parses_into_the_study_config(tmp_path, monkeypatch):
    from safenorm.evaluation import cli

    seen = {}
    monkeypatch.setattr(
        "safenorm.evaluation.utility.run_utility_study",
        lambda config, out: seen.update(config=config) or (out / "utility.md").write_text("ok"),
    )
    args = cli.build_parser().parse_args(
        ["utility", "--out", str(tmp_path), "--methods", "dp,groupnorm", "--seeds", "0,1",
         "--epsilons", "2", "--validation-repeats", "2"]
    )  # fmt: skip
    assert cli._cmd_utility(args) == 0
    config = seen["config"]
    assert config.methods == ("dp", "groupnorm") and config.seeds == (0, 1)
    assert config.epsilons == (2.0,) and config.validation_repeats == 2
    assert config.lrs == UtilityConfig().lrs and config.epochs == UtilityConfig().epochs
