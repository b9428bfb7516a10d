"""The command-line entry points end to end on the small shapes world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xmodal.config import compose
from xmodal.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]


def _cli(entry: str, overrides: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"xmodal.cli.{entry}", *overrides]
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def pretrained(xmodal_env, shapes_world):
    """Pretrain the tiny CLIP for 2 epochs through `xmodal-train` (exports the backbone)."""
    overrides = [
        "experiment=shapes/clip_pretrain",
        *SMALL,
        "trainer.max_epochs=2",
        "data.batch_size=16",
    ]
    _cli("train", overrides, xmodal_env)
    return compose("train", overrides)


def test_train_writes_run_dir_checkpoints_and_export(pretrained):
    run = Path(pretrained.run_dir)
    for name in ("config.yaml", "overrides.yaml", "run.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = read_metrics(run)
    for key in ("val/R@1", "test/t2i/R@1", "test/i2t/R@10"):
        assert 0.0 <= metrics[key] <= 100.0
    assert (Path(pretrained.paths.checkpoint_dir) / "tiny_clip_shapes.pt").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    # test_ckpt=best (default): the exported backbone holds the best checkpoint's weights
    import torch

    from xmodal.backbones.weights import read_checkpoint

    assert metrics["val/best/R@1"] >= metrics["val/R@1"] - 1e-6
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    exported, _ = read_checkpoint(Path(pretrained.paths.checkpoint_dir) / "tiny_clip_shapes.pt")
    for name, value in exported.items():
        torch.testing.assert_close(value, best["state_dict"][f"model.{name}"], rtol=0, atol=0)


@pytest.mark.parametrize("test_ckpt", ["best", "last"])
def test_best_weights_after_fit_loads_the_monitored_best(tmp_path, test_ckpt):
    """A run whose monitored metric peaks in epoch 0: with test_ckpt=best the module ends fit
    with epoch 0's weights, with last it keeps the final ones."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from xmodal.callbacks import BestWeightsAfterFit

    class Drifting(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def training_step(self, batch, batch_idx):
            return (self.w - 1.0).pow(2).sum() + 0 * batch.sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/score", -float(self.current_epoch))  # best at epoch 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)
    checkpoint = ModelCheckpoint(tmp_path, filename="best", monitor="val/score", mode="max")
    callbacks = [checkpoint] + ([BestWeightsAfterFit()] if test_ckpt == "best" else [])
    trainer = pl.Trainer(
        max_epochs=3, logger=False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    module = Drifting()
    trainer.fit(module, data, data)
    saved = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    after_epoch0 = saved["state_dict"]["w"]
    assert torch.equal(module.w.detach(), after_epoch0) == (test_ckpt == "best")


def test_eval_with_pretrained_backbone_then_skip_then_force(pretrained, xmodal_env):
    overrides = ["experiment=shapes/retrieval", *SMALL]
    _cli("eval", overrides, xmodal_env)
    cfg = compose("eval", overrides)
    metrics = read_metrics(cfg.run_dir)
    assert set(metrics) >= {f"test/{d}/R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert metrics["test/num_images"] > 0 and metrics["test/num_texts"] > metrics["test/num_images"]
    assert metrics["test/t2i/R@1"] <= metrics["test/t2i/R@5"] <= metrics["test/t2i/R@10"]
    for name in ("coco1k", "coco5k", "cxc", "eccv"):  # the world's extended positives
        assert metrics[f"test/{name}/i2t/R@1"] <= metrics[f"test/{name}/i2t/R@10"]
    assert {"test/eccv/t2i/mAP@R", "test/eccv/t2i/R-P", "test/pm/t2i/R-P"} <= set(metrics)
    mtime = Path(cfg.run_dir, "metrics.json").stat().st_mtime_ns
    res = _cli("eval", overrides, xmodal_env)  # finished: skipped
    assert Path(cfg.run_dir, "metrics.json").stat().st_mtime_ns == mtime
    assert "skipping" in res.stderr + res.stdout
    _cli("eval", [*overrides, "force=true"], xmodal_env)  # forced: redone, same numbers (cache)
    assert read_metrics(cfg.run_dir) == metrics
    (previous,) = (Path(cfg.run_dir) / "previous").iterdir()  # the old result, kept aside
    assert read_metrics(previous) == metrics


def test_missing_dataset_gives_one_paragraph(xmodal_env, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "xmodal.cli.eval",
        "data=coco",
        f"data.root={tmp_path}/nope",
        "trainer=cpu",
    ]
    res = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, **xmodal_env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "prepare_coco.py" in res.stderr and "expected layout" in res.stderr
