"""The analysis and the report say what a low-FPR TPR measures, show the audit's ceiling and the
extrapolated exposure (synthetic scores through analyze_variant and write_report)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safenorm.evaluation.audit import max_visible_epsilon
from safenorm.evaluation.canaries import build_universe, membership_masks
from safenorm.evaluation.config import apply_overrides, get_profile
from safenorm.evaluation.data import load_dataset
from safenorm.evaluation.harness import analyze_variant
from safenorm.evaluation.metrics import extrapolated_exposure
from safenorm.evaluation.report import write_report


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    cfg = apply_overrides(get_profile("tiny"), ["num_models=8", "attacks.bootstrap=50"])
    universe = build_universe(load_dataset(cfg.data, cfg.seed), cfg.data, cfg.canaries, cfg.seed)
    keep = membership_masks(cfg.num_models, universe.num_candidates, cfg.seed)
    rng = np.random.default_rng(0)
    n = len(universe.y)
    models = []
    for m in range(cfg.num_models):
        phi = rng.normal(size=n)
        phi[: universe.num_candidates] += 2.0 * keep[m]  # members score higher
        models.append(
            {
                "keep": keep[m],
                "test_acc": np.array(0.9),
                "epsilon": np.array(np.nan),
                "train_seconds": np.array(1.0),
                "score_eval": phi,
            }
        )
    result = analyze_variant("bn", models, universe, cfg)
    out = tmp_path_factory.mktemp("report")
    write_report(out, cfg, {"bn": result}, plots=False)
    return cfg, universe, models, result, out


def test_low_fpr_cells_say_how_many_false_positives_they_allow(analysed):
    cfg, _, _, result, out = analysed
    pool = result.summary["membership"]["eval"]["lira-online"]["pool"]
    n_neg = pool["n_neg"]
    assert pool["ci"] == "bootstrap" and pool["n_models"] == cfg.num_models
    report = json.loads((out / "report.json").read_text())
    tprs = report["variants"]["bn"]["membership"]["eval"]["lira-online"]["pool"]["tpr_at_fpr"]
    md = (out / "report.md").read_text()
    for f in cfg.attacks.fprs:
        entry = tprs[f"{f:g}"]
        k = math.floor(n_neg * f + 1e-9)
        assert entry["meets_minimum"] == (n_neg * f >= 10)
        if not entry["meets_minimum"]:
            assert entry["note"] and str(n_neg) in entry["note"]
            cell = "0 FP: " if k == 0 else f"≤{k} FP: "
            assert cell + f"{entry['value']:.3f}" in md
    assert "negatives × FPR ≥ 10" in md


def test_audit_ceiling_and_extrapolated_exposure_reach_the_report(analysed):
    cfg, universe, models, result, out = analysed
    audit = result.summary["audit"]
    m = universe.num_candidates
    want = max_visible_epsilon(
        m, cfg.attacks.audit_guess_fractions, cfg.dp.delta, cfg.attacks.audit_confidence, 8
    )
    assert audit["max_epsilon"] == pytest.approx(want) and audit["epsilon"] <= want
    md = (out / "report.md").read_text()
    assert f"{audit['epsilon']:.2f} (max {want:.2f})" in md
    # extrapolated exposure of the inserted canaries, recomputed from the raw scores
    kinds = universe.canary_type
    t = universe.canary_types[0]
    c_cols = np.flatnonzero((universe.group == 1) & (kinds == t))
    r_cols = np.flatnonzero((universe.group == 2) & (kinds == t))
    inserted = []
    for mod in models:
        x = extrapolated_exposure(mod["score_eval"][c_cols], mod["score_eval"][r_cols])
        inserted.append(x[mod["keep"][c_cols]])
    entry = result.summary["canaries"][t]
    assert entry["extrapolated_in"] == pytest.approx(np.concatenate(inserted).mean())
    assert entry["extrapolated_reference"] == pytest.approx(1 / math.log(2))
    assert "exposure (extrapolated)" in md and "extrapolated in" in md
