"""Loggers whose logs survive a resumed run.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a run continued
with ``resume=auto`` lost every row logged before the interruption. ``CSVLogger`` here keeps the
file; when training starts, the rows of the epoch the run resumes at and later (logged before the
interruption, and logged again now) are dropped, so each epoch appears once. Rows are written
with every checkpoint, so those a checkpoint covers are on disk when a run is killed.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, minus the deletion of an existing metrics file."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def drop_from(self, epoch: int, step: int) -> int:
        """Remove the rows logged at ``epoch`` or later (rows without an epoch, such as the
        learning-rate monitor's: at logging ``step`` or later); returns how many were removed."""
        self.save()
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)

        def before(row: dict[str, str]) -> bool:
            if row.get("epoch"):
                return float(row["epoch"]) < epoch
            return not row.get("step") or float(row["step"]) < step

        kept = [r for r in rows if before(r)]
        if len(kept) == len(rows):
            return 0
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)
        return len(rows) - len(kept)


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that continues an existing ``metrics.csv`` and
    writes its rows with every checkpoint (so the rows a checkpoint covers survive a kill)."""

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class ContinueLogs(pl.Callback):
    """When training starts (after a checkpoint was restored), drop the log rows of the epochs
    that are about to be trained again."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_rank != 0:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step loggers are given
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.experiment.drop_from(trainer.current_epoch, step)
