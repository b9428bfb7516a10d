"""The Lightning callbacks every training run gets (added by ``xmodal.pipeline.build_trainer``)."""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
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
