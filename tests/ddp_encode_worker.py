"""Worker of test_encode.test_ddp_two_processes_equal_one (run under torchrun)."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf

from xmodal import backbones
from xmodal.data import coco
from xmodal.data.images import ImageDataset
from xmodal.retrieval.encode import TextDataset, encode, text_collate

world_root, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/backbone/tiny_clip.yaml")
cfg.pop("defaults", None)
model, preprocess, tokenizer = backbones.build(cfg)
model.eval()
world = int(os.environ.get("WORLD_SIZE", "1"))
trainer = pl.Trainer(
    accelerator="cpu",
    strategy="ddp" if world > 1 else "auto",
    devices=world,
    logger=False,
    enable_progress_bar=False,
    enable_checkpointing=False,
    use_distributed_sampler=False,
    enable_model_summary=False,
)
split = coco.load(world_root / "coco", split="test")
paths, texts = split.image_paths[:23], split.captions[:23]  # 23: not divisible by 2
img, _ = encode(trainer, model, ImageDataset(paths, preprocess), "image", batch_size=4)
txt, _ = encode(
    trainer, model, TextDataset(texts), "text", batch_size=4, collate_fn=text_collate(tokenizer)
)
if trainer.global_rank == 0:
    torch.save({"image": img, "text": txt, "world_size": trainer.world_size}, out)
