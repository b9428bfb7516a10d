"""``hydra/launcher=xmodal_slurm``: hydra-submitit-launcher's SLURM launcher, fitted to xmodal runs.

Selected by ``launcher=slurm`` (``conf/launcher/slurm.yaml``). On top of submitit's launcher:

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

This module lives in the ``hydra_plugins`` namespace because Hydra instantiates launchers only
from there; it is imported by Hydra's plugin scan and so imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
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

    _target_: str = "hydra_plugins.xmodal_slurm.XmodalSlurmLauncher"
    # added to every job as resume=<value> unless the command line sets resume (null: never)
    resume: str | None = "auto"
    # fit cpus_per_task / mem_gb / gpus_per_node to what sinfo says the partition offers
    fit_to_partition: bool = True


ConfigStore.instance().store(
    group="hydra/launcher", name="xmodal_slurm", node=XmodalSlurmQueueConf, provider="xmodal"
)

_XMODAL_KEYS = ("resume", "fit_to_partition")


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
            log.info(
                "SLURM restarted this job (attempt %d): continuing its run with resume=auto",
                restarts + 1,
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

    def _run_dir(self, overrides: Sequence[str]) -> str:
        """The run directory of one job of the sweep (as the job will compute it)."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        assert self.hydra_context is not None and self.config is not None
        previous = HydraConfig.instance().cfg
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            HydraConfig.instance().set_config(cfg)
            return str(OmegaConf.select(cfg, "run_dir"))
        except Exception:  # noqa: BLE001 - only a label for the summary
            return "job " + " ".join(overrides)
        finally:
            if previous is not None:
                HydraConfig.instance().set_config(previous)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from submitit.slurm.slurm import SlurmJob

        from xmodal.cli._hydra import exit_expected, record_outcome
        from xmodal.cli._slurm import SqueueFallbackWatcher
        from xmodal.errors import XmodalError
        from xmodal.slurm import with_resume

        assert self.config is not None
        try:
            params = self._fitted_params()
        except XmodalError as err:
            exit_expected(err)
        if not isinstance(SlurmJob.watcher, SqueueFallbackWatcher):
            SlurmJob.watcher = SqueueFallbackWatcher(delay_s=60)

        init_keys = {"submitit_folder", "max_num_timeout"}
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
                if k not in init_keys and k not in _XMODAL_KEYS
            }
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        jobs_args = []
        overrides_of = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            overrides = with_resume(overrides, self.resume)
            overrides_of.append(overrides)
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            jobs_args.append(
                (overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        jobs = executor.map_array(self, *zip(*jobs_args))
        results = []
        for job, overrides in zip(jobs, overrides_of):
            try:
                results.append(job.results()[0])
            except Exception as err:  # noqa: BLE001 - the job died; the summary reports it
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                message = (
                    f"SLURM job {job.job_id} ended without a result ({type(err).__name__}: "
                    f"{first}); its log: {job.paths.stderr}"
                )
                log.error(message)
                record_outcome(Path(self._run_dir(overrides)), "failed", message)
                results.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED))
        return results
