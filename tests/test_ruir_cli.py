"""`xmodal-train experiment=ruir/shapes_*` end to end on the small shapes world (fast settings,
random-init tiny CLIP): training, validation, test, metrics.json, uncertainty, submission files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmodal.config import compose
from xmodal.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]
FAST = ["backbone=tiny_clip", "trainer.max_epochs=2", "data.batch_size=16"]


def test_fashioniq_cli_writes_per_category_metrics(xmodal_env, shapes_world):
    overrides = ["experiment=ruir/shapes_fashioniq", *SMALL, *FAST]
    env = {**os.environ, **xmodal_env, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(
        [sys.executable, "-m", "xmodal.cli.train", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    run = Path(compose("train", overrides).run_dir)
    metrics = read_metrics(run)
    for stage in ("val", "test"):
        for cat in ("dress", "shirt", "toptee"):
            for k in (10, 50):
                assert 0.0 <= metrics[f"{stage}/{cat}/R@{k}"] <= 100.0
            assert metrics[f"{stage}/{cat}/num_queries"] == 10
            assert metrics[f"{stage}/{cat}/protocol"] == "clip4cir"
        mean10 = sum(metrics[f"{stage}/{c}/R@10"] for c in ("dress", "shirt", "toptee")) / 3
        assert metrics[f"{stage}/R@10"] == pytest.approx(mean10)
        assert metrics[f"{stage}/avg"] == pytest.approx(
            (metrics[f"{stage}/avg/R@10"] + metrics[f"{stage}/avg/R@50"]) / 2
        )
    assert metrics["val/best/R@10"] >= metrics["val/R@10"] - 1e-6
    assert {"test/dress/uncertainty/mean", "test/dress/uncertainty/k1/AURC"} <= set(metrics)
    with open(run / "uncertainty" / "test_dress.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and float(rows[0]["uncertainty"]) > 0
    assert all(0 <= int(r["target_rank"]) < metrics["test/dress/num_gallery"] for r in rows)
    # the exported ranks and uncertainties reproduce the logged recalls and calibration
    from xmodal.metrics.calibration import confidence_auroc

    for cat in ("dress", "shirt", "toptee"):
        with open(run / "uncertainty" / f"test_{cat}.csv") as f:
            rows = list(csv.DictReader(f))
        ranks = torch.tensor([int(r["target_rank"]) for r in rows])
        uncertainty = torch.tensor([float(r["uncertainty"]) for r in rows], dtype=torch.float64)
        for k in (1, 5, 10, 50):
            recall = 100 * (ranks < k).double().mean().item()
            assert metrics[f"test/{cat}/R@{k}"] == pytest.approx(recall, abs=1e-4), (cat, k)
        assert metrics[f"test/{cat}/uncertainty/mean"] == pytest.approx(
            uncertainty.mean().item(), rel=1e-4
        )
        auroc = confidence_auroc(-uncertainty, ranks < 10)
        assert metrics[f"test/{cat}/uncertainty/k10/AUROC"] == pytest.approx(
            auroc, abs=1e-4, nan_ok=True
        )
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_cirr_trains_and_writes_the_test1_submission(xmodal_env, shapes_world):
    from xmodal.data.cirr import load
    from xmodal.pipeline import train

    cfg = compose("train", ["experiment=ruir/shapes_cirr", *SMALL, *FAST])
    metrics = train(cfg, ["experiment=ruir/shapes_cirr", *SMALL, *FAST])
    for stage in ("val", "test"):
        for key in ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3"):
            assert 0.0 <= metrics[f"{stage}/{key}"] <= 100.0
        assert metrics[f"{stage}/Rs@1"] <= metrics[f"{stage}/Rs@2"] <= metrics[f"{stage}/Rs@3"]
        assert metrics[f"{stage}/Rs@3"] <= 100.0 and metrics[f"{stage}/num_queries"] == 8
    test1 = load(Path(cfg.paths.shapes_dir) / "cirr", "test1")
    folder = Path(cfg.run_dir) / "submission"
    recall = json.loads((folder / "recall_submission_cirr_test1.json").read_text())
    subset = json.loads((folder / "recall_subset_submission_cirr_test1.json").read_text())
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    assert set(recall) == set(subset) == {str(p) for p in test1.pair_ids}
    assert metrics["test/test1/submission_queries"] == len(test1.pair_ids)
    for pair_id, ref, members in zip(test1.pair_ids, test1.reference, test1.members):
        ranked = recall[str(pair_id)]
        assert len(ranked) == min(50, len(test1.gallery) - 1) and ref not in ranked
        assert len(subset[str(pair_id)]) == 3
        assert set(subset[str(pair_id)]) <= set(members) - {ref}


def test_untrained_model_is_evaluated_with_zero_epochs(xmodal_env, shapes_world):
    from xmodal.pipeline import train

    overrides = ["experiment=ruir/shapes_cirr", *SMALL, "backbone=tiny_clip"]
    overrides.append("trainer.max_epochs=0")
    metrics = train(compose("train", overrides), overrides)
    assert not any(k.startswith("val/R@") for k in metrics)
    assert 0.0 <= metrics["test/R@50"] <= 100.0


@pytest.mark.slow
def test_training_beats_the_untrained_model_on_the_medium_world(tmp_path, xmodal_env):
    """The demo's claim, end to end: pretrain the tiny CLIP briefly on the medium shapes world,
    then RUIR training clearly beats the same model before training on both formats."""
    from xmodal.pipeline import train

    paths = [f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out"]
    base = [*paths, "trainer=cpu", "trainer.enable_progress_bar=false"]
    pretrain = ["experiment=shapes/clip_pretrain", "trainer.max_epochs=5", *base]
    train(compose("train", pretrain), pretrain)
    for experiment, key, margin in [
        ("shapes_fashioniq", "avg/R@10", 25),
        ("shapes_cirr", "R@10", 20),
    ]:
        runs = {}
        for label, extra in [("untrained", ["trainer.max_epochs=0"]), ("trained", [])]:
            overrides = [f"experiment=ruir/{experiment}", *base, *extra]
            runs[label] = train(compose("train", overrides), overrides)
        gain = runs["trained"][f"test/{key}"] - runs["untrained"][f"test/{key}"]
        assert gain > margin, (experiment, runs["untrained"][f"test/{key}"], gain)
