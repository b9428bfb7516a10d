"""Following submitted SLURM jobs when ``sacct`` does not work (imported by the SLURM launcher,
``hydra_plugins.xmodal_slurm``, in the submitting process only)."""

from __future__ import annotations

import logging
import subprocess
import time

from submitit.slurm.slurm import SlurmInfoWatcher

from xmodal.slurm import squeue_states

log = logging.getLogger("xmodal")


class SqueueFallbackWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, reading ``squeue`` once ``sacct`` has failed.

    submitit polls ``sacct`` and, on a cluster without accounting storage, logs "Bypassing sacct
    error ... status may be inaccurate" at WARNING on every poll, and never sees a job that died
    without writing its result (the sweep would wait forever). Here the first failure prints one
    notice, and from then on job states come from ``squeue``: a job squeue no longer lists has
    ended (:data:`xmodal.slurm.GONE`), and submitit then reads its result or reports it missing.
    """

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self.sacct_works = True

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        if self.sacct_works:
            try:
                self._output = subprocess.check_output(command, stderr=subprocess.PIPE)
            except (OSError, subprocess.CalledProcessError) as err:
                self.sacct_works = False
                reason = getattr(err, "stderr", b"") or b""
                reason = reason.decode(errors="replace").strip() or str(err)
                log.info(
                    "sacct is not available (%s): following the jobs with squeue instead",
                    reason.splitlines()[0],
                )
            else:
                self._info_dict.update(self.read_info(self._output))
        if not self.sacct_works:
            pending = sorted(self._registered - self._finished)
            states = squeue_states(pending)
            if states is not None:  # squeue failed too: keep what is known, try again later
                for job_id, state in states.items():
                    self._info_dict[job_id] = {"JobID": job_id, "State": state}
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)
