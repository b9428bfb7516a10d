"""``launcher=slurm`` on a real SLURM cluster (marker ``slurm``; ``make test-slurm`` starts a
single-node one with ``scripts/slurm_local.sh`` and stops it afterwards).

Job arrays and skipping finished runs, DDP as SLURM tasks, preemption (``scontrol requeue``), a
time limit shorter than the run, and failing or cancelled jobs, each checked against what the
run directories and the sweep summary say. Jobs run on the cluster's nodes, so the test folders
must be visible there (true for the local cluster; elsewhere set pytest's ``--basetemp`` to a
shared folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xmodal.config import compose
from xmodal.runs import read_metrics

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
EVAL = ["experiment=shapes/retrieval_untrained", "data.shapes_world=small"]
TRAIN = ["experiment=shapes/clip_pretrain", "data.shapes_world=small", "data.batch_size=16"]
TRAIN += ["trainer.max_epochs=3", "trainer.enable_progress_bar=false"]
# long enough (1-1.5 min on 2 CPUs) for a 2-minute time limit with signal_delay_s=60: SLURM
# checks time limits periodically and sends the signal 30-60 s after the job starts, 15-45 s into
# training
LONG = ["experiment=shapes/clip_pretrain", "data.shapes_world=small", "data.batch_size=8"]
LONG += ["trainer.max_epochs=100", "trainer.enable_progress_bar=false"]
ONE_CPU = ["hydra.launcher.cpus_per_task=1"]


def _slurm_problem() -> str | None:
    for tool in ("sbatch", "squeue", "sinfo", "scontrol", "srun"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"sinfo failed: {err}"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    if " up" not in out.stdout:
        return f"no partition is up (sinfo: {out.stdout.strip()!r})"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = _slurm_problem()
    if problem:
        pytest.skip(
            f"no SLURM cluster reachable ({problem}): run `make test-slurm`, which starts a "
            "single-node one (scripts/slurm_local.sh, as root) and stops it afterwards"
        )


def _env(out: Path, base: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **base,
        "XMODAL_OUTPUT": str(out),
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }


def _cli(entry: str, args: list[str], env: dict[str, str], ok: bool = True):
    res = subprocess.run(
        [sys.executable, "-m", f"xmodal.cli.{entry}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _run_dir(entry: str, overrides: list[str], out: Path) -> Path:
    old = os.environ.get("XMODAL_OUTPUT")
    os.environ["XMODAL_OUTPUT"] = str(out)
    try:
        return Path(compose(entry, overrides).run_dir)
    finally:
        if old is None:
            os.environ.pop("XMODAL_OUTPUT")
        else:
            os.environ["XMODAL_OUTPUT"] = old


def _jobs(out: Path, task: str) -> list[str]:
    """The SLURM job ids submitit made folders for (``<sweep dir>/.submitit/<id>``)."""
    folder = out / task / ".submitit"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _sbatch_lines(out: Path, task: str) -> list[str]:
    scripts = sorted((out / task / ".submitit").rglob("*_submission.sh"))
    assert scripts, f"no sbatch script under {out / task / '.submitit'}"
    return [line for line in scripts[-1].read_text().splitlines() if line.startswith("#SBATCH")]


def _job_logs(out: Path, task: str) -> str:
    return "\n".join(p.read_text() for p in sorted((out / task / ".submitit").rglob("*_log.*")))


def _same(a: dict, b: dict, keys: list[str], tol: float = 1e-6) -> None:
    for key in keys:
        assert abs(a[key] - b[key]) <= tol, (key, a[key], b[key])


def _scores(metrics: dict) -> list[str]:
    """The numbers among a run's val/ and test/ metrics (not the protocol names)."""
    return [
        k for k, v in metrics.items() if k.startswith(("val/", "test/")) and not isinstance(v, str)
    ]


@pytest.fixture(scope="module")
def uninterrupted(xmodal_env, shapes_world, tmp_path_factory) -> Path:
    """``LONG`` trained without SLURM and without interruption: the reference."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _cli("train", LONG, _env(out, xmodal_env))
    return _run_dir("train", LONG, out)


def test_sweep_is_one_job_array_and_a_rerun_submits_nothing(xmodal_env, shapes_world, tmp_path):
    out = tmp_path / "out"
    env = _env(out, xmodal_env)
    args = ["-m", "launcher=slurm", *EVAL, *ONE_CPU, "seed=0,1"]
    res = _cli("eval", args, env)
    assert "xmodal sweep: 2 job(s): 2 done, 0 skipped, 0 failed" in res.stdout
    lines = _sbatch_lines(out, "eval")
    assert "#SBATCH --array=0-1%2" in lines
    assert "#SBATCH --cpus-per-task=1" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert not [line for line in lines if "gpu" in line or "gres" in line]  # trainer=default
    dirs = [_run_dir("eval", [*EVAL, f"seed={s}"], out) for s in (0, 1)]
    assert dirs[0] != dirs[1] and all((d / "metrics.json").is_file() for d in dirs)
    for d in dirs:
        info = json.loads((d / "run.json").read_text())
        assert info["status"] == "done" and info["slurm_job_id"]
    text = res.stdout + res.stderr
    assert text.count("sacct is not available") == 1 and "Bypassing sacct error" not in text
    jobs = _jobs(out, "eval")
    mtimes = [(d / "metrics.json").stat().st_mtime_ns for d in dirs]
    again = _cli("eval", args, env)
    assert "xmodal sweep: 2 job(s): 0 done, 2 skipped, 0 failed" in again.stdout
    assert (again.stdout + again.stderr).count("finished and current: skipped, no job") == 2
    assert _jobs(out, "eval") == jobs  # nothing was submitted
    assert [(d / "metrics.json").stat().st_mtime_ns for d in dirs] == mtimes


def test_ddp_as_two_slurm_tasks_equals_one_process(xmodal_env, shapes_world, tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    # default cpus_per_task=4: fitted to the node (2 CPUs for 2 tasks), said once
    res = _cli("train", ["-m", "launcher=slurm", *TRAIN, *ddp], _env(tmp_path / "ddp", xmodal_env))
    assert "cpus_per_task=4 x 2 task(s) exceeds the" in res.stdout + res.stderr
    assert "xmodal sweep: 1 job(s): 1 done" in res.stdout
    lines = _sbatch_lines(tmp_path / "ddp", "train")
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --cpus-per-task=1" in lines
    assert not [line for line in lines if "gpu" in line or "gres" in line]
    ddp_dir = _run_dir("train", [*TRAIN, *ddp], tmp_path / "ddp")
    info = json.loads((ddp_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["cluster_environment"] == "SLURMEnvironment"
    _cli("train", TRAIN, _env(tmp_path / "one", xmodal_env))  # one process, no SLURM
    one = read_metrics(_run_dir("train", TRAIN, tmp_path / "one"))
    two = read_metrics(ddp_dir)
    assert set(_scores(one)) == set(_scores(two)) and any("R@10" in k for k in _scores(one))
    _same(one, two, _scores(one))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {path} appeared: {proc.communicate()}")
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def _check_like_uninterrupted(run_dir: Path, reference: Path) -> None:
    a, b = read_metrics(reference), read_metrics(run_dir)
    assert set(_scores(a)) == set(_scores(b))
    _same(a, b, _scores(a))
    # the log, too: every epoch's rows once, the rows before the interruption kept
    assert (run_dir / "csv" / "metrics.csv").read_text() == (
        reference / "csv" / "metrics.csv"
    ).read_text()


def test_preempted_job_comes_back_and_ends_like_an_uninterrupted_run(
    xmodal_env, shapes_world, tmp_path, uninterrupted
):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xmodal.cli.train", "-m", "launcher=slurm", *LONG, *ONE_CPU],
        cwd=REPO,
        env=_env(out, xmodal_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = _run_dir("train", LONG, out)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)  # training is under way
    (job,) = _jobs(out, "train")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)  # as a preemption does
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "xmodal sweep: 1 job(s): 1 done, 0 skipped, 0 failed" in stdout
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and info["slurm_job_id"] == job
    (attempt,) = info["interrupted"]  # SLURM's SIGTERM: a checkpoint, then the requeue
    assert attempt["reason"].startswith("TrainingStopped: SIGTERM during training: saved")
    assert attempt["slurm_job_id"] == job
    logs = _job_logs(out, "train")
    assert "SLURM restarted this job (attempt 2): continuing its run with resume=auto" in logs
    assert "resuming epoch" in logs  # in the middle of an epoch, where the signal came
    _check_like_uninterrupted(run_dir, uninterrupted)


def test_time_limit_shorter_than_the_run_checkpoints_requeues_and_completes(
    xmodal_env, shapes_world, tmp_path, uninterrupted
):
    out = tmp_path / "out"
    limit = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60"]
    res = _cli("train", ["-m", "launcher=slurm", *LONG, *ONE_CPU, *limit], _env(out, xmodal_env))
    assert "xmodal sweep: 1 job(s): 1 done, 0 skipped, 0 failed" in res.stdout
    lines = _sbatch_lines(out, "train")
    assert "#SBATCH --time=2" in lines and "#SBATCH --signal=USR2@60" in lines
    run_dir = _run_dir("train", LONG, out)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done"
    on_signal = [
        a
        for a in info.get("interrupted", [])
        if "SIGUSR2 during training: saved" in a["reason"] and "requeueing" in a["reason"]
    ]
    assert on_signal, f"the time limit never interrupted training: {info}"
    logs = _job_logs(out, "train")
    assert "Requeued job" in logs and "continuing its run with resume=auto" in logs
    _check_like_uninterrupted(run_dir, uninterrupted)


def test_failing_job_is_reported_and_the_sweep_exits_non_zero(xmodal_env, shapes_world, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "missing"
    roots = f"data.root=${{paths.shapes_dir}}/coco,{missing}"
    args = ["-m", "launcher=slurm", *EVAL, *ONE_CPU, roots]
    res = _cli("eval", args, _env(out, xmodal_env), ok=False)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "xmodal sweep: 2 job(s): 1 done, 0 skipped, 1 failed" in res.stdout
    bad = _run_dir("eval", [*EVAL, f"data.root={missing}"], out)
    assert f"failed   {bad}" in res.stdout and "DatasetLayoutError" in res.stdout
    assert "re-run the same command to redo them" in res.stderr


def test_job_cancelled_by_slurm_is_reported_and_the_sweep_exits_non_zero(
    xmodal_env, shapes_world, tmp_path
):
    out = tmp_path / "out"
    # 2 CPUs per job: the second waits for the first, and is cancelled while it waits
    args = ["-m", "launcher=slurm", *EVAL, "hydra.launcher.cpus_per_task=2", "seed=0,1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xmodal.cli.eval", *args],
        cwd=REPO,
        env=_env(out, xmodal_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not _jobs(out, "eval"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    array = _jobs(out, "eval")[0].split("_")[0]
    subprocess.run(["scancel", f"{array}_1"], check=True, timeout=60)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert "xmodal sweep: 2 job(s): 1 done, 0 skipped, 1 failed" in stdout
    cancelled = _run_dir("eval", [*EVAL, "seed=1"], out)
    assert f"failed   {cancelled}" in stdout
    assert f"SLURM job {array}_1 ended without a result" in stdout
