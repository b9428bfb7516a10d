"""What a training-free evaluator receives: the run's config, trainer, backbone and cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from xmodal.retrieval.cache import EmbeddingCache


@dataclass
class EvalContext:
    """Everything an evaluator's ``evaluate(ctx) -> dict`` may use.

    ``trainer`` drives encoding (DDP-sharded); ``cache`` stores embeddings keyed by
    ``embedding_key``; ``run_dir`` receives plots (rank 0 writes).
    """

    cfg: DictConfig
    trainer: pl.Trainer
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    cache: EmbeddingCache
    run_dir: Path

    @property
    def is_rank_zero(self) -> bool:
        return self.trainer.global_rank == 0

    def embedding_key(self, kind: str, items: list[Any], **extra: Any) -> dict[str, Any]:
        """Cache key of the embeddings of ``items`` under this run's backbone and data
        (:func:`xmodal.protocols.retrieval.embedding_key`)."""
        from xmodal.protocols.retrieval import embedding_key

        return embedding_key(
            self.cfg.data, self.cfg.backbone, self.preprocess, kind, items, **extra
        )

    def loader_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.cfg.data.batch_size, "num_workers": self.cfg.data.num_workers}


def dataset_split(ctx: EvalContext, kind: type, evaluator: str, what: str) -> Any:
    """The run's dataset (``load_split(cfg.data)``), which must be a ``kind`` split; otherwise a
    TypeError saying that ``evaluator`` needs ``what`` (the datasets that are)."""
    from xmodal.data.datamodule import load_split

    split = load_split(ctx.cfg.data)
    if not isinstance(split, kind):
        raise TypeError(
            f"evaluator={evaluator} needs {what}, got data={ctx.cfg.data.name} of family "
            f"{ctx.cfg.data.family}"
        )
    return split


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
