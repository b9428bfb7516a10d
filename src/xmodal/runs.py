"""Self-describing, idempotent run directories that never report a stale number.

A run directory ``<output>/<task>/<experiment>/<hash of overrides>/`` holds:

- ``config.yaml``: the resolved config;
- ``overrides.yaml``: the command-line overrides that made it;
- ``run.json``: git SHA, xmodal version, host and pid, start/end time, status (``running`` |
  ``done`` | ``failed`` | ``interrupted``), world size, earlier interrupted attempts;
- ``inputs.json``: what decided the result: the resolved config without the settings that do not
  change it (devices, loggers, paths, ...) and the fingerprint of every file the run read (images,
  annotation files, weights, upstream checkpoints; :mod:`xmodal.inputs`);
- ``metrics.json``: the final metrics, written last and atomically, so its presence means "done";
- ``run.lock`` while a process works in it; ``previous/<time>/`` for results a redo set aside.

Only rank 0 writes. A finished run is skipped only while its recorded config and input files are
unchanged; otherwise it is redone and the reason printed (``force=true`` redoes it regardless).
Nothing computed is lost: a redo moves the old metrics, checkpoints and logs to ``previous/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xmodal import inputs
from xmodal.config import NEUTRAL_KEYS
from xmodal.errors import RunConflictError

log = logging.getLogger("xmodal")

METRICS_FILE = "metrics.json"
INPUTS_FILE = "inputs.json"
LOCK_FILE = "run.lock"
PREVIOUS_DIR = "previous"
#: Kept in place when a redo sets the old results aside (they describe the run, not a result).
KEEP_ON_REDO = {"config.yaml", "overrides.yaml", "run.json", LOCK_FILE, PREVIOUS_DIR}
#: A lock whose holder has not refreshed it for this long is stale (its host died).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

#: Left out of the result-deciding config: the neutral keys, and the run's own name and place.
RESULT_NEUTRAL = (*NEUTRAL_KEYS, "run_name", "run_hash", "run_dir")


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def git_sha(cwd: Path | str | None = None) -> str | None:
    """The current commit of the xmodal checkout (``+dirty`` when it has local changes)."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def global_rank() -> int:
    """Rank of this process before or after torch.distributed is initialised (torch is not
    imported for it: the "finished, skipping" path stays cheap)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    # Lightning's subprocess launcher sets LOCAL_RANK and NODE_RANK; only "is it 0" matters here
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return node * 1_000_000 + int(os.environ.get("LOCAL_RANK", "0"))


def is_finished(run_dir: Path | str) -> bool:
    """Whether the run wrote its metrics (see :meth:`RunDir.stale_reason` for whether they are
    still current)."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def read_metrics(run_dir: Path | str) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def result_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without the keys that do not change the result
    (``xmodal.config.NEUTRAL_KEYS``)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out = json.loads(json.dumps(plain, default=str))  # a deep, JSON-typed copy
    for key in RESULT_NEUTRAL:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two plain configs (added and removed included)."""
    a, b = _flatten(dict(old)), _flatten(dict(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """``<run_dir>/run.lock``: one process works in a run directory at a time.

    The holder's pid, host and SLURM job id are written into the file and its modification time
    is refreshed every ``HEARTBEAT_S`` seconds by a daemon thread. A lock is stale (its holder is
    gone) when its pid is dead on this host, when it belongs to this very SLURM job (a requeued
    job), or when nobody refreshed it for ``STALE_AFTER_S`` seconds (its host died).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def me() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def is_stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # unreadable: a half-written lock from a process that died
            return True
        me = self.me()
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return True  # the same SLURM job, requeued
        if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return True
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        return age > STALE_AFTER_S

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; return the stale holder it replaced (None if there was none).

        Raises :class:`RunConflictError` when a live process holds it.
        """
        replaced = None
        self._stop = threading.Event()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if not self.is_stale(holder):
                    assert holder is not None
                    raise RunConflictError(
                        f"{self.path.parent} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('since')} (lock file "
                        f"{self.path}). Two runs of one config would write the same files. "
                        "Fix: wait for it to finish (re-running then skips or redoes it), or, if "
                        f"that process is gone, delete {self.path}."
                    ) from None
                replaced = holder or {}
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me(), f)
            self._thread = threading.Thread(target=self._beat, name="xmodal-run-lock", daemon=True)
            self._thread.start()
            return replaced
        raise RunConflictError(f"could not take the lock {self.path}; another process races for it")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    @property
    def held(self) -> bool:
        return self._thread is not None

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        holder = self.holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


class RunDir:
    """The run directory of one job: decide whether it is current, start it, record the outcome.

    Rank 0 alone writes; the other ranks of a DDP run only read.
    """

    def __init__(self, cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.path = Path(cfg.run_dir)
        self.overrides = list(overrides)
        self.rank = global_rank()
        self.lock = RunLock(self.path / LOCK_FILE)
        self.redo_reason: str | None = None

    @property
    def finished(self) -> bool:
        return is_finished(self.path)

    def recorded_inputs(self) -> dict[str, Any] | None:
        path = self.path / INPUTS_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def stale_reason(self) -> str | None:
        """Why the finished result may not be reused (None: its config and inputs are unchanged).

        Compares the recorded result-deciding config with this one, then the fingerprint of every
        recorded input file with the disk (one ``stat`` each).
        """
        recorded = self.recorded_inputs()
        if recorded is None or not recorded.get("complete"):
            return "it has no record of its inputs (inputs.json; written by an older xmodal)"
        diff = config_diff(recorded.get("config", {}), result_config(self.cfg))
        if diff:
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            return f"its config changed ({', '.join(diff[:3])}{more})"
        changed = inputs.changed_files(recorded.get("files", {}))
        if changed:
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            return f"an input file changed since it ran ({changed[0]}{more})"
        return None

    def checkpoints(self) -> list[Path]:
        folder = self.path / "checkpoints"
        return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []

    def start(self) -> None:
        """Take the run directory: lock it, account for an interrupted earlier attempt, set aside
        results a redo replaces, refuse to silently restart over checkpoints, and record the
        config, overrides and git SHA (rank 0 only)."""
        if self.rank != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        replaced = self.lock.acquire()
        try:
            self._start(replaced)
        except BaseException:
            self.lock.release()
            raise

    def _start(self, replaced: dict[str, Any] | None) -> None:
        info = self.info()
        if info.get("status") == "running":  # its process never recorded an outcome
            attempt = {k: info.get(k) for k in ("started", "pid", "host")}
            if replaced:
                attempt["pid"], attempt["host"] = replaced.get("pid"), replaced.get("host")
            self._update_run_info(
                status="interrupted", interrupted=[*info.get("interrupted", []), attempt]
            )
            log.warning(
                "run %s: its previous attempt (pid %s on %s, started %s) was interrupted "
                "(killed, or its machine went away) before it finished",
                self.path,
                attempt.get("pid"),
                attempt.get("host"),
                attempt.get("started"),
            )
        redo = bool(self.cfg.get("force")) or self.redo_reason is not None
        if redo:
            self.set_aside()
        elif not self.finished and self.checkpoints():
            self._check_resume()
        atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        atomic_write_text(self.path / "overrides.yaml", OmegaConf.to_yaml(self.overrides))
        atomic_write_json(
            self.path / INPUTS_FILE, {"complete": False, "config": result_config(self.cfg)}
        )
        from xmodal import __version__

        self._update_run_info(
            status="running",
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            git_sha=git_sha(),
            xmodal_version=__version__,
            pid=os.getpid(),
            host=socket.gethostname(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            redo_reason="force=true" if self.cfg.get("force") else self.redo_reason,
        )

    def _check_resume(self) -> None:
        """An unfinished run with checkpoints continues only with ``resume=auto`` (or a path),
        and only under the config its checkpoints were written with."""
        names = ", ".join(p.name for p in self.checkpoints())
        if not self.cfg.get("resume"):
            raise RunConflictError(
                f"{self.path} holds checkpoints ({names}) of an unfinished run. Starting again "
                "would silently train from scratch over them. Fix: add resume=auto to continue "
                "from checkpoints/last.ckpt, or force=true to start over (the old checkpoints "
                f"and logs are moved to {self.path / PREVIOUS_DIR})."
            )
        recorded = self.recorded_inputs()
        if recorded is None:
            return
        diff = config_diff(recorded.get("config", {}), result_config(self.cfg))
        if diff:
            raise RunConflictError(
                f"resume={self.cfg.get('resume')}: the checkpoints in {self.path} were written "
                f"under another config (changed: {', '.join(diff[:5])}). Resuming would mix "
                "two experiments. Fix: undo those changes, or use force=true to start over "
                f"(the old checkpoints are moved to {self.path / PREVIOUS_DIR})."
            )

    def set_aside(self) -> Path | None:
        """Move every earlier result (metrics, inputs record, checkpoints, logs, plots) into
        ``previous/<time>/``; returns that folder (None when there was nothing to move)."""
        movable = [
            p for p in self.path.iterdir() if p.name not in KEEP_ON_REDO and p.suffix != ".log"
        ]  # the job's log file is open (Hydra appends to <task>.log): it stays
        if not movable:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path / PREVIOUS_DIR / stamp
        n = 1
        while target.exists():
            target = self.path / PREVIOUS_DIR / f"{stamp}-{n}"
            n += 1
        target.mkdir(parents=True)
        for p in movable:
            shutil.move(str(p), target / p.name)
        log.info("run %s: earlier results moved to %s", self.path, target)
        return target

    def note(self, **fields: Any) -> None:
        """Add facts to run.json (rank 0 only), e.g. the world size once the trainer exists."""
        if self.rank == 0:
            self._update_run_info(**fields)

    def finish(self, metrics: Mapping[str, Any], used: inputs.InputLog | None = None) -> None:
        """Write the inputs record, then the metrics (their presence means "done")."""
        if self.rank != 0:
            return
        record = {"complete": True, "config": result_config(self.cfg)}
        record["files"] = used.as_tree() if used is not None else {}
        atomic_write_json(self.path / INPUTS_FILE, record)
        atomic_write_json(self.path / METRICS_FILE, dict(metrics))
        self._update_run_info(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.lock.release()

    def fail(self, error: BaseException) -> None:
        if self.rank != 0:
            return
        if not self.lock.held:
            return  # the run never started here (e.g. another process holds it)
        error_text = f"{type(error).__name__}: {error}"
        if isinstance(error, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, a signal, a requeue
            info = self.info()
            attempt = {k: info.get(k) for k in ("started", "pid", "host", "slurm_job_id")}
            attempt["reason"] = error_text
            self._update_run_info(
                status="interrupted",
                error=error_text,
                interrupted=[*info.get("interrupted", []), attempt],
            )
        else:
            self._update_run_info(status="failed", error=error_text)
        self.lock.release()

    def info(self) -> dict[str, Any]:
        path = self.path / "run.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _update_run_info(self, **fields: Any) -> None:
        info = self.info()
        info.update(fields)
        atomic_write_json(self.path / "run.json", info)
