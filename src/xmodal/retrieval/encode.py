"""Encoding images and texts with a frozen backbone, driven by a Lightning Trainer.

Under DDP each rank encodes a disjoint shard (``ShardSampler``: no padding, so no sample is
duplicated when the dataset size is not divisible by the world size), and the shards are gathered
and put back in dataset order on every rank. With the embedding cache, a hit skips encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from xmodal.retrieval.cache import EmbeddingCache


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(n)``: disjoint shards, nothing padded."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class TextDataset(Dataset):
    """Items ``(index, text)``; tokenisation happens per batch in ``text_collate``."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[int, str]:
        return i, self.texts[i]


def text_collate(tokenizer: Callable[[list[str]], Any]) -> Callable:
    """Collate ``(index, text)`` items into ``(indices, tokens)`` with the backbone's tokenizer."""

    def collate(items: list[tuple[int, str]]) -> tuple[torch.Tensor, Any]:
        idx = torch.tensor([i for i, _ in items], dtype=torch.long)
        return idx, tokenizer([t for _, t in items])

    return collate


class EncoderModule(pl.LightningModule):
    """Wraps a backbone so ``trainer.predict`` yields ``(indices, embeddings, valid)`` per batch.

    ``kind`` is ``image`` (batches ``(idx, pixels, valid)``) or ``text`` (``(idx, tokens)``).
    Embeddings are returned unnormalised in float32 on the CPU.
    """

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in ("image", "text"):
            raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
        self.model = model
        self.kind = kind

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, ...]:
        if self.kind == "image":
            idx, pixels, valid = batch
            emb = self.model.encode_image(pixels)
        else:
            idx, tokens = batch
            emb = self.model.encode_text(tokens)
            valid = torch.ones(len(idx), dtype=torch.bool)
        return idx.cpu(), emb.float().cpu(), valid.bool().cpu()


def _gather(local: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def encode(
    trainer: pl.Trainer,
    model: nn.Module,
    dataset: Dataset,
    kind: str,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every item of ``dataset`` once across all ranks; returns ``(emb [N, D], valid [N])``.

    The trainer must have ``use_distributed_sampler=False`` so the ``ShardSampler`` is kept.
    Every rank returns the full, ordered result.
    """
    n = len(dataset)
    sampler = ShardSampler(n, trainer.global_rank, trainer.world_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=False,
    )
    if len(sampler):
        batches = trainer.predict(EncoderModule(model, kind), dataloaders=loader)
    else:
        batches = []
    if batches:
        local = tuple(torch.cat(parts) for parts in zip(*batches))
    else:
        local = (
            torch.empty(0, dtype=torch.long),
            torch.empty(0, 0),
            torch.empty(0, dtype=torch.bool),
        )
    shards = [s for s in _gather(local) if len(s[0])]
    idx = torch.cat([s[0] for s in shards])
    if len(idx) != n or not torch.equal(torch.sort(idx).values, torch.arange(n)):
        raise RuntimeError(
            f"encoding covered {len(idx)} items for a dataset of {n}: "
            "a sample was lost or duplicated across ranks"
        )
    dim = shards[0][1].shape[1]
    emb = torch.empty(n, dim)
    valid = torch.empty(n, dtype=torch.bool)
    emb[idx] = torch.cat([s[1] for s in shards])
    valid[idx] = torch.cat([s[2] for s in shards])
    return emb, valid


def encode_cached(
    cache: EmbeddingCache,
    key: Mapping[str, Any],
    trainer: pl.Trainer,
    model: nn.Module,
    dataset: Dataset,
    kind: str,
    **loader_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode`` through the embedding cache: a hit on every rank skips encoding entirely."""
    hit = cache.load(key)
    if hit is not None:
        return hit["emb"], hit["valid"]
    emb, valid = encode(trainer, model, dataset, kind, **loader_kwargs)
    if trainer.global_rank == 0:
        cache.save(key, {"emb": emb, "valid": valid})
    return emb, valid
