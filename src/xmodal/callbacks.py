"""The Lightning callbacks every training run gets (added by ``xmodal.pipeline.build_trainer``)."""

from __future__ import annotations

import datetime
import logging
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("xmodal")


class ConfigInCheckpoint(pl.Callback):
    """Stores the resolved run config in every checkpoint (``checkpoint["xmodal_config"]``), so a
    checkpoint alone rebuilds its model (``xmodal.load_run``) without the original command line."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["xmodal_config"] = self.config


def monitored_checkpoint(trainer: pl.Trainer) -> Any:
    """The ModelCheckpoint that keeps the best weights by the method's monitor (or None)."""
    return next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)


class BestWeightsAfterFit(pl.Callback):
    """``test_ckpt=best``: when fit ends, load the best checkpoint's weights (by the method's
    ``monitor``) on every rank, so the test and whatever the method exports at fit end (the
    pretrained backbone) use them. Without a best checkpoint (no monitor, ``max_epochs=0``) the
    last weights stay."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = monitored_checkpoint(trainer)
        best = callback.best_model_path if callback is not None else ""
        if not best or not Path(best).is_file():
            return
        state = torch.load(best, map_location=pl_module.device, weights_only=True)["state_dict"]
        pl_module.load_state_dict(state)
        log.info("test_ckpt=best: using %s (%s = %.4g)", best, callback.monitor,
                 float(callback.best_model_score))  # fmt: skip


class PlainProgress(pl.Callback):
    """Plain progress lines for log files and SLURM output, where a progress bar cannot draw.

    At most one line every ``every_s`` seconds per running stage (and one when a stage that
    printed ends): ``train epoch 3/12 batch 40/120 loss 0.532 | 3.1 batches/s | ETA 0:00:26``.
    Used instead of Lightning's bar when stdout is not a terminal (``xmodal.pipeline``).
    """

    def __init__(self, every_s: float | None = None) -> None:
        import os

        self.every_s = float(every_s or os.environ.get("XMODAL_PROGRESS_EVERY", 30))
        self._t0 = self._last = 0.0
        self._done = 0
        self._printed = False

    def _begin(self, *_: Any) -> None:
        self._t0 = self._last = time.monotonic()
        self._done, self._printed = 0, False

    def _step(self, trainer: pl.Trainer, stage: str, total: Any, extra: str = "") -> None:
        """One more batch of ``stage`` done (of ``total``, an int or a list per dataloader)."""
        self._done += 1
        total = sum(total) if isinstance(total, list) else total
        bounded = isinstance(total, int) and total < 10**12  # an unsized loader reports inf
        finished = bounded and self._done >= total
        now = time.monotonic()
        if (now - self._last < self.every_s) and not (finished and self._printed):
            return
        self._last, self._printed = now, True
        rate = self._done / max(now - self._t0, 1e-9)
        where = (
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} " if stage == "train" else ""
        )
        of = f"/{total}" if bounded else ""
        eta = ""
        if bounded and not finished and rate > 0:
            eta = f" | ETA {datetime.timedelta(seconds=round((total - self._done) / rate))}"
        log.info(
            "%s %sbatch %d%s%s | %.3g batches/s%s", stage, where, self._done, of, extra, rate, eta
        )

    on_train_epoch_start = on_validation_epoch_start = _begin
    on_test_epoch_start = on_predict_epoch_start = _begin

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *_: Any
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        extra = f" loss {float(loss):.4g}" if isinstance(loss, torch.Tensor) else ""
        self._step(trainer, "train", trainer.num_training_batches, extra)

    def on_validation_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._step(trainer, "val", trainer.num_val_batches)

    def on_test_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._step(trainer, "test", trainer.num_test_batches)

    def on_predict_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._step(trainer, "encode", trainer.num_predict_batches)


def _random_state() -> dict[str, Any]:
    """This process's random state in types ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "the checkpoint holds the CUDA random state of %d device(s), this process sees "
                "%d: the CUDA random state is not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


class ExactResume(pl.Callback):
    """Checkpoints written in the middle of an epoch resume exactly where they were written.

    Every checkpoint carries each rank's random state (torch, CUDA, numpy, python), the
    training loader's position (epoch, batches trained on in it;
    :class:`xmodal.data.datamodule.ResumableLoader`) and the latest logged metrics (a run resumed
    after its last epoch reports its last validation): ``checkpoint["xmodal_resume"]``. When a
    resumed run starts training, before its first batch is drawn, the random state is put
    back and the loader skips the batches already trained on, so batches, dropout masks,
    augmentations and sampled noise continue as in the uninterrupted run.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._metrics: dict[str, float] = {}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = _random_state()  # every rank takes part: checkpoints are saved by all of them
        states: list[Any] = [state]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        loader = trainer.train_dataloader
        checkpoint["xmodal_resume"] = {
            "random_state": states,
            "loader_position": getattr(loader, "position", None),
            # the last validation's metrics: a run resumed after its last epoch reports them
            "callback_metrics": {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if not isinstance(v, torch.Tensor) or v.numel() == 1
            },
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._pending = checkpoint.get("xmodal_resume")
        self._metrics = (self._pending or {}).get("callback_metrics") or {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics = {}  # superseded by this validation's

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed after the last validation (a signal or a kill after the last epoch): the fit
        # ends with the metrics it had when the checkpoint was written
        metrics, self._metrics = self._metrics, {}
        for key, value in metrics.items():
            trainer.callback_metrics.setdefault(key, torch.tensor(value))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the resumed epoch's data iterator exists, its first batch is not drawn yet: where the
        # uninterrupted run stood when it wrote the checkpoint (Lightning does not call
        # on_train_epoch_start again for an epoch it resumes in the middle)
        pending, self._pending = self._pending, None
        if pending is None:
            return
        states = pending.get("random_state") or []
        if len(states) == trainer.world_size:
            _set_random_state(states[trainer.global_rank])
        elif states:
            log.warning(
                "the checkpoint holds the random state of %d process(es), this run has %d: "
                "training continues from the current random state",
                len(states),
                trainer.world_size,
            )
        position = pending.get("loader_position")
        loader = trainer.train_dataloader
        if position and hasattr(loader, "resume_at"):
            epoch, batches = position
            loader.resume_at(int(epoch), int(batches))
            if epoch == trainer.current_epoch and batches and trainer.is_global_zero:
                log.info("resuming epoch %d after its first %d batch(es)", epoch, batches)


def _evaluation_follows(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether validation or the epoch's end (and their checkpoints) come right after this batch.
    A run resumed from a checkpoint written there would skip them, so a signal waits for them."""
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    every = trainer.val_check_batch
    if isinstance(every, (int, float)) and every not in (0, float("inf")):
        every = int(every)
        return (batch_idx + 1) % every == 0 or trainer.global_step % every == 0
    return False


def requeue_signal() -> signal.Signals:
    """The signal SLURM sends before a job's time limit (``--signal``, submitit's
    ``signal_delay_s``) or on preemption: SIGUSR2 (submitit's ``SUBMITIT_PREEMPT_SIGNAL``)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


def in_slurm_batch_job() -> bool:
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


class TrainingStopped(SystemExit):
    """Training stopped on a signal after saving its checkpoint; ``str()`` says what happened,
    the exit status is ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointOnSignal(Checkpoint):
    """SIGTERM or the requeue signal (:func:`requeue_signal`) during training: finish the current
    batch, save ``<run_dir>/checkpoints/last.ckpt`` (atomically, with the loader position and the
    random state: :class:`ExactResume`), and stop. ``resume=auto`` then continues from exactly
    that batch. When validation or the epoch's end follows the batch, they run first (a run
    resumed after them would skip them) and the checkpoint is written at the next batch's end or
    the epoch's end. It is a ``Checkpoint`` callback so that Lightning runs it after the other
    checkpoint callbacks (the best-so-far and every-epoch checkpoints are saved before it acts).

    In a SLURM job the requeue signal (``signal_delay_s`` before the time limit, or a preemption
    notice) also requeues the job: through submitit when it launched the job (it records the
    requeued job's arguments), with ``scontrol requeue`` otherwise. SIGTERM does not requeue:
    SLURM requeues a preempted job itself, and ``scancel`` means stop. With several processes, the
    ranks agree after every batch (one all-reduce of a flag) and stop at the same batch.
    """

    monitor = None  # not a best-by-metric checkpoint (cf. monitored_checkpoint)

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _receive(self, signum: int, frame: Any) -> None:
        if self.received != requeue_signal():  # the requeue signal wins over SIGTERM
            self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning's own SIGTERM handler (registered when fit starts): during training,
        # this one decides (Lightning's would stop at the epoch's end without a checkpoint)
        if threading.current_thread() is not threading.main_thread():
            return
        self.received = None
        for signum in (requeue_signal(), signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._receive)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        signum = self._agreed(trainer)
        if signum and not _evaluation_follows(trainer, batch_idx):
            # Lightning logs this batch's step metrics after this hook, which will not return:
            # log them now, as it would have (else the row is missing from the resumed run's log)
            connector = getattr(trainer, "_logger_connector", None)
            if connector is not None and hasattr(connector, "update_train_step_metrics"):
                connector.update_train_step_metrics()
            self._stop(trainer, signum)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a signal at the epoch's last batch or during its validation: stop after them and after
        # the other checkpoint callbacks saved (a Checkpoint callback, this one runs after them)
        signum = self._agreed(trainer)
        if signum:
            self._stop(trainer, signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signum = self._agreed(trainer)
        if signum:  # after the last epoch: training is complete
            self._stop(trainer, signum)
        self._restore_handlers()

    def _agreed(self, trainer: pl.Trainer) -> int | None:
        """The signal every rank acts on: the requeue signal if any rank got it, else SIGTERM if
        any got it (2, 1, 0 all-reduced with max)."""
        code = {None: 0, signal.SIGTERM: 1}.get(self.received, 2)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([code], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = int(flag.item())
        return {0: None, 1: signal.SIGTERM, 2: requeue_signal()}[code]

    def _stop(self, trainer: pl.Trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        tmp = self.path.with_name(f".{self.path.name}.signal.tmp")
        trainer.save_checkpoint(tmp)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        for logger in trainer.loggers:
            logger.save()
        what = f"saved {self.path} at epoch {trainer.current_epoch}, step {trainer.global_step}"
        requeue = signum == requeue_signal() and in_slurm_batch_job()
        message = f"{name} during training: {what}; stopping" + (
            " and requeueing the SLURM job" if requeue else ""
        )
        if trainer.is_global_zero:
            log.warning(message)
        handler = self._previous.get(signum)
        self._restore_handlers()
        if requeue:
            self._requeue(trainer, signum, handler)
        raise TrainingStopped(message, 128 + signum)

    @staticmethod
    def _requeue(trainer: pl.Trainer, signum: int, handler: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and callable(handler):
            try:  # submitit: rank 0 records the requeued job's arguments, requeues, exits
                handler(signum, None)
            except SystemExit:
                pass
            return
        if trainer.is_global_zero:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = (
                f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
                if array
                else os.environ["SLURM_JOB_ID"]
            )
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
