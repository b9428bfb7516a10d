"""``launcher=slurm`` without a cluster: the sbatch parameters each trainer composes to, the
request fitted to a partition, requeued jobs' overrides, job states without sacct, the sweep
ledger of multi-task jobs, and the pieces of an exact resume (loader position, log rows)."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from xmodal.config import conf_dir, register_configs
from xmodal.errors import ConfigError
from xmodal.slurm import (
    GONE,
    NodeKind,
    Partition,
    continue_overrides,
    fit_request,
    gpus_per_node,
    parse_gpus,
    parse_sinfo,
    parse_squeue,
    tasks_per_node,
    with_resume,
)


def _launcher(*overrides: str) -> dict:
    """The resolved ``hydra.launcher`` node of ``xmodal-train -m launcher=slurm <overrides>``."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", ["launcher=slurm", *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def _sbatch(params: dict, monkeypatch) -> list[str]:
    """The ``#SBATCH`` lines submitit writes for these launcher parameters (no srun needed)."""
    from submitit.slurm.slurm import SlurmExecutor

    from hydra_plugins.xmodal_slurm import make_executor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    params = {k: v for k, v in params.items() if k != "_target_"}
    text = make_executor(params)._executor._make_submission_file_text("python -m job", "uid")
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")


@pytest.mark.parametrize(
    ("trainer", "expected", "gres"),
    [
        (["trainer=cpu"], (1, 1, None, 4, 16, 1440), None),
        (["trainer=gpu"], (1, 1, 1, 4, 16, 1440), "#SBATCH --gpus-per-node=1"),
        # trainer=ddp is accelerator=auto: GPUs asked for (dropped where the partition has none)
        (["trainer=ddp"], (1, 2, 2, 4, 32, 1440), "#SBATCH --gpus-per-node=2"),
        (
            ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            (2, 4, 4, 4, 64, 1440),
            "#SBATCH --gpus-per-node=4",
        ),
        (
            ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
            (1, 2, None, 4, 32, 1440),
            None,
        ),
    ],
    ids=["cpu", "gpu", "ddp", "ddp_2x4", "ddp_cpu"],
)  # fmt: skip
def test_launcher_composes_to_sbatch_parameters_of_the_trainer(
    trainer, expected, gres, monkeypatch
):
    params = _launcher(*trainer)
    assert tuple(params[k] for k in KEYS) == expected
    assert params["_target_"] == "hydra_plugins.xmodal_slurm._launcher.XmodalSlurmLauncher"
    assert params["resume"] == "auto" and params["signal_delay_s"] == 120
    assert params["max_num_timeout"] == 10 and params["name"] == "xmodal-train"
    lines = _sbatch(params, monkeypatch)
    nodes, tasks, _, cpus, mem, minutes = expected
    for line in (
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={mem}GB",
        f"#SBATCH --time={minutes}",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=xmodal-train",
    ):
        assert line in lines, (line, lines)
    gpu_lines = [line for line in lines if "gpu" in line or "gres" in line]
    assert gpu_lines == ([gres] if gres else []), lines


def test_launcher_overrides_reach_sbatch(monkeypatch):
    params = _launcher(
        "trainer=cpu",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.signal_delay_s=30",
        "+hydra.launcher.additional_parameters.qos=high",
    )
    lines = _sbatch(params, monkeypatch)
    for line in ("--partition=debug", "--cpus-per-task=1", "--mem=2GB", "--time=5"):
        assert f"#SBATCH {line}" in lines
    assert "#SBATCH --signal=USR2@30" in lines and "#SBATCH --qos=high" in lines


def test_devices_that_are_no_count_stop_at_compose_time():
    with pytest.raises(Exception, match=r"trainer.devices=<n>"):
        _launcher("trainer=ddp", "trainer.devices=auto")
    assert tasks_per_node([0, 1, 2]) == 3 and tasks_per_node("2") == 2
    assert gpus_per_node("cpu", 4) is None and gpus_per_node("cuda", "0,1") == 2


SINFO = """gpu|64|515000|gpu:a100:8(S:0-1)|4
debug*|2|21694|(null)|1
mixed|16+|1|gpu:2,shard:8|3
mixed|32|64000|(null)|2
"""


def test_sinfo_output_is_read_per_node_group():
    assert parse_gpus("gpu:a100:8(S:0-1)") == 8 and parse_gpus("gpu:2,shard:8") == 2
    assert parse_gpus("(null)") == 0 and parse_gpus("") == 0
    assert parse_sinfo(SINFO, None) == Partition("debug", (NodeKind(2, 21694, 0, 1),))
    gpu = parse_sinfo(SINFO, "gpu")
    assert gpu.max_cpus == 64 and gpu.max_gpus == 8 and gpu.nodes[0].mem_mb == 515000
    mixed = parse_sinfo(SINFO, "mixed")  # RealMemory unset (1 MB): memory unknown
    assert mixed.nodes == (NodeKind(16, None, 2, 3), NodeKind(32, 64000, 0, 2))
    assert parse_sinfo(SINFO, "nope") is None and parse_sinfo("", None) is None


DEBUG = Partition("debug", (NodeKind(cpus=2, mem_mb=21694, gpus=0),))
GPU = Partition("gpu", (NodeKind(cpus=64, mem_mb=515000, gpus=8),))


def test_a_partition_sinfo_does_not_list_stops_before_submission(monkeypatch):
    from xmodal import slurm

    def sinfo(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout=SINFO, stderr="")

    monkeypatch.setattr(slurm.subprocess, "run", sinfo)
    assert slurm.read_partition(None).name == "debug"
    assert slurm.read_partition("gpu").max_gpus == 8
    with pytest.raises(ConfigError, match=r"no such partition; it lists debug\*, gpu, mixed"):
        slurm.read_partition("gpus")
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **kw: (_ for _ in ()).throw(OSError))
    assert slurm.read_partition("gpu") is None  # no sinfo here: nothing to check against


def test_request_fitted_to_a_small_cpu_partition():
    cpu = {"tasks_per_node": 1, "cpus_per_task": 4, "mem_gb": 16, "gpus_per_node": None}
    fitted, notes = fit_request(cpu, DEBUG, "cpu")
    assert (fitted["cpus_per_task"], fitted["mem_gb"]) == (2, 16) and len(notes) == 1
    assert "cpus_per_task=4 x 1 task(s) exceeds the 2 CPUs" in notes[0]
    ddp = {"tasks_per_node": 2, "cpus_per_task": 4, "mem_gb": 32, "gpus_per_node": 2}
    fitted, notes = fit_request(ddp, DEBUG, "auto")  # auto: no GPUs here, runs on CPUs
    assert fitted == {"tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 21, "gpus_per_node": None}
    assert len(notes) == 3 and "no GPUs" in notes[0]
    unknown_memory = Partition("m", (NodeKind(cpus=8, mem_mb=None, gpus=0),))
    fitted, notes = fit_request(cpu, unknown_memory, "cpu")
    assert fitted["mem_gb"] is None and fitted["cpus_per_task"] == 4 and "RealMemory" in notes[0]
    fitted, notes = fit_request({**ddp, "gpus_per_node": 8, "tasks_per_node": 8}, GPU, "gpu")
    assert notes == [] and fitted["gpus_per_node"] == 8


def test_requests_no_node_can_hold_stop_before_submission():
    with pytest.raises(ConfigError, match="has no GPUs.*trainer=cpu"):
        fit_request({"tasks_per_node": 1, "gpus_per_node": 1}, DEBUG, "gpu")
    with pytest.raises(ConfigError, match="at most 8 GPUs"):
        fit_request({"tasks_per_node": 16, "gpus_per_node": 16}, GPU, "gpu")
    with pytest.raises(ConfigError, match="at most 2 CPUs"):
        fit_request({"tasks_per_node": 4, "gpus_per_node": None}, DEBUG, "cpu")


def test_requeued_attempt_continues_its_run():
    first = with_resume(["seed=1", "force=true"], "auto")
    assert first == ["seed=1", "force=true", "resume=auto"]
    assert with_resume(["resume=null"], "auto") == ["resume=null"]  # the command line decides
    assert with_resume(["seed=1"], None) == ["seed=1"]
    # a requeued attempt never starts over, whatever the first one said
    assert continue_overrides(["seed=1", "force=true", "resume=null", "+x=1"]) == [
        "seed=1",
        "+x=1",
        "resume=auto",
    ]


def test_requeued_job_gets_resume_auto(monkeypatch):
    from hydra_plugins.xmodal_slurm import XmodalSlurmLauncher

    seen = []
    submitit_launcher = XmodalSlurmLauncher.__mro__[1]  # what runs the job (Hydra's run_job)
    monkeypatch.setattr(submitit_launcher, "__call__", lambda self, o, *rest: seen.append(o))
    launcher = XmodalSlurmLauncher(**{k: v for k, v in _launcher().items() if k != "_target_"})
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    launcher(["force=true"], "hydra.sweep.dir", 0, "j", {})
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    launcher(["force=true"], "hydra.sweep.dir", 0, "j", {})
    assert seen == [["force=true"], ["resume=auto"]]
    requeued = launcher.checkpoint(["seed=3", "force=true"], "hydra.sweep.dir", 0, "j", {})
    assert requeued.args[0] == ["seed=3", "resume=auto"] and requeued.function is launcher


def test_squeue_states_replace_sacct_with_one_notice(monkeypatch, caplog):
    from xmodal.cli import _slurm

    calls = []

    def no_sacct(cmd, **kwargs):
        calls.append(cmd[0])
        raise subprocess.CalledProcessError(1, cmd, stderr=b"Slurm accounting storage is disabled")

    monkeypatch.setattr(_slurm.subprocess, "check_output", no_sacct)
    queue = {"41_0": "RUNNING", "41_1": "PENDING"}
    monkeypatch.setattr(_slurm, "squeue_states", lambda ids: {j: queue.get(j, GONE) for j in ids})
    watcher = _slurm.SqueueFallbackWatcher(delay_s=60)
    for job in ("41_0", "41_1"):
        watcher.register_job(job)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            watcher.update()
        assert watcher.get_state("41_0", mode="cache") == "RUNNING"
        assert not watcher.is_done("41_1", mode="cache")
        del queue["41_0"]  # it left the queue: ended (its result file says how)
        watcher.update()
    assert watcher.is_done("41_0", mode="cache") and watcher.get_state("41_0") == GONE
    assert calls == ["sacct"]  # tried once
    notices = [r.getMessage() for r in caplog.records if "sacct" in r.getMessage()]
    assert notices == [
        "sacct is not available (Slurm accounting storage is disabled): following the jobs with "
        "squeue instead"
    ]
    assert parse_squeue("12_3|RUNNING\n14|PENDING\n\n") == {"12_3": "RUNNING", "14": "PENDING"}


def test_ledger_line_written_by_rank_zero_only(tmp_path, monkeypatch):
    from xmodal.cli._hydra import LEDGER_ENV, record_outcome

    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    monkeypatch.delenv("RANK", raising=False)
    for rank in ("1", "0"):  # the two SLURM tasks of one DDP job
        monkeypatch.setenv("SLURM_PROCID", rank)
        record_outcome(tmp_path / "run", "done")
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert lines == [{"run_dir": str(tmp_path / "run"), "status": "done", "error": None}]


def test_resumable_loader_continues_a_pass_where_it_stopped():
    from torch.utils.data import TensorDataset

    from xmodal.data.datamodule import train_loader

    data = TensorDataset(torch.arange(40))
    full = train_loader(data, 8, None, seed=3)
    full.sampler.set_epoch(2)
    uninterrupted = [b[0].tolist() for b in full]
    assert full.position == (2, 5) and full.state_dict() == {"epoch": 2, "batches": 5}
    resumed = train_loader(data, 8, None, seed=3)
    resumed.sampler.set_epoch(2)
    resumed.load_state_dict({"epoch": 2, "batches": 3})
    assert [b[0].tolist() for b in resumed] == uninterrupted[3:]
    assert resumed.position == (2, 5)
    assert [b[0].tolist() for b in resumed] == uninterrupted  # the next pass is whole again
    other_epoch = train_loader(data, 8, None, seed=3)
    other_epoch.sampler.set_epoch(3)
    other_epoch.resume_at(2, 3)  # a position in another epoch is not applied
    assert len(list(other_epoch)) == 5


def test_log_rows_before_a_mid_epoch_checkpoint_are_kept(tmp_path):
    import csv

    from xmodal.loggers import CSVLogger

    first = CSVLogger(tmp_path, name="csv", version="")
    for epoch, step in ((0, 4), (1, 9), (1, 12), (2, 14)):
        first.log_metrics({"loss": float(step), "epoch": epoch}, step=step)
    first.log_metrics({"lr": 0.1}, step=9)
    first.log_metrics({"lr": 0.2}, step=12)
    first.save()
    resumed = CSVLogger(tmp_path, name="csv", version="")
    # resumed in epoch 1 at step 11: epoch 1's rows before it stay, later ones go
    assert resumed.experiment.drop_from(1, 11) == 3
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [(r["epoch"], r["step"], r["loss"] or r["lr"]) for r in csv.DictReader(f)]
    assert rows == [("0", "4", "4.0"), ("1", "9", "9.0"), ("", "9", "0.1")]


def test_interrupted_attempts_are_recorded(tmp_path):
    from omegaconf import OmegaConf

    from xmodal.callbacks import TrainingStopped
    from xmodal.runs import RunDir

    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "seed": 0, "force": False})
    run = RunDir(cfg, [])
    run.start()
    run.fail(TrainingStopped("SIGUSR2 during training: saved last.ckpt", 140))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "interrupted" and not (tmp_path / "run" / "run.lock").exists()
    assert info["interrupted"][0]["reason"].startswith("TrainingStopped: SIGUSR2 during training")


def test_a_signal_waits_for_the_validation_that_follows_its_batch():
    from types import SimpleNamespace

    from xmodal.callbacks import _evaluation_follows

    per_epoch = SimpleNamespace(num_training_batches=6, val_check_batch=6, global_step=9)
    assert not _evaluation_follows(per_epoch, 2) and _evaluation_follows(per_epoch, 5)
    thrice = SimpleNamespace(num_training_batches=6, val_check_batch=2, global_step=9)
    assert _evaluation_follows(thrice, 1) and not _evaluation_follows(thrice, 2)
    none = SimpleNamespace(num_training_batches=6, val_check_batch=float("inf"), global_step=3)
    assert not _evaluation_follows(none, 2) and _evaluation_follows(none, 5)


def test_random_state_survives_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from xmodal.callbacks import _random_state, _set_random_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(3), np.random.rand(), np.random.randn(), random.random()  # mid-stream states
    torch.save({"state": _random_state()}, tmp_path / "c.ckpt")
    draws = (torch.rand(4), np.random.rand(2), np.random.randn(), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    _set_random_state(torch.load(tmp_path / "c.ckpt", weights_only=True)["state"])
    again = (torch.rand(4), np.random.rand(2), np.random.randn(), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2:] == again[2:]


def test_hydra_instantiates_the_launcher_from_its_config():
    """Hydra accepts only plugins defined in the ``hydra_plugins`` namespace and found by its
    scan: the composed ``hydra.launcher`` must instantiate (as ``-m launcher=slurm`` does)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.xmodal_slurm import XmodalSlurmLauncher

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", ["launcher=slurm"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = Plugins.instance()._instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, XmodalSlurmLauncher) and launcher.resume == "auto"
