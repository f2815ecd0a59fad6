"""The safenorm-eval command line, end to end on the tiny profile."""

import json

import numpy as np
import pytest
from safenorm.evaluation import cli
from safenorm.evaluation.harness import Harness

TINY = ["--profile", "tiny", "--num-models", "3", "--no-progress"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["run", *TINY, "--out", str(out)]) == 0
    return out


def test_run_writes_every_output(first_run):
    out = first_run
    for name in (
        "report.md",
        "report.json",
        "config.json",
        "log.txt",
        "roc_bn.png",
        "roc_groupnorm.png",
        "grad_norms.png",
        "exposure.png",
        "scores/bn.npz",
        "scores/groupnorm.npz",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["variants"]) == {"bn", "groupnorm"}
    bn = report["variants"]["bn"]
    for attack in ("loss", "lira-offline", "lira-online", "rmia"):
        assert "auc" in bn["membership"]["eval"][attack]["pool"]
        assert "auc" in bn["membership"]["train"][attack]["pool"]  # separate threat model
    assert {"0.01", "0.001"} <= set(bn["membership"]["eval"]["loss"]["pool"]["tpr_at_fpr"])
    text = (out / "report.md").read_text()
    assert "| **bn** |" in text and "| **groupnorm** |" in text and "TRAIN-mode" in text
    assert "channels per group): GroupNorm 4x4, 2 x GroupNorm 8x4." in text
    assert report["variants"]["groupnorm"]["norm_layers"] == "GroupNorm 4x4, 2 x GroupNorm 8x4"
    raw = np.load(out / "scores" / "bn.npz")
    assert raw["score_eval"].shape[0] == 3 and raw["keep"].shape[0] == 3
    assert len(list((out / "cache").glob("*/model_*.npz"))) == 6


def test_second_run_resumes_from_cache(first_run, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(Harness, "train_one", fail)
    before = json.loads((first_run / "report.json").read_text())["variants"]
    assert cli.main(["run", *TINY, "--out", str(first_run)]) == 0
    after = json.loads((first_run / "report.json").read_text())["variants"]
    assert after == before
    assert "0 of 6 models to train" in (first_run / "log.txt").read_text()
    # re-analysis with other attack settings needs no training either
    assert (
        cli.main(
            [
                "report",
                "--out",
                str(first_run),
                "--set",
                "attacks.ci=bootstrap",
                "--set",
                "attacks.bootstrap=20",
                "--no-plots",
            ]
        )
        == 0
    )
    assert "report:" in capsys.readouterr().out


def test_interrupted_run_resumes_missing_models(first_run, tmp_path):
    out = tmp_path / "partial"
    cache = next((first_run / "cache").glob("bn-*"))
    (out / "cache" / cache.name).mkdir(parents=True)
    for f in sorted(cache.glob("model_000[01].npz")):  # as if killed after two models
        (out / "cache" / cache.name / f.name).write_bytes(f.read_bytes())
    assert cli.main(["run", *TINY, "--out", str(out), "--variants", "bn", "--no-plots"]) == 0
    assert "1 of 3 models to train" in (out / "log.txt").read_text()
    a = np.load(out / "scores" / "bn.npz")["score_eval"]
    b = np.load(first_run / "scores" / "bn.npz")["score_eval"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # seeded: same models


def test_shards_merge_to_the_single_run(first_run, tmp_path, capsys):
    shards = []
    for i in range(2):
        shard = tmp_path / f"shard{i}"
        args = ["run", *TINY, "--out", str(shard), "--shard", f"{i}/2", "--variants", "bn"]
        assert cli.main(args) == 0
        shards.append(str(shard))
    assert "still miss models" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--out", str(merged), *shards, "--no-plots"]) == 0
    for variant in ("bn",):
        a = np.load(merged / "scores" / f"{variant}.npz")
        b = np.load(first_run / "scores" / f"{variant}.npz")
        np.testing.assert_allclose(a["score_eval"], b["score_eval"], rtol=1e-6, atol=1e-8)
        np.testing.assert_array_equal(a["keep"], b["keep"])


def test_errors_and_listing(tmp_path, capsys):
    assert cli.main(["run", *TINY, "--out", str(tmp_path), "--variants", "bn,batchrenorm"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'batchrenorm'" in err and "groupnorm" in err
    assert cli.main(["run", "--shard", "3/2", "--out", str(tmp_path)]) == 2
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "opacus-fix (aliases: dp-gn, dp-groupnorm" in listing
    assert "lira-online" in listing and "quick" in listing
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "safenorm-eval run --profile quick" in capsys.readouterr().out


def test_unavailable_variant_is_reported_not_fatal(first_run, tmp_path, capsys):
    import shutil

    from safenorm.evaluation.variants import VARIANTS, Variant, register_variant

    out = tmp_path / "unavailable"
    shutil.copytree(first_run / "cache", out / "cache")
    register_variant(
        Variant(
            "test-missing",
            "needs a module that is not installed",
            lambda m, c: m,
            requires=("not_a_module_xyz",),
        )
    )
    try:
        args = ["run", *TINY, "--out", str(out), "--variants", "bn,test-missing", "--no-plots"]
        assert cli.main(args) == 0
    finally:
        VARIANTS._items.pop("test-missing")
    assert "variant test-missing is unavailable" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert "not_a_module_xyz" in report["unavailable"]["test-missing"]
    assert "| test-missing | unavailable:" in (out / "report.md").read_text()


def test_full_profile_fails_clearly_without_its_data_or_gpu(tmp_path, capsys):
    import torch

    args = ["run", "--profile", "full", "--out", str(tmp_path), "--no-progress"]
    if not torch.cuda.is_available():
        assert cli.main(args) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    args += ["--device", "cpu", "--data-root", str(tmp_path / "nowhere")]
    assert cli.main(args) == 2
    assert "no CIFAR-10 python batches" in capsys.readouterr().err


def test_study_over_seeds_resumes_and_shards_merge_to_the_same_verdicts(tmp_path, capsys):
    args = [*TINY, "--seeds", "0,1", "--variants", "bn,groupnorm,ghost@4", "--no-plots"]
    out = tmp_path / "study"
    assert cli.main(["run", *args, "--out", str(out)]) == 0
    assert "| (iii) BN is more exposed to membership inference |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["cells"]) == ["seed0-auto", "seed1-auto"]
    for cell in ("seed0-auto", "seed1-auto"):  # every cell is a complete single run
        assert (out / "cells" / cell / "report.md").exists()
        assert (out / "cells" / cell / "scores" / "groupnorm.npz").exists()
    by = report["by_model"]["auto"]["variants"]
    assert by["bn"]["auc_pool"]["n"] == 2 and by["groupnorm"]["auc_pool"]["diff"]["n"] == 2
    # the paired difference is the mean of the per-cell differences
    cells = report["per_cell_metrics"]
    d = [cells[c]["groupnorm"]["auc_pool"] - cells[c]["bn"]["auc_pool"] for c in sorted(cells)]
    assert by["groupnorm"]["auc_pool"]["diff"]["mean"] == pytest.approx(np.mean(d))
    assert report["frontier"]["settings"]["ghost@4"]["auc_removed"]["n"] == 2
    # seeds differ in split and masks, so the cells differ
    assert cells["seed0-auto"]["bn"]["auc_pool"] != cells["seed1-auto"]["bn"]["auc_pool"]

    assert cli.main(["run", *args, "--out", str(out)]) == 0
    assert "trained 0 models" in (out / "log.txt").read_text()

    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, s in enumerate(shards):
        assert cli.main(["run", *args, "--out", str(s), "--shard", f"{i}/2"]) == 0
    assert "still miss models of other shards" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--out", str(merged), *map(str, shards), "--no-plots"]) == 0
    again = json.loads((merged / "report.json").read_text())
    assert again["per_cell_metrics"] == report["per_cell_metrics"]
    assert [v["call"] for v in again["verdicts"]] == [v["call"] for v in report["verdicts"]]
    assert cli.main(["report", "--out", str(merged), "--no-plots"]) == 0
    assert "## Verdicts" in (merged / "report.md").read_text()
