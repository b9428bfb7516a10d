"""A fast, quiet command line: no torch to compose a config, help that helps, configs installed
with the package, evaluators that log to the configured loggers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xmodal.config import compose, list_configs

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "open_clip", "torchmetrics", "transformers", "faiss")


def _python(code: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_composing_every_experiment_imports_no_heavy_library(xmodal_env):
    """compose() for every experiment of both entry points, and a finished run's skip path,
    leave torch, Lightning, open_clip, torchmetrics, transformers and faiss unimported."""
    code = f"""
import sys
from xmodal.config import compose, conf_dir, list_configs
for name in list_configs("experiment"):
    text = (conf_dir() / "experiment" / f"{{name}}.yaml").read_text()
    task = "train" if "override /method" in text else "eval"
    compose(task, [f"experiment={{name}}"])
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print(len(list_configs("experiment")), heavy)
"""
    out = _python(code).stdout.split()
    assert int(out[0]) > 100 and out[1:] == ["[]"], out


def test_skipping_a_finished_run_imports_no_heavy_library(xmodal_env, shapes_world, tmp_path):
    from xmodal.pipeline import evaluate

    overrides = ["experiment=shapes/retrieval_untrained", "data.shapes_world=small"]
    env = {"XMODAL_OUTPUT": str(tmp_path / "out")}
    os.environ.update(env)
    try:
        evaluate(compose("eval", overrides), overrides)
    finally:
        os.environ["XMODAL_OUTPUT"] = xmodal_env["XMODAL_OUTPUT"]
    code = f"""
import sys
from xmodal.config import compose
from xmodal.pipeline import evaluate
metrics = evaluate(compose("eval", {overrides!r}), {overrides!r})
print(sorted(m for m in {HEAVY!r} if m in sys.modules), "test/t2i/R@1" in metrics)
"""
    assert _python(code, **env).stdout.strip() == "[] True"


def test_help_lists_groups_experiments_and_examples():
    res = subprocess.run(
        [sys.executable, "-m", "xmodal.cli.train", "--help"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0
    text = res.stdout
    assert text.startswith("xmodal-train: fit a trainable method")
    assert "_schema" not in text
    for line in (
        "  method     clip_pretrain, hug, probvlm, ruir",
        "  trainer    cpu, ddp, default, gpu",
    ):
        assert line in text
    assert "hug/cirr" in text and "xmore/" not in text  # the experiments of this entry point
    assert "  xmodal-train experiment=shapes/clip_pretrain" in text
    res = subprocess.run(
        [sys.executable, "-m", "xmodal.cli.eval", "--version"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    import xmodal

    assert res.stdout.strip() == f"xmodal {xmodal.__version__}"


@pytest.mark.slow
def test_wheel_ships_the_configs_and_composes_from_another_folder(tmp_path):
    """Build the wheel (no editable paths), check the configs are inside, and compose from an
    unrelated folder with only the unpacked wheel on the path."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(REPO), "-w", str(dist)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = dist.glob("xmodal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "xmodal/conf/train.yaml" in names and "xmodal/conf/eval.yaml" in names
    assert "xmodal/conf/experiment/shapes/retrieval.yaml" in names
    assert not [n for n in names if n.startswith("xmodal/conf/local/") and n.endswith(".yaml")]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import xmodal.config as c; cfg = c.compose('eval', ['experiment=shapes/retrieval']); "
        "print(c.conf_dir(), cfg.backbone.name)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("XMODAL_CONF_DIR", None)
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    conf, backbone = res.stdout.split()
    assert Path(conf) == site / "xmodal" / "conf" and backbone == "tiny_clip_shapes"


def test_evaluator_metrics_reach_the_csv_logger(xmodal_env, shapes_world, tmp_path, monkeypatch):
    from xmodal.pipeline import evaluate

    monkeypatch.setenv("XMODAL_OUTPUT", str(tmp_path / "out"))
    overrides = ["experiment=shapes/retrieval_untrained", "data.shapes_world=small", "logger=csv"]
    cfg = compose("eval", overrides)
    metrics = evaluate(cfg, overrides)
    with open(Path(cfg.run_dir) / "csv" / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["test/t2i/R@5"]) == pytest.approx(metrics["test/t2i/R@5"])
    assert (Path(cfg.run_dir) / "csv" / "hparams.yaml").is_file()


@pytest.mark.slow
def test_uclip_metrics_and_plots_reach_wandb_offline(xmodal_env, shapes_world, tmp_path):
    overrides = [
        "experiment=uclip/shapes_mcd",
        "backbone=tiny_clip",
        "data.shapes_world=small",
        "evaluator.passes=3",
        "logger=wandb",
    ]
    env = {
        "XMODAL_OUTPUT": str(tmp_path / "out"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    res = subprocess.run(
        [sys.executable, "-m", "xmodal.cli.eval", *overrides],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    os.environ["XMODAL_OUTPUT"] = env["XMODAL_OUTPUT"]
    try:
        run_dir = Path(compose("eval", overrides).run_dir)
    finally:
        os.environ["XMODAL_OUTPUT"] = xmodal_env["XMODAL_OUTPUT"]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    media = sorted(p.name for p in offline.rglob("*.png"))
    assert any(n.startswith("calibration") for n in media), media
    assert any(n.startswith("rejection") for n in media), media
    # the metrics are in the run's record (protobuf; wandb >= 0.2x reads it only in its Go core):
    # each logged key with its value as JSON text
    record = next(offline.glob("run-*.wandb")).read_bytes()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/t2i/R@1", "test/i2t/AUROC", "test/t2i/rejection/R@1"):
        value = metrics[key]
        text = str(int(value)) if float(value).is_integer() else json.dumps(value)
        assert key.encode() in record and text.encode() in record, (key, text)


def test_list_configs_sees_packaged_experiments():
    assert "shapes/retrieval" in list_configs("experiment")


def test_a_missing_extra_names_the_install_command(xmodal_env, monkeypatch):
    import importlib.util

    from xmodal import extras
    from xmodal.errors import ConfigError
    from xmodal.pipeline import check_extras

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = compose("eval", ["experiment=shapes/retrieval_untrained", "logger=wandb"])
    with pytest.raises(ConfigError, match=r"pip install 'xmodal\[wandb\]'$"):
        check_extras(cfg)
    check_extras(compose("eval", ["experiment=shapes/retrieval_untrained", "logger=csv"]))
    for module, (extra, _) in extras.EXTRAS.items():
        assert str(extras.missing(module)).endswith(f"pip install 'xmodal[{extra}]'")
