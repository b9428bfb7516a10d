"""Scale and operations on CPU processes: DDP (gloo) parity, sweeps through submitit's local
executor, resume after a kill, checkpoints on a signal that resume exactly, W&B offline, tables
from run directories, load_run. (On a real SLURM cluster: tests/test_slurm.py.)"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xmodal.config import compose
from xmodal.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]
TRAIN = ["experiment=shapes/clip_pretrain", *SMALL, "data.batch_size=16", "trainer.max_epochs=3"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _env(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **env,
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        **extra,
    }


def _cli(entry: str, args: list[str], env: dict[str, str], ok: bool = True):
    res = subprocess.run(
        [sys.executable, "-m", f"xmodal.cli.{entry}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _close(a: dict, b: dict, keys: list[str], tol: float = 1e-3) -> None:
    for key in keys:
        both_nan = a[key] != a[key] and b[key] != b[key]  # undefined in both (one bin only)
        assert both_nan or abs(a[key] - b[key]) <= tol, (key, a[key], b[key])


@pytest.fixture()
def out_env(xmodal_env, shapes_world, tmp_path):
    """The session's data (small world) with a fresh output folder per test."""
    return {**xmodal_env, "XMODAL_OUTPUT": str(tmp_path / "outputs")}


def _run_dir(entry: str, overrides: list[str], env: dict[str, str]) -> Path:
    old = os.environ.get("XMODAL_OUTPUT")
    os.environ["XMODAL_OUTPUT"] = env["XMODAL_OUTPUT"]
    try:
        return Path(compose(entry, overrides).run_dir)
    finally:
        os.environ["XMODAL_OUTPUT"] = old


@pytest.mark.ddp
def test_evaluator_on_two_processes_equals_one(out_env):
    args = ["experiment=shapes/retrieval_untrained", *SMALL, "data.batch_size=7"]
    _cli("eval", args, _env(out_env))
    one = read_metrics(_run_dir("eval", args, out_env))
    _cli("eval", [*args, *DDP], _env(out_env))
    ddp_dir = _run_dir("eval", [*args, *DDP], out_env)
    assert read_metrics(ddp_dir) == one
    assert json.loads((ddp_dir / "run.json").read_text())["world_size"] == 2


@pytest.mark.ddp
@pytest.mark.parametrize(
    "experiment",
    [
        ["experiment=hug/shapes_cirr"],
        pytest.param(
            ["experiment=ruir/shapes_fashioniq", "backbone=tiny_clip"], marks=pytest.mark.slow
        ),
    ],
    ids=["hug_cirr", "ruir_fashioniq"],
)
def test_cir_evaluation_on_two_processes_equals_one(out_env, tmp_path, experiment):
    """Gallery and queries sharded over 2 ranks (DistributedSampler pads with duplicates) and
    gathered: the same recalls, uncertainty calibration and counts as one process."""
    args = [*experiment, *SMALL, "trainer.max_epochs=0", "data.batch_size=8"]
    outs = {}
    for name, extra in (("one", []), ("two", DDP)):
        env = _env(out_env, XMODAL_OUTPUT=str(tmp_path / name))
        _cli("train", [*args, *extra], env)
        outs[name] = read_metrics(_run_dir("train", [*args, *extra], env))
    one, two = outs["one"], outs["two"]
    keys = [k for k in one if k.startswith("test/") and "ms_per_query" not in k]
    assert any(k.endswith("R@10") for k in keys)
    numeric = [k for k in keys if isinstance(one[k], (int, float))]
    _close(one, two, numeric, tol=1e-4)
    text = [k for k in keys if k not in numeric and not str(one[k]).startswith(str(tmp_path))]
    assert {k: one[k] for k in text} == {k: two[k] for k in text}  # protocol ids
    assert set(two) >= set(keys)


@pytest.mark.ddp
@pytest.mark.slow
def test_training_on_two_processes_equals_one(out_env, tmp_path):
    env1 = _env(out_env, XMODAL_OUTPUT=str(tmp_path / "one"))
    env2 = _env(out_env, XMODAL_OUTPUT=str(tmp_path / "two"))
    _cli("train", TRAIN, env1)
    _cli("train", [*TRAIN, *DDP], env2)
    one = read_metrics(_run_dir("train", TRAIN, {"XMODAL_OUTPUT": str(tmp_path / "one")}))
    two = read_metrics(_run_dir("train", [*TRAIN, *DDP], {"XMODAL_OUTPUT": str(tmp_path / "two")}))
    _close(one, two, [k for k in one if k.startswith(("val/", "test/"))], tol=1e-3)


def test_multirun_through_submitit_local_skips_finished_and_redoes_deleted(out_env):
    args = [
        "-m",
        "launcher=local",
        "experiment=shapes/retrieval_untrained",
        *SMALL,
        "data.batch_size=16,32",
    ]
    env = _env(out_env)
    _cli("eval", args, env)
    dirs = [
        _run_dir(
            "eval",
            ["experiment=shapes/retrieval_untrained", *SMALL, f"data.batch_size={b}"],
            out_env,
        )
        for b in (16, 32)
    ]
    assert dirs[0] != dirs[1]
    mtimes = [(d / "metrics.json").stat().st_mtime_ns for d in dirs]
    _cli("eval", args, env)  # both finished: skipped
    assert [(d / "metrics.json").stat().st_mtime_ns for d in dirs] == mtimes
    (dirs[1] / "metrics.json").unlink()
    _cli("eval", args, env)  # only the deleted one is redone
    assert (dirs[0] / "metrics.json").stat().st_mtime_ns == mtimes[0]
    assert (dirs[1] / "metrics.json").is_file()
    assert read_metrics(dirs[0]) == read_metrics(dirs[1])  # batch size does not change results


def test_failing_sweep_job_does_not_stop_the_others(out_env, tmp_path):
    env = _env(out_env)
    # the second job points at a dataset that does not exist
    args = [
        "-m",
        "experiment=shapes/retrieval_untrained",
        *SMALL,
        f"data.root=${{paths.shapes_dir}}/coco,{tmp_path}/missing",
    ]
    res = _cli("eval", args, env, ok=False)
    assert res.returncode == 1, res.stderr[-3000:]  # the sweep says a job failed
    assert "expected layout" in res.stderr
    good = _run_dir(
        "eval",
        ["experiment=shapes/retrieval_untrained", *SMALL, "data.root=${paths.shapes_dir}/coco"],
        out_env,
    )
    bad = _run_dir(
        "eval", ["experiment=shapes/retrieval_untrained", *SMALL, f"data.root={tmp_path}/missing"],
        out_env,
    )  # fmt: skip
    assert (good / "metrics.json").is_file()
    assert "xmodal sweep: 2 job(s): 1 done, 0 skipped, 1 failed" in res.stdout
    assert f"done     {good}" in res.stdout and f"failed   {bad}" in res.stdout
    # re-running skips the finished job and reports the failed one again
    res = _cli("eval", args, env, ok=False)
    assert res.returncode == 1 and "0 done, 1 skipped, 1 failed" in res.stdout


def test_multirun_with_in_process_ddp_is_refused(out_env):
    res = _cli(
        "eval",
        ["-m", "experiment=shapes/retrieval_untrained", *SMALL, *DDP, "data.batch_size=16,32"],
        _env(out_env),
        ok=False,
    )
    assert res.returncode == 1 and "2 failed" in res.stdout
    assert "in-process DDP" in res.stderr and "Traceback" not in res.stderr
    assert not list(Path(out_env["XMODAL_OUTPUT"]).rglob("metrics.json"))


@pytest.mark.slow
def test_resume_after_kill_reaches_the_uninterrupted_metrics(out_env, tmp_path):
    args = [*TRAIN, "trainer.max_epochs=4"]
    env_a = _env(out_env, XMODAL_OUTPUT=str(tmp_path / "a"))
    env_b = _env(out_env, XMODAL_OUTPUT=str(tmp_path / "b"))
    _cli("train", args, env_a)
    run_b = _run_dir("train", args, {"XMODAL_OUTPUT": str(tmp_path / "b")})
    proc = subprocess.Popen(
        [sys.executable, "-m", "xmodal.cli.train", *args],
        cwd=REPO,
        env=env_b,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last, log = run_b / "checkpoints" / "last.ckpt", run_b / "csv" / "metrics.csv"

    def logged() -> bool:  # a checkpoint, and the log rows saved with it
        return last.is_file() and log.is_file() and "val/R@1" in log.read_text()

    deadline = time.time() + 600
    while not logged() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_b / "metrics.json").exists(), "the run finished before it could be killed"
    refused = _cli("train", args, env_b, ok=False)  # not silently from epoch 0 over last.ckpt
    assert refused.returncode == 2 and "resume=auto" in refused.stderr, refused.stderr[-3000:]
    info = json.loads((run_b / "run.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted"][0]["pid"] == proc.pid
    with open(run_b / "csv" / "metrics.csv") as f:
        before = [r for r in csv.DictReader(f) if r.get("val/R@1")]
    assert before, "the killed run logged no validation row"
    _cli("train", [*args, "resume=auto"], env_b)
    with open(run_b / "csv" / "metrics.csv") as f:
        after = [r for r in csv.DictReader(f) if r.get("val/R@1")]
    assert [r["epoch"] for r in after] == ["0", "1", "2", "3"]  # each epoch once, none lost
    # the row logged before the kill, kept as it was (the file has gained columns since)
    assert {k: after[0][k] for k in before[0]} == before[0]
    a = read_metrics(_run_dir("train", args, {"XMODAL_OUTPUT": str(tmp_path / "a")}))
    b = read_metrics(run_b)
    _close(a, b, [k for k in a if k.startswith("test/")], tol=1e-4)
    ckpt_b = torch.load(last, map_location="cpu", weights_only=True)
    run_a = _run_dir("train", args, {"XMODAL_OUTPUT": str(tmp_path / "a")})
    ckpt_a = torch.load(run_a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (ckpt_b["epoch"], ckpt_b["global_step"]) == (ckpt_a["epoch"], ckpt_a["global_step"])
    assert ckpt_b["xmodal_config"]["run_dir"] == str(run_b)


def test_load_run_rebuilds_the_model_from_its_checkpoint(out_env):
    import xmodal

    args = [*TRAIN, "trainer.max_epochs=1"]
    _cli("train", args, _env(out_env))
    run_dir = _run_dir("train", args, out_env)
    module = xmodal.load_run(run_dir, "last")
    state = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )["state_dict"]
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, state[name])
    tokens = module.datamodule.tokenizer(["a red circle"])
    assert module.model.encode_text(tokens).shape[-1] == 64
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        xmodal.load_run(run_dir, "nope")


def test_wandb_offline_run_is_syncable_without_network(out_env):
    args = [*TRAIN, "trainer.max_epochs=1", "logger=wandb"]
    env = _env(
        out_env,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    _cli("train", args, env)
    run_dir = _run_dir("train", args, out_env)
    run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]  # one id per run directory
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert (offline[0] / f"run-{run_id}.wandb").is_file()


def test_table_from_runs_of_two_methods(out_env):
    from xmodal.tables import build

    env = _env(out_env)
    extra = [*SMALL, "data.batch_size=16", "trainer.max_epochs=1"]
    _cli("train", ["experiment=shapes/clip_pretrain", *extra], env)
    _cli("eval", ["experiment=shapes/retrieval_untrained", *extra], env)
    old = os.environ["XMODAL_OUTPUT"]
    os.environ["XMODAL_OUTPUT"] = out_env["XMODAL_OUTPUT"]
    try:
        rows, written = build(
            "shapes_demo", Path(out_env["XMODAL_OUTPUT"]) / "tables", extra_overrides=extra
        )
    finally:
        os.environ["XMODAL_OUTPUT"] = old
    assert [r.finished for r in rows] == [True, True, False]  # no run of the third row
    for row in rows[:2]:
        metrics = read_metrics(row.run_dir)
        assert row.ours == {k: pytest.approx(metrics[k]) for k in row.ours}
    assert rows[2].ours == {k: None for k in rows[2].ours}  # never fills a cell without a run
    md = written["markdown"].read_text()
    assert "no run" in md and "clip_pretrain" in md and f"{rows[1].ours['test/t2i/R@1']:.1f}" in md
    tex = written["latex"].read_text()
    assert r"\begin{tabular}" in tex and r"\dagger" in tex
    table = list(csv.reader(written["csv"].read_text().splitlines()))
    assert len(table) == 4 and [line[2] for line in table[1:]] == ["True", "True", "False"]


SIGNALLED = [*SMALL, "experiment=shapes/clip_pretrain", "data.batch_size=8"]
SIGNALLED += ["trainer.max_epochs=5", "trainer.log_every_n_steps=1"]
SIGNALLED += ["+callbacks.signal_at._target_=signal_helpers.SignalAt"]  # XMODAL_TEST_SIGNAL_AT


def _signal_env(out_env: dict[str, str], out: Path, at: str | None = None) -> dict[str, str]:
    env = _env(out_env, XMODAL_OUTPUT=str(out))
    env["PYTHONPATH"] += os.pathsep + str(REPO / "tests")  # signal_helpers.SignalAt
    if at:
        env["XMODAL_TEST_SIGNAL_AT"] = at
    return env


@pytest.fixture(scope="module")
def signal_reference(xmodal_env, shapes_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signal_reference")
    _cli("train", SIGNALLED, _signal_env(xmodal_env, out))
    return _run_dir("train", SIGNALLED, {"XMODAL_OUTPUT": str(out)})


@pytest.mark.slow
@pytest.mark.parametrize(
    "at",
    ["1:2:SIGTERM", "2:5:SIGUSR2", "4:5:SIGTERM"],  # 6 batches per epoch, 5 epochs
    ids=["mid_epoch", "last_batch_of_an_epoch", "last_batch_of_the_run"],
)
def test_signal_checkpoint_resumes_exactly_like_an_uninterrupted_run(
    out_env, tmp_path, signal_reference, at
):
    """SIGTERM or SIGUSR2 in training: checkpoint after the batch (or after the epoch's
    validation when it follows the batch), stop; resume=auto then gives the uninterrupted run's
    metrics and log, row for row."""
    epoch, batch, name = at.split(":")
    env = _signal_env(out_env, tmp_path / "out", at)
    res = _cli("train", SIGNALLED, env, ok=False)
    assert res.returncode == 128 + signal.Signals[name], res.stderr[-3000:]
    run = _run_dir("train", SIGNALLED, {"XMODAL_OUTPUT": str(tmp_path / "out")})
    assert not (run / "metrics.json").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert f"{name} during training: saved {run / 'checkpoints' / 'last.ckpt'}" in info["error"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["xmodal_resume"]["loader_position"] == (int(epoch), int(batch) + 1)
    assert ckpt["global_step"] == 6 * int(epoch) + int(batch) + 1
    env.pop("XMODAL_TEST_SIGNAL_AT")
    _cli("train", [*SIGNALLED, "resume=auto"], env)
    assert read_metrics(run) == read_metrics(signal_reference)
    assert (run / "csv" / "metrics.csv").read_text() == (
        signal_reference / "csv" / "metrics.csv"
    ).read_text()
