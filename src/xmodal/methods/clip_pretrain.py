"""``method=clip_pretrain``: contrastive image-text pretraining of a CLIP (symmetric InfoNCE).

The demo uses it to pretrain the tiny CLIP on the shapes world so every later method starts from a
model whose retrieval is well above chance. Validation and test compute image<->text R@K on the
configured splits with the same code as ``evaluator=retrieval``
(:mod:`xmodal.protocols.retrieval`); ``val/R@1`` (mean of both
directions) is the checkpoint monitor. With ``export_name`` set, the trained backbone is saved to
``<paths.checkpoint_dir>/<export_name>.pt`` in the backbone factory's format.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from xmodal.data.datamodule import ImageTextDataModule, load_split
from xmodal.distributed import gather_by_index, gather_with_grad


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: pair i is the positive of row i and of column i."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ClipDataModule(ImageTextDataModule):
    """Training pairs plus image/text loaders of ``val_split`` and ``split`` for R@K."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.splits: dict[str | None, Any] = {}

    def _eval_loaders(self, split_name: str) -> list[DataLoader]:
        from xmodal.data.images import ImageDataset
        from xmodal.retrieval.encode import TextDataset, text_collate

        split = self.splits.setdefault(split_name, load_split(self.cfg, split_name))
        kw = {"batch_size": self.cfg.batch_size, "num_workers": self.cfg.num_workers}
        images = ImageDataset(split.image_paths, self.preprocess, on_corrupt=self.cfg.on_corrupt)
        return [
            DataLoader(images, **kw),
            DataLoader(TextDataset(split.captions), collate_fn=text_collate(self.tokenizer), **kw),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.cfg.val_split) if self.cfg.val_split else []

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.cfg.split)


class ClipPretrain(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.98),
        export_path: str | None = None,
        backbone_cfg: dict | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.save_hyperparameters({"config": config} if config else {})
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.betas = tuple(betas)
        self.export_path = export_path
        self.backbone_cfg = backbone_cfg
        self.datamodule: ClipDataModule | None = None
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> tuple[ClipPretrain, ClipDataModule]:
        from xmodal import backbones

        model, preprocess, tokenizer = backbones.build(cfg.backbone)
        model.train()  # the factory returns eval-mode models
        m = cfg.method
        export = (
            str(Path(cfg.paths.checkpoint_dir) / f"{m.export_name}.pt") if m.export_name else None
        )
        module = cls(
            model,
            lr=m.lr,
            weight_decay=m.weight_decay,
            warmup_steps=m.warmup_steps,
            betas=tuple(m.betas),
            export_path=export,
            backbone_cfg=OmegaConf.to_container(cfg.backbone, resolve=True),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        datamodule = ClipDataModule(cfg.data, preprocess, tokenizer, seed=cfg.seed)
        module.datamodule = datamodule
        return module, datamodule

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, Any], batch_idx: int) -> torch.Tensor:
        images, tokens = batch
        # the loss of the global batch (gathered over ranks); the gather's backward sums each
        # rank's gradient, so DDP's average equals the single-process gradient
        loss = clip_loss(
            gather_with_grad(self.model.encode_image(images)),
            gather_with_grad(self.model.encode_text(tokens)),
            self.model.logit_scale.exp().clamp(max=100),
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
            betas=self.betas,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.warmup_steps, total // 2)

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
            if step < warmup:
                return (step + 1) / max(1, warmup)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- retrieval evaluation (val and test share the code) ------------------------------------
    def _encode_step(self, batch: Any, dataloader_idx: int) -> None:
        if dataloader_idx == 0:
            idx, pixels, _ = batch
            emb = self.model.encode_image(pixels)
        else:
            idx, tokens = batch
            emb = self.model.encode_text(tokens)
        self._outputs.setdefault(dataloader_idx, []).append((idx, emb.float()))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode_step(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode_step(batch, dataloader_idx)

    def _gathered(self, dataloader_idx: int) -> torch.Tensor:
        """Embeddings in dataset order, with DistributedSampler padding duplicates removed."""
        idx = torch.cat([i for i, _ in self._outputs[dataloader_idx]])
        emb = torch.cat([e for _, e in self._outputs[dataloader_idx]])
        return gather_by_index(self, idx, {"emb": emb})[0]["emb"].cpu()

    def _retrieval_epoch_end(self, prefix: str, split_name: str | None) -> None:
        from xmodal.protocols.retrieval import image_text_retrieval_metrics

        if not self._outputs:
            return
        split = self.datamodule.splits[split_name]
        metrics = image_text_retrieval_metrics(
            self._gathered(0), self._gathered(1), torch.tensor(split.caption_image)
        )
        self._outputs.clear()
        for key, value in metrics.items():
            self.log(f"{prefix}/{key}", value, prog_bar=key == "mean/R@1", rank_zero_only=False)
        self.log(f"{prefix}/R@1", metrics["mean/R@1"], rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._retrieval_epoch_end("val", self.datamodule.cfg.val_split)

    def on_test_epoch_end(self) -> None:
        self._retrieval_epoch_end("test", self.datamodule.cfg.split)

    def on_fit_end(self) -> None:
        if self.export_path and self.trainer.global_rank == 0:
            from xmodal import backbones
            from xmodal.runs import atomic_write_json

            path = backbones.save_checkpoint(self.model, self.export_path, self.backbone_cfg)
            # the file carries its hash: runs that consume it record it, and see a re-export
            sidecar = {**backbones.file_identity(path), "run_dir": self.trainer.default_root_dir}
            atomic_write_json(path.with_name(path.name + ".json"), sidecar)
