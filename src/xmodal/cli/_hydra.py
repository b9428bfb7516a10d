"""Shared glue for the ``@hydra.main`` entry points."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from xmodal.config import conf_dir, register_configs
from xmodal.data.base import DatasetLayoutError

log = logging.getLogger("xmodal")

#: Environment variables that mean an external launcher already started one process per rank.
EXTERNAL_LAUNCHER_ENV = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def refuse_multirun_with_in_process_ddp(cfg: DictConfig) -> None:
    """In a sweep, Lightning's in-process DDP launcher would re-run the whole command (and sweep)
    in its child processes; only an external launcher (SLURM, torchrun) may start the ranks."""
    trainer = cfg.trainer
    devices = trainer.devices
    many = (
        (isinstance(devices, int) and devices > 1)
        or devices in ("-1", -1)
        or (trainer.num_nodes > 1)
    )
    if many and not any(v in os.environ for v in EXTERNAL_LAUNCHER_ENV):
        raise RuntimeError(
            f"multirun (-m) with in-process DDP (trainer.devices={devices}, "
            f"trainer.num_nodes={trainer.num_nodes}) is refused: each rank would re-launch the "
            "sweep. Use an external launcher instead: `launcher=slurm` (one SLURM task per rank), "
            "or run each job with torchrun, or sweep with trainer.devices=1."
        )


def hydra_entry(config_name: str, run: Callable[[DictConfig, list[str]], Any]) -> Callable[[], Any]:
    """Make a console-script ``main()`` that composes ``conf/<config_name>.yaml`` and calls run.

    - A bad dataset layout ends the run with its one-paragraph explanation (exit code 2).
    - In a multirun sweep a failing job is recorded as failed in its run directory and logged, and
      the sweep goes on; re-running the sweep skips finished jobs and redoes failed ones.
    """
    register_configs()

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        try:
            if multirun:
                refuse_multirun_with_in_process_ddp(cfg)
            run(cfg, overrides)
        except DatasetLayoutError as err:
            print(f"\nxmodal: {err}\n", file=sys.stderr)
            if not multirun:
                sys.exit(2)
        except Exception:
            if not multirun:
                raise
            log.exception(
                "job %s failed; the sweep continues (re-run it to redo failed jobs)",
                hydra_cfg.job.num,
            )

    return _main
