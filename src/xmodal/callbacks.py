"""The Lightning callbacks every training run gets (added by ``xmodal.pipeline.build_trainer``)."""

from __future__ import annotations

import logging
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
