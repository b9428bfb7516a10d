"""Shared glue for the ``@hydra.main`` entry points: expected failures, sweeps and their summary."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from xmodal.config import check_additions, conf_dir, register_configs
from xmodal.console import headline, set_verbosity
from xmodal.errors import (
    EXIT_EXPECTED,
    ConfigError,
    XmodalError,
    expected_message,
    find_expected,
)
from xmodal.runs import global_rank

log = logging.getLogger("xmodal")

#: Environment variables that mean an external launcher already started one process per rank.
EXTERNAL_LAUNCHER_ENV = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
#: Set by :class:`SweepSummary` for the jobs of one sweep: where they record their outcome.
LEDGER_ENV = "XMODAL_SWEEP_LEDGER"


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
        raise ConfigError(
            f"multirun (-m) with in-process DDP (trainer.devices={devices}, "
            f"trainer.num_nodes={trainer.num_nodes}) is refused: each rank would re-launch the "
            "sweep. Use an external launcher instead: `launcher=slurm` (one SLURM task per rank), "
            "or run each job with torchrun, or sweep with trainer.devices=1."
        )


def exit_expected(err: BaseException) -> NoReturn:
    """Print an expected failure as its one paragraph and exit with code 2 (outside a job, e.g.
    in a launcher before anything was submitted)."""
    print(f"\nxmodal: {expected_message(err)}\n", file=sys.stderr)
    sys.exit(EXIT_EXPECTED)


def report_expected(err: BaseException, verbose: bool) -> bool:
    """Print an expected failure as its one paragraph (with the traceback when ``verbose``);
    returns False when ``err`` is not an expected failure."""
    expected = find_expected(err)
    if expected is None:
        return False
    if verbose:
        traceback.print_exception(err)
    print(f"\nxmodal: {expected_message(expected)}\n", file=sys.stderr)
    return True


def _metrics_mtime(run_dir: Path) -> int | None:
    try:
        return (run_dir / "metrics.json").stat().st_mtime_ns
    except OSError:
        return None


def record_outcome(run_dir: Path, status: str, error: str | None = None) -> None:
    """Append this job's outcome to the sweep's ledger (one JSON line per job; in a job of
    several processes, such as DDP ranks started by SLURM, rank 0 speaks for the job)."""
    ledger = os.environ.get(LEDGER_ENV)
    if not ledger or global_rank() != 0:
        return
    line = {"run_dir": str(run_dir), "status": status, "error": error}
    Path(ledger).parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "a") as f:  # one short write per job: appends do not interleave
        f.write(json.dumps(line) + "\n")


def hydra_entry(config_name: str, run: Callable[[DictConfig, list[str]], Any]) -> Callable[[], Any]:
    """Make a console-script ``main()`` that composes ``conf/<config_name>.yaml`` and calls run.

    - An expected failure (``xmodal.errors.XmodalError``: a bad dataset layout, a broken file, a
      run directory in use) ends the run with its one-paragraph explanation and exit code 2;
      ``verbose=true`` adds the traceback.
    - In a multirun sweep a failing job is recorded as failed in its run directory and the sweep
      goes on; the sweep ends with a summary of every job and exits with code 1 when any failed
      (:class:`SweepSummary`). Re-running the sweep skips finished jobs and redoes failed ones.
    """

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        run_dir = Path(str(cfg.run_dir))
        before = _metrics_mtime(run_dir)
        verbose = bool(cfg.get("verbose"))
        set_verbosity(verbose)
        try:
            check_additions(overrides, hydra_cfg.runtime.choices, config_name)
            if multirun:
                refuse_multirun_with_in_process_ddp(cfg)
            metrics = run(cfg, overrides)
        except Exception as err:  # noqa: BLE001 - reported, then the exit code says it
            record_outcome(run_dir, "failed", f"{type(err).__name__}: {expected_message(err)}")
            expected = report_expected(err, verbose)
            if not multirun:
                if expected:
                    sys.exit(EXIT_EXPECTED)
                raise
            if not expected:
                log.exception("job %s failed; the sweep continues", hydra_cfg.job.num)
            return None
        after = _metrics_mtime(run_dir)
        skipped = after is not None and after == before
        record_outcome(run_dir, "skipped" if skipped else "done")
        log.info("%s: %s", "finished earlier, skipped" if skipped else "done", run_dir)
        for line in headline(metrics or {}):
            log.info(line)
        return None

    def main() -> Any:
        args = sys.argv[1:]
        if "--version" in args:
            from xmodal import __version__

            print(f"xmodal {__version__}")
            return None
        if "--help" in args or "-h" in args:
            from xmodal.cli.help import render

            print(render(config_name))
            return None
        if any(a in ("launcher=slurm", "launcher=local") for a in args):
            from xmodal.extras import check

            try:
                check("hydra_plugins.hydra_submitit_launcher")
            except XmodalError as err:
                print(f"xmodal: {err}", file=sys.stderr)
                sys.exit(EXIT_EXPECTED)
        register_configs()
        _skip_mode_composition(args)
        return _main()

    return main


def _skip_mode_composition(args: list[str]) -> None:
    """Hydra 1.3 composes the whole config once just to read ``hydra.mode`` before composing it
    again for the job. xmodal's configs never set ``hydra.mode``, so the mode is the ``-m`` flag,
    exactly what Hydra falls back to when ``get_mode`` finds nothing: skip that first composition
    (a third of the start-up of every command) unless the command line sets ``hydra.mode``."""
    if any(a.startswith(("hydra.mode=", "++hydra.mode=")) for a in args):
        return
    from hydra._internal.hydra import Hydra

    Hydra.get_mode = lambda self, *args, **kwargs: None  # type: ignore[method-assign]


class SweepSummary(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): every job of a multirun records its outcome
    in a ledger; when the sweep ends, print one line per job and exit with code 1 if any failed,
    so CI and SLURM scripts see the failure. Works for in-process and submitit launchers (the
    jobs inherit the ledger's path through the environment)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir)) / ".sweeps"
        ledger = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        os.environ[LEDGER_ENV] = str(ledger)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        ledger = os.environ.pop(LEDGER_ENV, None)
        if not ledger:
            return
        try:
            lines = Path(ledger).read_text().splitlines()
        except OSError:
            lines = []
        jobs = [json.loads(line) for line in lines if line.strip()]
        counts = {s: sum(j["status"] == s for j in jobs) for s in ("done", "skipped", "failed")}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        print(f"\nxmodal sweep: {len(jobs)} job(s): {summary} (ledger {ledger})")
        for job in jobs:
            error = f"\n      {job['error'].splitlines()[0]}" if job.get("error") else ""
            print(f"  {job['status']:<8} {job['run_dir']}{error}")
        if counts["failed"]:
            print(
                f"xmodal sweep: {counts['failed']} job(s) failed; re-run the same command to "
                "redo them (finished jobs are skipped).",
                file=sys.stderr,
            )
            sys.exit(1)
