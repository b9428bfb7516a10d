"""Loggers whose logs survive a resumed run.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a run continued
with ``resume=auto`` lost every row logged before the interruption. ``CSVLogger`` here keeps the
file; when training starts, the rows of the epoch the run resumes at and later (logged before the
interruption, and logged again now) are dropped, so each epoch appears once; a run resumed in the
middle of an epoch (from a checkpoint written on a signal) keeps that epoch's rows logged before
the checkpoint. Rows are written with every checkpoint, so those a checkpoint covers are on disk
when a run is killed.
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
        """Remove the rows a resumed run logs again: those of later epochs, and those of ``epoch``
        (the one it resumes in, maybe in its middle) and of no epoch (the learning-rate
        monitor's) logged at ``step`` or later; returns how many were removed."""
        self.save()
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)

        def before(row: dict[str, str]) -> bool:
            if row.get("epoch") and float(row["epoch"]) != epoch:
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
    """Before the first batch a run trains (after a checkpoint was restored), drop the log rows
    of the steps that are about to be trained again.

    It acts at that batch's start, when Lightning has settled the step it logs with (a run
    restored from a checkpoint written at a batch's end steps the counter only then), and must
    come first among the callbacks, before any logs a row for that batch (the learning-rate
    monitor does): ``xmodal.pipeline.build_trainer`` puts it first.
    """

    def __init__(self) -> None:
        self._done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._done = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if self._done:
            return
        self._done = True
        if trainer.global_rank != 0:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step loggers are given
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.experiment.drop_from(trainer.current_epoch, step)
