"""``hydra/launcher=xmodal_slurm``: hydra-submitit-launcher's SLURM launcher, fitted to xmodal runs.

Selected by ``launcher=slurm`` (``conf/launcher/slurm.yaml``). On top of submitit's launcher:

- a job whose run is finished and current (config and inputs unchanged) is not submitted: the
  sweep reports it as skipped without queueing an allocation that would only skip it;
- before submitting, the request is fitted to what ``sinfo`` says the partition offers (CPUs per
  task, memory, GPUs; :func:`xmodal.slurm.fit_request`), and a request no node can hold stops
  with one paragraph instead of an sbatch error;
- every job gets ``resume=<hydra.launcher.resume>`` (``auto``) unless the command line sets
  ``resume``, and a requeued attempt (preempted, timed out, ``scontrol requeue``) continues its
  run from ``checkpoints/last.ckpt`` (``resume=auto``, no ``force``);
- jobs are followed with ``squeue`` when ``sacct`` does not work (no accounting storage): one
  notice instead of a warning at every poll, and a job that ends without a result (killed, out of
  memory) is seen as ended;
- a job that ended without a result is recorded as failed in the sweep's ledger, so the sweep
  summary lists it and the command exits 1 (``xmodal.cli._hydra.SweepSummary``).

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, so the launcher lives here.
It needs the ``slurm`` extra (hydra-submitit-launcher): Hydra's plugin scan skips ``_``-modules,
and the package's ``__init__`` imports this one only when the extra is installed, so a core install
scans without a warning. It imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger("xmodal")


@dataclass
class XmodalSlurmQueueConf(SlurmQueueConf):
    """submitit's SLURM parameters plus xmodal's (not passed to sbatch)."""

    _target_: str = "hydra_plugins.xmodal_slurm._launcher.XmodalSlurmLauncher"
    # added to every job as resume=<value> unless the command line sets resume (null: never)
    resume: str | None = "auto"
    # fit cpus_per_task / mem_gb / gpus_per_node to what sinfo says the partition offers
    fit_to_partition: bool = True


ConfigStore.instance().store(
    group="hydra/launcher", name="xmodal_slurm", node=XmodalSlurmQueueConf, provider="xmodal"
)

_XMODAL_KEYS = ("resume", "fit_to_partition")


def make_executor(params: dict[str, Any]) -> Any:
    """The submitit executor for the launcher's (fitted) parameters; its
    ``_executor._make_submission_file_text(command, uid)`` is the sbatch script jobs get."""
    import submitit

    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=params["submitit_folder"],
        slurm_max_num_timeout=params.get("max_num_timeout", 0),
    )
    base = set(BaseQueueConf.__dataclass_fields__)  # submitit's own names; the rest: slurm_*
    executor.update_parameters(
        **{
            (k if k in base else f"slurm_{k}"): v
            for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout", *_XMODAL_KEYS)
        }
    )
    return executor


class XmodalSlurmLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        self.resume = params.pop("resume", "auto")
        self.fit_to_partition = params.pop("fit_to_partition", True)
        super().__init__(**params)

    # -- in the job ------------------------------------------------------------------------

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Any],
    ) -> JobReturn:
        from xmodal.slurm import continue_overrides, restart_count

        restarts = restart_count()
        if restarts:
            sweep_overrides = continue_overrides(sweep_overrides)
            # before Hydra configures logging in the job: printed, not logged
            print(
                f"xmodal: SLURM restarted this job (attempt {restarts + 1}): continuing its run "
                "with resume=auto",
                file=sys.stderr,
                flush=True,
            )
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on the requeue signal (time limit, preemption): the requeued job
        continues its run (``resume=auto``, no ``force``)."""
        import submitit

        from xmodal.slurm import continue_overrides

        overrides, *rest = args
        return submitit.helpers.DelayedSubmission(self, continue_overrides(overrides), *rest)

    # -- in the submitting process ---------------------------------------------------------

    def _fitted_params(self) -> dict[str, Any]:
        from xmodal.slurm import fit_request, read_partition

        params = dict(self.params)
        if not self.fit_to_partition:
            return params
        partition = read_partition(params.get("partition"))
        if partition is None:
            log.info(
                "could not read partition %s with sinfo: submitting the request as configured",
                params.get("partition") or "(default)",
            )
            return params
        assert self.config is not None
        accelerator = str(self.config.trainer.get("accelerator", "auto"))
        params, notes = fit_request(params, partition, accelerator)
        for note in notes:
            log.warning(note)
        return params

    def _plan(self, overrides: Sequence[str]) -> tuple[str, bool]:
        """The run directory of one job of the sweep (as the job will compute it) and whether it
        holds a finished run whose config and inputs are unchanged: such a job is not submitted
        (the job would only skip it), and is reported as skipped."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict

        from xmodal.runs import RunDir, is_finished

        assert self.hydra_context is not None and self.config is not None
        previous = HydraConfig.instance().cfg
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            HydraConfig.instance().set_config(cfg)
            run_dir = str(OmegaConf.select(cfg, "run_dir"))
            if cfg.get("force") or not is_finished(run_dir):
                return run_dir, False
            with open_dict(cfg):
                del cfg["hydra"]
            OmegaConf.resolve(cfg)
            return run_dir, RunDir(cfg, list(overrides)).stale_reason() is None
        except Exception:  # noqa: BLE001 - the job itself decides; this is only a shortcut
            return "job " + " ".join(overrides), False
        finally:
            if previous is not None:
                HydraConfig.instance().set_config(previous)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from submitit.slurm.slurm import SlurmJob

        from xmodal.cli._hydra import exit_expected, record_outcome
        from xmodal.cli._slurm import SqueueFallbackWatcher
        from xmodal.errors import XmodalError
        from xmodal.slurm import with_resume

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        results: list[JobReturn | None] = []
        todo: list[tuple[int, list[str], str]] = []  # (position, overrides, run dir)
        jobs_args = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            overrides = with_resume(overrides, self.resume)
            run_dir, finished = self._plan(overrides)
            shown = " ".join(filter_overrides(overrides))
            if finished:
                log.info("\t#%d : %s  (finished and current: skipped, no job)", idx, shown)
                record_outcome(Path(run_dir), "skipped")
                results.append(JobReturn(overrides=overrides, status=JobStatus.COMPLETED))
                continue
            log.info("\t#%d : %s", idx, shown)
            todo.append((len(results), overrides, run_dir))
            results.append(None)
            jobs_args.append(
                (overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        if not todo:
            return [r for r in results if r is not None]

        try:
            params = self._fitted_params()
        except XmodalError as err:
            exit_expected(err)
        if not isinstance(SlurmJob.watcher, SqueueFallbackWatcher):
            SlurmJob.watcher = SqueueFallbackWatcher(delay_s=60)
        jobs = make_executor(params).map_array(self, *zip(*jobs_args))
        for job, (position, overrides, run_dir) in zip(jobs, todo):
            try:
                results[position] = job.results()[0]
            except Exception as err:  # noqa: BLE001 - the job died; the summary reports it
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                message = (
                    f"SLURM job {job.job_id} ended without a result ({type(err).__name__}: "
                    f"{first}); its log: {job.paths.stderr}"
                )
                log.error(message)
                record_outcome(Path(run_dir), "failed", message)
                results[position] = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        return [r for r in results if r is not None]
