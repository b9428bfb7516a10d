"""A callback for tests that sends this process a signal at a chosen training batch, so a test
can interrupt a run at an exact point (``XMODAL_TEST_SIGNAL_AT=<epoch>:<batch>[:<signal>]``;
nothing happens without it, so the callback can stay in the overrides of the resumed run)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    def __init__(self) -> None:
        spec = os.environ.get("XMODAL_TEST_SIGNAL_AT", "")
        parts = spec.split(":") if spec else []
        self.at = (int(parts[0]), int(parts[1])) if parts else None
        self.signum = signal.Signals[parts[2]] if len(parts) > 2 else signal.SIGTERM

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.at == (trainer.current_epoch, batch_idx) and trainer.is_global_zero:
            self.at = None
            os.kill(os.getpid(), self.signum)
