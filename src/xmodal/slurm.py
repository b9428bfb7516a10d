"""SLURM knowledge for ``launcher=slurm``, free of torch and submitit (the config layer uses it).

- What the trainer asks of the cluster: one task per device (rank), GPUs only for GPU trainers
  (:func:`tasks_per_node`, :func:`gpus_per_node`, the ``xmodal.slurm_*`` resolvers).
- What a partition offers, read with ``sinfo`` (:func:`read_partition`), and the request fitted
  to it before anything is submitted (:func:`fit_request`).
- Requeued jobs: a requeued attempt continues its run (:func:`continue_overrides`).
- Job states from ``squeue`` when ``sacct`` does not work (no accounting storage):
  :func:`squeue_states`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xmodal.errors import ConfigError

log = logging.getLogger("xmodal")

#: Lightning accelerators that run on GPUs; ``auto`` asks for GPUs too (it uses them when the
#: node has them) and falls back to CPU when the partition has none (see :func:`fit_request`).
GPU_ACCELERATORS = ("gpu", "cuda", "auto")


def tasks_per_node(devices: Any) -> int:
    """SLURM tasks per node for ``trainer.devices``: one task per device (a DDP rank each)."""
    if isinstance(devices, bool):
        devices = None
    if isinstance(devices, int) and devices >= 1:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) >= 1:
        return int(devices)
    if isinstance(devices, (list, tuple)) and devices:
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    raise ConfigError(
        f"launcher=slurm starts one SLURM task per device, so trainer.devices must say how many; "
        f"found trainer.devices={devices!r}. Fix: trainer.devices=<n> (e.g. trainer.devices=4)."
    )


def gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """``--gpus-per-node`` for a trainer: its device count for GPU trainers, None (no GRES) for
    CPU ones. A request for GPUs on a partition without them is caught by :func:`fit_request`."""
    if str(accelerator).lower() not in GPU_ACCELERATORS:
        return None
    return tasks_per_node(devices)


def times(a: Any, b: Any) -> float | int:
    """``${xmodal.times:a,b}``: a * b (e.g. memory per node = memory per task x tasks)."""
    product = float(a) * float(b)
    return int(product) if product == int(product) else product


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    for name, fn in (
        ("xmodal.slurm_tasks", tasks_per_node),
        ("xmodal.slurm_gpus", gpus_per_node),
        ("xmodal.times", times),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ----------------------------------------------------------------------------------------------
# What a partition offers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeKind:
    """One group of identical nodes of a partition, as ``sinfo`` lists them."""

    cpus: int
    mem_mb: int | None  # None: the nodes do not declare their memory (RealMemory unset)
    gpus: int
    count: int = 1


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[NodeKind, ...]

    @property
    def max_cpus(self) -> int:
        return max(n.cpus for n in self.nodes)

    @property
    def max_gpus(self) -> int:
        return max(n.gpus for n in self.nodes)


_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)")
SINFO_FORMAT = "%P|%c|%m|%G|%D"


def parse_gpus(gres: str) -> int:
    """GPUs per node in sinfo's GRES column: ``gpu:4``, ``gpu:a100:4(S:0-1)``, ``(null)``."""
    return sum(int(n) for n in _GPU_GRES.findall(gres or ""))


def _number(text: str) -> int:
    return int(text.strip().rstrip("+"))


def parse_sinfo(text: str, partition: str | None) -> Partition | None:
    """The partition named (or the default one, marked ``*``) in ``sinfo -h -o '%P|%c|%m|%G|%D'``
    output; None when it is not listed."""
    groups: dict[str, list[NodeKind]] = {}
    default = None
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5 or not fields[0]:
            continue
        name, cpus, mem, gres, count = fields
        if name.endswith("*"):
            name = name[:-1]
            default = name
        try:
            mem_mb = _number(mem)
            kind = NodeKind(
                cpus=_number(cpus),
                mem_mb=mem_mb if mem_mb >= 1024 else None,  # RealMemory defaults to 1 MB
                gpus=parse_gpus(gres),
                count=_number(count),
            )
        except ValueError:
            continue
        groups.setdefault(name, []).append(kind)
    name = partition or default
    if name is None or name not in groups:
        return None
    return Partition(name, tuple(groups[name]))


def read_partition(partition: str | None) -> Partition | None:
    """What ``sinfo`` says about ``partition`` (None: the default partition); None when sinfo is
    missing or fails. A partition sinfo does not list stops with the ones it does list."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    found = parse_sinfo(out.stdout, partition)
    if found is None and out.stdout.strip():
        names = sorted({line.split("|", 1)[0] for line in out.stdout.splitlines() if "|" in line})
        raise ConfigError(
            f"hydra.launcher.partition={partition or '(the default)'}: sinfo lists no such "
            f"partition; it lists {', '.join(names)} (* marks the default). Fix: "
            "hydra.launcher.partition=<one of them>."
        )
    return found


def fit_request(
    params: dict[str, Any], partition: Partition, accelerator: str
) -> tuple[dict[str, Any], list[str]]:
    """Fit the launcher's per-node request to what ``partition`` offers.

    Returns the adjusted parameters and one note per change: CPUs per task lowered to what a node
    has per task, memory lowered to a node's (or dropped where nodes declare none), GPUs dropped
    for ``trainer.accelerator=auto`` on a partition without GPUs. A request no node can ever hold
    (more tasks than CPUs, GPUs the partition does not have) raises :class:`ConfigError`.
    """
    out = dict(params)
    notes: list[str] = []
    name = partition.name
    tasks = int(out.get("tasks_per_node") or 1)
    if tasks > partition.max_cpus:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} (one task per trainer.devices) but the nodes "
            f"of partition {name!r} have at most {partition.max_cpus} CPUs, one per task at "
            "least. Fix: fewer devices per node and more nodes (trainer.devices, "
            "trainer.num_nodes), or another partition (hydra.launcher.partition=...)."
        )
    gpus = out.get("gpus_per_node")
    if gpus:
        if partition.max_gpus == 0:
            if str(accelerator).lower() != "auto":
                raise ConfigError(
                    f"trainer.accelerator={accelerator} asks for {gpus} GPU(s) per node but "
                    f"partition {name!r} has no GPUs (sinfo lists no gpu GRES). Fix: a GPU "
                    "partition (hydra.launcher.partition=...), or trainer=cpu to run on CPUs."
                )
            out["gpus_per_node"] = None
            notes.append(
                f"partition {name!r} has no GPUs: trainer.accelerator=auto runs on CPUs "
                "(no --gpus-per-node)"
            )
        elif gpus > partition.max_gpus:
            raise ConfigError(
                f"hydra.launcher.gpus_per_node={gpus} (trainer.devices) but the nodes of "
                f"partition {name!r} have at most {partition.max_gpus} GPUs. Fix: "
                f"trainer.devices={partition.max_gpus} with more nodes (trainer.num_nodes)."
            )
    need_gpus = out.get("gpus_per_node") or 0
    nodes = [n for n in partition.nodes if n.gpus >= need_gpus and n.cpus >= tasks]
    node = max(nodes, key=lambda n: (n.cpus, n.mem_mb or 0))
    cpus = out.get("cpus_per_task")
    if cpus and cpus * tasks > node.cpus:
        fitted = max(1, node.cpus // tasks)
        out["cpus_per_task"] = fitted
        notes.append(
            f"hydra.launcher.cpus_per_task={cpus} x {tasks} task(s) exceeds the {node.cpus} CPUs "
            f"of a node of partition {name!r}: using cpus_per_task={fitted}"
        )
    mem_gb = out.get("mem_gb")
    if mem_gb:
        if node.mem_mb is None:
            out["mem_gb"] = None
            notes.append(
                f"the nodes of partition {name!r} declare no memory (RealMemory): submitting "
                f"without --mem instead of hydra.launcher.mem_gb={mem_gb}"
            )
        elif mem_gb * 1024 > node.mem_mb:
            fitted_gb = node.mem_mb // 1024
            out["mem_gb"] = fitted_gb or None
            notes.append(
                f"hydra.launcher.mem_gb={mem_gb} exceeds the {node.mem_mb} MB of a node of "
                f"partition {name!r}: using mem_gb={fitted_gb}"
            )
    return out, notes


# ----------------------------------------------------------------------------------------------
# Requeued jobs
# ----------------------------------------------------------------------------------------------


def restart_count() -> int:
    """How many times SLURM restarted this job (``SLURM_RESTART_COUNT``; 0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_resume(overrides: Sequence[str], resume: str | None) -> list[str]:
    """``overrides`` plus ``resume=<resume>`` unless they set ``resume`` already."""
    out = list(overrides)
    if resume and not any(_key(o) == "resume" for o in out):
        out.append(f"resume={resume}")
    return out


def continue_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of a requeued attempt: it continues its own run from ``last.ckpt``
    (``resume=auto``) and never starts over (no ``force``), whatever the first attempt said."""
    kept = [o for o in overrides if _key(o) not in ("force", "resume")]
    return [*kept, "resume=auto"]


# ----------------------------------------------------------------------------------------------
# Job states without sacct
# ----------------------------------------------------------------------------------------------

#: State given to a job that squeue no longer lists (it ended; how, only its result file says).
GONE = "ENDED"


def parse_squeue(text: str) -> dict[str, str]:
    """``{job id: state}`` from ``squeue -h -r -o '%i|%T'`` (array tasks as ``<array>_<task>``)."""
    states = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            states[job] = state
    return states


def squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """The states of ``job_ids``: squeue's for the jobs it lists, :data:`GONE` for the others.
    None when squeue itself fails (then nothing is known)."""
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    listed = parse_squeue(out)
    return {j: listed.get(j, GONE) for j in job_ids}
