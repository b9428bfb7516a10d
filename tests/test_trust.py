"""Never a stale number: runs and cache entries are redone when an input changed; expected
failures end in one paragraph (file named, fix given) with exit code 2."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xmodal.config import compose
from xmodal.errors import ConfigError, CorruptImageError, DatasetLayoutError
from xmodal.pipeline import evaluate
from xmodal.runs import RunLock, read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]
UNTRAINED = ["experiment=shapes/retrieval_untrained", *SMALL, "data.batch_size=32"]


@pytest.fixture(autouse=True)
def own_outputs(xmodal_env, monkeypatch, tmp_path):
    """Each test has its own output folder (run directories, cache), in and out of process."""
    monkeypatch.setenv("XMODAL_OUTPUT", str(tmp_path / "outputs"))


def _cli(entry: str, overrides: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"xmodal.cli.{entry}", *overrides]
    full_env = {**os.environ, **env, "XMODAL_OUTPUT": os.environ["XMODAL_OUTPUT"]}
    full_env["PYTHONPATH"] = str(REPO / "src")
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def _run(overrides: list[str]) -> dict:
    return evaluate(compose("eval", overrides), overrides)


@pytest.fixture()
def coco_copy(shapes_world, tmp_path) -> Path:
    """A private copy of the shapes COCO dataset, free to damage."""
    root = tmp_path / "coco"
    shutil.copytree(shapes_world / "coco", root)
    return root


def _test_images(root: Path) -> list[Path]:
    data = json.loads((root / "dataset_coco.json").read_text())
    test = [im for im in data["images"] if im["split"] == "test"]
    return [root / im["filepath"] / im["filename"] for im in test]


def _entries(cache: Path, kind: str) -> set[str]:
    return {p.stem for p in cache.glob("*.json") if json.loads(p.read_text())["kind"] == kind}


def test_random_init_backbones_are_cached_per_seed(xmodal_env, shapes_world, tmp_path):
    out = ["paths.cache_dir=" + str(tmp_path / "cache")]
    seed0 = _run([*UNTRAINED, *out, "seed=0"])
    seed1 = _run([*UNTRAINED, *out, "seed=1"])
    assert len(_entries(tmp_path / "cache", "image")) == 2  # one per seed, not one shared
    assert seed0["test/t2i/R@10"] != seed1["test/t2i/R@10"] or (
        seed0["test/i2t/R@10"] != seed1["test/i2t/R@10"]
    )
    # the cached seed-0 embeddings are those of a fresh, uncached seed-0 run
    uncached = _run([*UNTRAINED, *out, "seed=0", "evaluator.cache=false", "force=true"])
    assert uncached == seed0


def test_replaced_image_redoes_the_run_and_its_cache_entry(coco_copy, xmodal_env, caplog, tmp_path):
    cache = tmp_path / "cache"
    base = [*UNTRAINED, f"data.root={coco_copy}", f"paths.cache_dir={cache}"]
    image = _test_images(coco_copy)[3]
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])  # a truncated JPEG
    with pytest.raises(CorruptImageError, match=image.name):
        _run(base)  # on_corrupt=fail (the default)
    skipped = _run([*base, "data.on_corrupt=skip"])
    assert skipped["test/skipped_images"] == 1
    # on_corrupt=fail must not be served the embeddings computed under skip
    with pytest.raises(CorruptImageError):
        _run([*base, "force=true"])

    image.write_bytes(good)  # the same path, a good image again
    with caplog.at_level(logging.INFO, logger="xmodal"):
        redone = _run([*base, "data.on_corrupt=skip"])
    assert redone["test/skipped_images"] == 0
    assert "an input file changed since it ran" in caplog.text and image.name in caplog.text
    assert len(_entries(cache, "image")) == 2  # a new entry for the new content
    run_dir = Path(compose("eval", [*base, "data.on_corrupt=skip"]).run_dir)
    (previous,) = (run_dir / "previous").iterdir()
    assert read_metrics(previous)["test/skipped_images"] == 1  # the old result is kept aside
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xmodal"):
        assert _run([*base, "data.on_corrupt=skip"]) == redone  # unchanged: skipped
    assert "skipping" in caplog.text


def test_retrained_upstream_checkpoint_redoes_its_consumers(xmodal_env, shapes_world, tmp_path):
    from xmodal import backbones

    ckpt_dir = tmp_path / "checkpoints"
    overrides = ["experiment=shapes/retrieval", *SMALL, f"paths.checkpoint_dir={ckpt_dir}"]
    cfg = compose("eval", overrides)

    def export(seed: int) -> None:
        random = compose("eval", [*SMALL, "backbone=tiny_clip", f"seed={seed}"]).backbone
        model, _, _ = backbones.build(random)
        backbones.save_checkpoint(model, cfg.backbone.pretrained, cfg.backbone)

    export(1)
    first = _run(overrides)
    export(2)  # "retrain" the upstream model: same path, new weights
    second = _run(overrides)
    assert second != first
    assert second == _run([*overrides, "force=true"])  # the numbers of the new weights


def test_missing_data_stops_before_the_backbone_is_built(xmodal_env, tmp_path):
    overrides = [
        *UNTRAINED,
        f"data.root={tmp_path}/nope",
        f"backbone.pretrained={tmp_path}/missing_weights.pt",
    ]
    with pytest.raises(DatasetLayoutError, match="expected layout"):
        _run(overrides)


def test_plus_key_additions_are_refused_like_typos(xmodal_env):
    with pytest.raises(ConfigError, match="Did you mean data.batch_size"):
        compose("eval", [*UNTRAINED, "+data.batchsize=3"])
    with pytest.raises(ConfigError, match="Did you mean seed"):
        compose("eval", [*UNTRAINED, "+sed=3"])
    compose("eval", [*UNTRAINED, "+logger.csv.flush_logs_every_n_steps=5"])  # an open group


# -- the command line: one paragraph, exit code 2 --------------------------------------------------


def _assert_paragraph(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr[-3000:])


def test_cli_corrupt_image_in_a_worker_is_one_paragraph(coco_copy, xmodal_env, tmp_path):
    image = _test_images(coco_copy)[0]
    image.write_bytes(b"not a jpeg")
    res = _cli("eval", [*UNTRAINED, f"data.root={coco_copy}", "data.num_workers=1"], xmodal_env)
    _assert_paragraph(res, f"cannot read image {image}", "data.on_corrupt=skip")
    assert "DataLoader worker" not in res.stderr


def test_cli_truncated_cache_entry_and_plus_key(xmodal_env, shapes_world, tmp_path):
    cache = tmp_path / "cache"
    _run([*UNTRAINED, f"paths.cache_dir={cache}"])
    (entry,) = [cache / f"{stem}.pt" for stem in _entries(cache, "text")]
    entry.write_bytes(entry.read_bytes()[:100])
    res = _cli("eval", [*UNTRAINED, f"paths.cache_dir={cache}", "force=true"], xmodal_env)
    _assert_paragraph(res, str(entry), "evaluator.cache=false")
    res = _cli("eval", [*UNTRAINED, "+data.batchsize=3"], xmodal_env)
    _assert_paragraph(res, "Did you mean data.batch_size")


def test_cli_second_process_on_the_same_run_is_refused(xmodal_env, shapes_world):
    run_dir = Path(compose("eval", UNTRAINED).run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir / "run.lock")
    lock.acquire()  # this (live) test process works in the run directory
    try:
        res = _cli("eval", [*UNTRAINED, "force=true"], xmodal_env)
    finally:
        lock.release()
    _assert_paragraph(res, f"is in use by pid {os.getpid()}", str(run_dir / "run.lock"))
