"""Self-describing, idempotent run directories.

A run directory ``<output>/<task>/<experiment>/<hash of overrides>/`` holds:

- ``config.yaml``: the resolved config;
- ``overrides.yaml``: the command-line overrides that made it;
- ``run.json``: git SHA, start/end time, status (``running`` | ``done`` | ``failed``), world size;
- ``metrics.json``: the final metrics, written last and atomically, so its presence means "done".

Only rank 0 writes. A run whose ``metrics.json`` exists is skipped unless ``force=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.json"


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
    """Rank of this process before or after torch.distributed is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    # Lightning's subprocess launcher sets LOCAL_RANK and NODE_RANK; only "is it 0" matters here
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return node * 1_000_000 + int(os.environ.get("LOCAL_RANK", "0"))


def is_finished(run_dir: Path | str) -> bool:
    return (Path(run_dir) / METRICS_FILE).is_file()


def read_metrics(run_dir: Path | str) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


class RunDir:
    """The run directory of one job: start it, record the outcome, write the metrics."""

    def __init__(self, cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.path = Path(cfg.run_dir)
        self.overrides = list(overrides)
        self.rank = global_rank()

    @property
    def finished(self) -> bool:
        return is_finished(self.path)

    def start(self) -> None:
        """Record the resolved config, the overrides and the git SHA (rank 0 only)."""
        if self.rank != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        atomic_write_text(self.path / "overrides.yaml", OmegaConf.to_yaml(self.overrides))
        if self.cfg.get("force") and self.finished:
            # keep the previous result next to the new run instead of silently losing it
            os.replace(self.path / METRICS_FILE, self.path / f"metrics.{int(time.time())}.json")
        self._update_run_info(
            status="running",
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            git_sha=git_sha(),
        )

    def note(self, **fields: Any) -> None:
        """Add facts to run.json (rank 0 only), e.g. the world size once the trainer exists."""
        if self.rank == 0:
            self._update_run_info(**fields)

    def finish(self, metrics: Mapping[str, Any]) -> None:
        if self.rank != 0:
            return
        atomic_write_json(self.path / METRICS_FILE, dict(metrics))
        self._update_run_info(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def fail(self, error: BaseException) -> None:
        if self.rank != 0:
            return
        self._update_run_info(status="failed", error=f"{type(error).__name__}: {error}")

    def _update_run_info(self, **fields: Any) -> None:
        info_path = self.path / "run.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info.update(fields)
        atomic_write_json(info_path, info)
