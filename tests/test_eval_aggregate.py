"""Statistics over seeds, the verdict rule and the frontier rule, against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safenorm.evaluation import aggregate as agg


def test_t_interval_matches_the_textbook_formula():
    x = [1.0, 2.0, 4.0]
    r = agg.t_interval(x)
    # mean 7/3, sd = sqrt(7/3), t_{2, 0.975} = 4.302652729911275
    half = 4.302652729911275 * math.sqrt(7 / 3) / math.sqrt(3)
    assert r["mean"] == pytest.approx(7 / 3) and r["n"] == 3
    assert r["low"] == pytest.approx(7 / 3 - half) and r["high"] == pytest.approx(7 / 3 + half)
    assert agg.t_interval([5.0])["low"] is None and agg.t_interval([])["mean"] is None
    assert agg.t_interval([1.0, None, float("nan"), 3.0])["n"] == 2  # type: ignore[list-item]


def test_t_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        r = agg.t_interval(list(rng.normal(1.0, 2.0, size=4)))
        hits += r["low"] <= 1.0 <= r["high"]
    assert 0.93 < hits / 2000 < 0.97


def _table(bn: dict[str, list[float]], alt: dict[str, list[float]], name: str = "groupnorm"):
    n = len(next(iter(bn.values())))
    return {
        f"c{i}": {
            "bn": {k: v[i] for k, v in bn.items()},
            name: {k: v[i] for k, v in alt.items()},
        }
        for i in range(n)
    }


def _call(verdicts, finding, alt="groupnorm"):
    return next(v for v in verdicts if v["finding"] == finding and v["alternative"] == alt)


def test_verdict_rule_calls_each_case():
    base = [0.60, 0.62, 0.61, 0.63, 0.60, 0.62]
    bn = {"auc_pool": base, "tpr_1": [0.05] * 6, "tpr_01": [0.01] * 6}
    bn |= {"exposure": [5.0, 5.1, 4.9, 5.0, 5.2, 4.8], "in_out_gap": [3, 3, 3, 3, 3, 3.0]}
    # auc: bn higher by 0.05 +- noise; tpr: identical; exposure: bn lower by 1; gap: equal
    alt = {
        "auc_pool": [
            b - 0.05 + e
            for b, e in zip(base, [0.004, -0.003, 0.0, 0.002, -0.001, 0.0], strict=True)
        ],
        "tpr_1": [0.05, 0.06, 0.04, 0.05, 0.06, 0.04],
        "tpr_01": [0.01] * 6,
        "exposure": [6.1, 6.0, 6.0, 5.9, 6.3, 5.7],
        "in_out_gap": [3.1, 2.9, 3.0, 3.2, 2.8, 3.0],
    }
    v = agg.verdicts(_table(bn, alt), alternatives=("groupnorm", "none"))
    assert {x["alternative"] for x in v} == {"groupnorm"}  # absent alternatives are skipped
    mia = _call(v, "membership")
    assert mia["call"] == "reproduces" and mia["cells"] == 6
    assert mia["metrics"]["auc_pool"]["call"] == "BN higher"
    assert mia["metrics"]["tpr_1"]["call"] == "no difference"
    assert mia["metrics"]["auc_pool"]["confidence"] == pytest.approx(1 - 0.05 / 3)
    mem = _call(v, "memorization")
    assert mem["call"] == "reversed" and mem["metrics"]["exposure"]["mean"] == pytest.approx(-1.0)
    assert _call(v, "influence")["call"] == "not shown"  # no values: nothing separates
    # both directions in one finding
    alt2 = dict(alt, in_out_gap=[1.0, 1.1, 0.9, 1.0, 1.2, 0.8])
    assert _call(agg.verdicts(_table(bn, alt2)), "memorization")["call"] == "mixed"


def test_bonferroni_makes_a_marginal_difference_not_shown():
    # a difference whose 95% interval just excludes 0 but whose 98.3% one does not
    d = np.array([0.02, 0.01, 0.035, 0.005, 0.03, 0.0])
    r95, r983 = agg.t_interval(list(d)), agg.t_interval(list(d), 1 - 0.05 / 3)
    assert r95["low"] > 0 and r983["low"] < 0
    bn = {"auc_pool": list(0.6 + d), "tpr_1": [0.05] * 6, "tpr_01": [0.01] * 6}
    alt = {"auc_pool": [0.6] * 6, "tpr_1": [0.05] * 6, "tpr_01": [0.01] * 6}
    assert _call(agg.verdicts(_table(bn, alt)), "membership")["call"] == "not shown"


def _frontier_table(settings: dict[str, tuple[list[float], list[float]]]):
    n = 3
    return {
        f"c{i}": {
            name: {"auc_pool": a[i], "test_acc": acc[i]} for name, (a, acc) in settings.items()
        }
        for i in range(n)
    }


def test_frontier_recommends_the_setting_that_removes_half_the_extra_leakage():
    t = _frontier_table(
        {
            "bn": ([0.66, 0.67, 0.65], [98.0, 98.2, 97.8]),
            "groupnorm": ([0.61, 0.62, 0.60], [98.0, 98.0, 98.0]),  # E = 0.05
            "ghost@2": ([0.63, 0.64, 0.625], [97.8, 98.0, 97.6]),  # removes ~0.028, -0.2 pts
            "ghost@4": ([0.65, 0.66, 0.64], [98.0, 98.2, 97.8]),  # removes 0.01: not half
            "clipped@0.25": ([0.60, 0.61, 0.59], [96.0, 96.5, 96.0]),  # removes 0.06, -1.8 pts
        }
    )
    fr = agg.frontier(t, ["ghost@2", "ghost@4", "clipped@0.25"])
    assert fr["extra_leakage"]["mean"] == pytest.approx(0.05)
    assert fr["settings"]["ghost@2"]["qualifies"] and not fr["settings"]["ghost@4"]["qualifies"]
    assert not fr["settings"]["clipped@0.25"]["qualifies"]  # too costly in accuracy
    assert fr["recommended"] == "ghost@2" and "recommended" in fr["decision"]
    none = agg.frontier(t, ["ghost@4", "clipped@0.25"])
    assert none["recommended"] is None and none["decision"].startswith("no ghost or clipped")


def test_frontier_without_extra_leakage_recommends_nothing():
    t = _frontier_table(
        {
            "bn": ([0.60, 0.62, 0.61], [98.0] * 3),
            "groupnorm": ([0.61, 0.60, 0.62], [98.0] * 3),
            "ghost@2": ([0.55, 0.55, 0.55], [98.0] * 3),
        }
    )
    fr = agg.frontier(t, ["ghost@2"])
    assert fr["recommended"] is None and "no extra leakage" in fr["decision"]
    assert "qualifies" not in fr["settings"]["ghost@2"]


def test_cell_metrics_reads_a_summary():
    s = {
        "test_acc": {"mean": 0.981},
        "exposure": {"in": 5.3, "in_out_gap": 7.0},
        "gradients": {"grad_norm_train": {"ratio": 111.0}, "influence": {"canary_median": 0.25}},
        "membership": {
            "eval": {
                "lira-online": {
                    "pool": {
                        "auc": {"value": 0.656},
                        "tpr_at_fpr": {"0.01": {"value": 0.07}, "0.001": {"value": 0.03}},
                    },
                    "canaries": {"auc": {"value": 0.99}},
                }
            }
        },
        "audit": {"epsilon": float("nan")},
    }
    m = agg.cell_metrics(s, "lira-online")
    assert m["test_acc"] == pytest.approx(98.1) and m["auc_pool"] == 0.656
    assert m["tpr_01"] == 0.03 and m["grad_norm_ratio"] == 111.0 and m["influence"] == 0.25
    assert m["audit_eps"] is None and m["exposure_extrapolated"] is None
    s["exposure"]["extrapolated_in"] = 8.4
    assert agg.cell_metrics(s, "lira-online")["exposure_extrapolated"] == 8.4
