"""The privacy-utility study on a tiny configuration."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("opacus")
pytest.importorskip("sklearn")

from safenorm.evaluation.utility import UtilityConfig, _t_interval, run_utility_study


def test_t_interval_matches_the_closed_form():
    # Two values: t_{0.975, 1} = 12.7062..., stdev = 0.1 * sqrt(2), n = 2.
    assert _t_interval([0.5, 0.7]) == pytest.approx(12.7062047 * 0.1 * math.sqrt(2) / math.sqrt(2))
    assert math.isnan(_t_interval([0.5]))


def test_tiny_study_calibrates_epsilon_writes_a_report_and_resumes(tmp_path):
    config = UtilityConfig(
        methods=("dp", "dp-groupnorm"), epsilons=(8.0,), seeds=(0, 1), lrs=(0.5, 1.0),
        epochs=1, workers=1,
    )  # fmt: skip
    summary = run_utility_study(config, tmp_path, log=lambda _: None)
    assert {(r["method"], r["epsilon"]) for r in summary["rows"]} == {
        ("dp", 8.0), ("dp-groupnorm", 8.0)
    }  # fmt: skip
    for row in summary["rows"]:
        assert 0.99 * 8.0 <= row["epsilon_spent"] <= 8.0 * 1.0001
        assert len(row["accuracies"]) == 2 and all(0 <= a <= 1 for a in row["accuracies"])
        # The chosen learning rate is the best on the validation split.
        assert row["validation"][str(row["lr"])] == max(row["validation"].values())
    for name in ("utility.md", "utility.json", "utility.png", "runs.jsonl", "config.json"):
        assert (tmp_path / name).exists()
    assert "| dp |" in (tmp_path / "utility.md").read_text()
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 + 2 * 2  # validation grid + final seeds
    run_utility_study(config, tmp_path, log=lambda _: None)  # resumes: nothing retrained
    assert (tmp_path / "runs.jsonl").read_text().splitlines() == lines
    assert json.loads((tmp_path / "utility.json").read_text()) == json.loads(json.dumps(summary))


def test_a_cache_of_another_protocol_is_refused(tmp_path):
    config = UtilityConfig(methods=("dp-none",), epsilons=(8.0,), seeds=(0,), lrs=(0.5,),
                           epochs=1, workers=1)  # fmt: skip
    run_utility_study(config, tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match=r"another protocol.*epochs"):
        run_utility_study(
            UtilityConfig(**{**config.__dict__, "epochs": 2}), tmp_path, log=lambda _: None
        )
