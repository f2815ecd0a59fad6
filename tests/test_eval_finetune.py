"""The DP fine-tuning study on a tiny configuration: methods, calibration, selection, report."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict

import pytest

pytest.importorskip("opacus")
pytest.importorskip("sklearn")

import torch
from safenorm.evaluation.dpstudy import t_interval as _t_interval
from safenorm.evaluation.finetune import (
    METHODS,
    FinetuneConfig,
    FrozenFeatures,
    _pretrained_state,
    _splits,
    build_method,
    pretrained,
    run_finetune_study,
    train_and_score,
    widen_grid,
)
from torch import nn

import safenorm

TINY = FinetuneConfig(pretrain_epochs=2, epochs=1, seeds=(0, 1), lrs=(0.5, 1.0), workers=1)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _norms(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.BatchNorm2d, nn.GroupNorm, safenorm.DPBatchNorm)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _same_convs(model: nn.Module, reference: nn.Module) -> bool:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    refs = [m for m in reference.modules() if isinstance(m, nn.Conv2d)]
    return len(convs) == 2 and all(
        torch.equal(a.weight, b.weight) for a, b in zip(convs, refs, strict=True)
    )


def _check_opacus_fix(model, bn, gn):
    # Opacus' fix: a fresh GroupNorm with one channel per group (InstanceNorm), no BatchNorm left.
    assert all(type(m) is nn.GroupNorm and m.num_groups == m.num_channels for m in _norms(model))
    assert all(torch.all(m.weight == 1) for m in _norms(model))
    assert _same_convs(model, bn) and len(_trainable(model)) == 10


def _check_groupnorm_pretrained(model, bn, gn):
    norms = _norms(model)
    assert [(m.num_groups, m.num_channels) for m in norms] == [(4, 16), (8, 32)]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(norms, _norms(gn), strict=True))
    assert _same_convs(model, gn) and len(_trainable(model)) == 10


def _check_linear_probe(model, bn, gn):
    assert _trainable(model) == {"1.weight", "1.bias"}
    body = model[0].body
    assert isinstance(model[0], FrozenFeatures)
    assert not any(p.requires_grad for p in body.parameters())
    model.train()  # the frozen BatchNorm stays in eval mode with the public statistics
    x = torch.randn(7, 1, 8, 8)
    assert torch.allclose(model[0](x), bn.eval()[:-1](x))


def _check_frozen(model, bn, trainable: int):
    norms = _norms(model)
    assert len(norms) == 2 and all(
        type(m) is safenorm.DPBatchNorm2d and m.frozen_statistics for m in norms
    )
    for m, ref in zip(norms, _norms(bn), strict=True):
        assert torch.equal(m.running_mean, ref.running_mean) and torch.all(m.running_mean != 0)
        assert torch.equal(m.running_var, ref.running_var)
    assert _same_convs(model, bn) and len(_trainable(model)) == trainable


def _check_frozen_stats(model, bn, gn):
    _check_frozen(model, bn, trainable=10)
    assert not any(m.project_gradient for m in _norms(model))


def _check_bitfit(model, bn, gn):
    _check_frozen(model, bn, trainable=6)
    assert _trainable(model) == {"1.weight", "1.bias", "5.weight", "5.bias", "9.weight", "9.bias"}


def _check_released(model, bn, projected: bool, momentum: float = TINY.released_momentum):
    norms = _norms(model)
    assert all(type(m) is safenorm.DPBatchNorm2d and not m.frozen_statistics for m in norms)
    for m, ref in zip(norms, _norms(bn), strict=True):
        assert torch.equal(m.running_var, ref.running_var) and m.momentum == momentum
        assert m.project_gradient == projected and m.var_release == "linear"
    assert _same_convs(model, bn) and len(_trainable(model)) == 10


def _check_released_stats(model, bn, gn):
    _check_released(model, bn, projected=False)


def _check_frozen_stats_projection(model, bn, gn):
    _check_frozen(model, bn, trainable=10)
    assert all(m.project_gradient and m.var_release == "linear" for m in _norms(model))


def _check_released_stats_projection(model, bn, gn):
    _check_released(model, bn, projected=True)


def _check_released_stats_fast(model, bn, gn):
    _check_released(model, bn, projected=False, momentum=0.1)


def _check_scratch(model, bn, gn):
    assert [(m.num_groups, m.num_channels) for m in _norms(model)] == [(4, 16), (8, 32)]
    assert not _same_convs(model, gn) and not _same_convs(model, bn)


CHECKS = {
    "opacus-fix": _check_opacus_fix,
    "groupnorm-pretrained": _check_groupnorm_pretrained,
    "linear-probe": _check_linear_probe,
    "frozen-stats": _check_frozen_stats,
    "frozen-stats-bitfit": _check_bitfit,
    "released-stats": _check_released_stats,
    "frozen-stats-projection": _check_frozen_stats_projection,
    "released-stats-projection": _check_released_stats_projection,
    "released-stats-fast": _check_released_stats_fast,
    "scratch-groupnorm": _check_scratch,
}


def test_every_method_is_checked_and_safenorm_flags_are_right():
    assert set(CHECKS) == set(METHODS)
    ours = {m for m, spec in METHODS.items() if spec.safenorm}
    assert ours == {
        "frozen-stats", "frozen-stats-bitfit", "released-stats", "frozen-stats-projection",
        "released-stats-projection", "released-stats-fast",
    }  # fmt: skip
    assert {m for m, spec in METHODS.items() if spec.anchor} == {
        "opacus-fix", "groupnorm-pretrained", "linear-probe"
    }  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_builds_what_its_name_says(method):
    bn, gn = pretrained("batchnorm", 0, TINY), pretrained("groupnorm", 0, TINY)
    assert any(torch.any(m.running_mean != 0) for m in _norms(bn))  # pretrained, not fresh
    model = build_method(method, 0, TINY)
    CHECKS[method](model, bn, gn)
    # A new head for the 5 private classes, not the public head.
    head = model[-1]
    assert isinstance(head, nn.Linear) and head.out_features == 5
    assert not torch.equal(head.weight, bn[-1].weight)


def test_pretraining_is_deterministic_and_learns_the_public_classes():
    a = pretrained("batchnorm", 3, TINY)
    # The cache is bypassed: a second pretraining from scratch gives the same weights.
    again = _pretrained_state.__wrapped__("batchnorm", 3, tuple(sorted(asdict(TINY).items())))
    assert all(torch.equal(v, again[k]) for k, v in a.state_dict().items())
    other = pretrained("batchnorm", 4, TINY)
    assert not torch.equal(other[0].weight, a[0].weight)
    x, y = _splits("plain", TINY.test_fraction, TINY.validation_fraction)["public"]
    assert float((a.eval()(x).argmax(1) == y).float().mean()) > 0.9
    assert set(y.tolist()) == {0, 1, 2, 3, 4}


def test_rotated_task_rotates_the_private_images_only():
    plain = _splits("plain", 0.2, 0.2)
    rotated = _splits("rotated", 0.2, 0.2)
    assert torch.equal(rotated["public"][0], plain["public"][0])
    assert torch.equal(rotated["test"][0], torch.rot90(plain["test"][0], 1, dims=(2, 3)))
    assert torch.equal(rotated["test"][1], plain["test"][1])
    assert set(plain["train"][1].tolist()) == {0, 1, 2, 3, 4}
    scarce = _splits("rotated-scarce", 0.2, 0.2)
    assert torch.equal(scarce["test"][0], rotated["test"][0])  # the same test split
    counts = torch.bincount(scarce["train"][1]).float()
    share = counts / torch.bincount(rotated["train"][1])
    assert torch.allclose(share, torch.tensor(0.3), atol=0.02)
    # A subset of the rotated training images, not new ones.
    pool = {tuple(x.flatten().tolist()) for x in rotated["train"][0]}
    assert all(tuple(x.flatten().tolist()) in pool for x in scarce["train"][0])
    with pytest.raises(ValueError, match="unknown task 'flipped'"):
        _splits("flipped", 0.2, 0.2)


@pytest.mark.parametrize("method", ["linear-probe", "frozen-stats-bitfit", "released-stats"])
def test_study_epsilon_is_the_calibrated_one(method):
    """Spent epsilon equals the target; frozen statistics spend nothing beyond the gradient."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    result = train_and_score(method, "plain", 2.0, 0.5, 0, "validation", TINY)
    assert 0.99 * 2.0 <= result["epsilon_spent"] <= 2.0 * 1.0001
    # Independent reference: Opacus' own accountant on the gradient releases alone.
    gradient_only = RDPAccountant()
    gradient_only.history = [(result["noise_multiplier"], result["sample_rate"], result["steps"])]
    eps_gradient = gradient_only.get_epsilon(TINY.delta)
    sigma_opacus = get_noise_multiplier(
        target_epsilon=2.0, target_delta=TINY.delta, sample_rate=result["sample_rate"],
        epochs=TINY.epochs, accountant="rdp",
    )  # fmt: skip
    if method == "released-stats":
        # The statistics take a share: more gradient noise, less epsilon from the gradient.
        assert result["noise_multiplier"] > 1.02 * sigma_opacus
        assert eps_gradient < 0.97 * result["epsilon_spent"]
    else:
        assert result["noise_multiplier"] == pytest.approx(sigma_opacus, rel=0.01)
        assert eps_gradient == pytest.approx(result["epsilon_spent"], rel=1e-6)


def test_widen_grid_extends_past_a_winning_end_point_only():
    assert widen_grid((0.5, 1.0, 2.0), {0.5: 0.9, 1.0: 0.8, 2.0: 0.7}) == (0.25, 0.5, 1.0, 2.0)
    assert widen_grid((0.5, 1.0, 2.0), {0.5: 0.1, 1.0: 0.8, 2.0: 0.9}) == (0.5, 1.0, 2.0, 4.0)
    assert widen_grid((0.5, 1.0, 2.0), {0.5: 0.1, 1.0: 0.8, 2.0: 0.7}) == (0.5, 1.0, 2.0)


def test_unknown_method_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown fine-tuning method 'bn'.*frozen-stats"):
        run_finetune_study(FinetuneConfig(methods=("bn",)), tmp_path)


def test_tiny_study_writes_runs_table_and_paired_differences(tmp_path):
    config = FinetuneConfig(
        tasks=("rotated",), methods=("opacus-fix", "linear-probe", "frozen-stats"),
        epsilons=(8.0,), seeds=(0, 1), lrs=(0.5, 1.0), max_lr_extensions=1, epochs=1,
        pretrain_epochs=2, validation_repeats=2, workers=1,
    )  # fmt: skip
    summary = run_finetune_study(config, tmp_path, log=lambda _: None)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    for r in runs:
        assert {"method", "epsilon", "seed", "split", "accuracy", "lr", "safenorm"} <= set(r)
        assert r["safenorm"] == METHODS[r["method"]].safenorm
    for row in summary["rows"]:
        # The chosen lr is the validation argmax, and it is not an end point unless the
        # widening budget ran out (then the grid grew by max_lr_extensions points).
        assert row["validation"][str(row["lr"])] == max(row["validation"].values())
        assert len(row["lr_grid"]) in (2, 3)
        if len(row["lr_grid"]) == 2:
            assert row["lr"] not in (min(row["lr_grid"]), max(row["lr_grid"]))
    # Validation accuracy is the mean over the two selection seeds (1000, 1001).
    val = {}
    for r in runs:
        if r["split"] == "validation":
            val.setdefault((r["method"], r["lr"]), []).append((r["seed"], r["accuracy"]))
    for row in summary["rows"]:
        pairs = sorted(val[row["method"], row["lr"]])
        assert [s for s, _ in pairs] == [1000, 1001]
        assert row["validation"][str(row["lr"])] == pytest.approx(
            statistics.fmean(a for _, a in pairs)
        )
    # Recompute the paired difference from the raw runs.
    (comparison,) = summary["comparisons"]
    tests = {(r["method"], r["seed"]): r["accuracy"] for r in runs if r["split"] == "test"}
    means = {m: statistics.fmean(tests[m, s] for s in (0, 1)) for m in config.methods}
    anchor = max(("opacus-fix", "linear-probe"), key=means.get)
    assert comparison["best_anchor"] == anchor
    diffs = [tests["frozen-stats", s] - tests[anchor, s] for s in (0, 1)]
    got = comparison["differences"]["frozen-stats"]
    assert got["mean"] == pytest.approx(statistics.fmean(diffs))
    assert got["ci95"] == pytest.approx(_t_interval(diffs), nan_ok=True)
    assert comparison["recipe"] == "frozen-stats"
    text = (tmp_path / "finetune.md").read_text()
    assert "| frozen-stats (S) |" in text and "best anchor" in text
    assert (tmp_path / "finetune.png").exists()
    # Resuming runs nothing new.
    before = len(runs)
    run_finetune_study(config, tmp_path, log=lambda _: None)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == before


def test_cli_finetune_parses_into_the_study_config():
    from safenorm.evaluation.cli import build_parser

    args = build_parser().parse_args(["finetune", "--seeds", "0,1", "--methods", "frozen-stats"])
    assert args.command == "finetune" and args.seeds == "0,1" and args.methods == "frozen-stats"
