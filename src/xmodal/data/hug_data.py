"""HUG's data handling: triplets for training, gallery + queries for evaluation, CIRR test1 files.

Reads FashionIQ and CIRR through the shared loaders (``load_split`` -> ``CIRSplit``) and adds what
HUG's released code does on top (methods/hug.md §4):

- **text**: the relative captions joined with ", " and cleaned like LAVIS' ``blip_caption``
  processor (lowercase, ``.!"()*#:;~`` removed, at most 50 words);
- **train transform**: Resize(size, size) bicubic, RandomHorizontalFlip(0.5),
  ColorJitter(0.1, 0.1, 0.1), CLIP mean/std; evaluation uses the backbone's own preprocessing;
- **FashionIQ per category**: ``data.categories`` lists the categories to train on (the paper
  trains one model per category) and to evaluate, each with its own gallery under
  ``data.protocol``;
- **CIRR test1**: the two submission files of the evaluation server (cir.md §2.3).

Evaluation data is a list of :class:`EvalBlock` (one per FashionIQ category, one for CIRR) whose
galleries and queries are concatenated into one image loader and one query loader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from xmodal.data.base import CIRSplit
from xmodal.data.datamodule import load_split, train_loader
from xmodal.data.images import ImageDataset, open_image

_LAVIS_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS ``blip_caption`` cleaning: lowercase, drop ``.!"()*#:;~``, squeeze spaces, cut."""
    text = _LAVIS_PUNCTUATION.sub(" ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def hug_text(captions: Sequence[str], max_words: int = 50) -> str:
    """HUG's modification text: the captions joined with ", ", then :func:`blip_caption`."""
    return blip_caption(", ".join(captions), max_words)


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """HUG's training augmentation (released code): flip + light colour jitter, CLIP normalise."""
    return transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(0.5),
            transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def as_blocks(split: CIRSplit | dict[str, CIRSplit]) -> list[tuple[str | None, CIRSplit]]:
    """``load_split``'s result as ``[(category or None, split)]``."""
    if isinstance(split, dict):
        return list(split.items())
    return [(None, split)]


def _texts(split: CIRSplit, max_words: int) -> list[str]:
    captions = split.captions or [[t] for t in split.text]
    return [hug_text(c, max_words) for c in captions]


# ------------------------------------------------------------------------------------ training


class TripletDataset(Dataset):
    """Training triplets ``(reference pixels, target pixels, text)`` of one or more splits.

    With ``preload`` each image is decoded and transformed once and kept in memory (small
    datasets; the transform then runs once per image, so use it without augmentation).
    """

    def __init__(
        self,
        splits: Sequence[CIRSplit],
        transform: Callable,
        max_words: int = 50,
        preload: bool = False,
    ) -> None:
        self.items: list[tuple[Path, Path, str]] = []
        for split in splits:
            if split.target is None:
                raise ValueError(
                    f"{split.name} has no targets (withheld labels); HUG trains on triplets. "
                    "Set data.train_split to a split with targets (train)."
                )
            texts = _texts(split, max_words)
            for ref, tgt, text in zip(split.reference, split.target, texts):
                self.items.append((split.name_to_path[ref], split.name_to_path[tgt], text))
        self.transform = transform
        self.cache: dict[Path, Tensor] | None = {} if preload else None

    def __len__(self) -> int:
        return len(self.items)

    def _pixels(self, path: Path) -> Tensor:
        if self.cache is None:
            return self.transform(open_image(path))
        if path not in self.cache:
            self.cache[path] = self.transform(open_image(path))
        return self.cache[path]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, str]:
        ref, tgt, text = self.items[i]
        return self._pixels(ref), self._pixels(tgt), text


# ---------------------------------------------------------------------------------- evaluation


@dataclass
class EvalBlock:
    """One ranking problem: a FashionIQ category (``key``) or a CIRR split (``key=None``).

    Its gallery items are rows ``gallery_offset + j`` of the concatenated gallery loader and its
    queries rows ``query_offset + i`` of the concatenated query loader.
    """

    key: str | None
    split: CIRSplit
    gallery_offset: int
    query_offset: int

    @property
    def num_gallery(self) -> int:
        return len(self.split.gallery)

    @property
    def num_queries(self) -> int:
        return len(self.split.reference)

    def index(self, names: Sequence[str]) -> Tensor:
        """Gallery indices (within the block) of ``names``."""
        position = {n: j for j, n in enumerate(self.split.gallery)}
        return torch.tensor([position[n] for n in names], dtype=torch.long)


class QueryDataset(Dataset):
    """Queries ``(index, reference pixels, valid, text)`` of the concatenated blocks."""

    def __init__(
        self, blocks: Sequence[EvalBlock], transform: Callable, max_words: int, on_corrupt: str
    ) -> None:
        refs, self.texts = [], []
        for block in blocks:
            refs += [block.split.name_to_path[r] for r in block.split.reference]
            self.texts += _texts(block.split, max_words)
        self.images = ImageDataset(refs, transform, on_corrupt=on_corrupt)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[int, Tensor, bool, str]:
        index, pixels, valid = self.images[i]
        return index, pixels, valid, self.texts[i]


class HUGDataModule(pl.LightningDataModule):
    """Training triplets of ``data.train_split``; gallery + query loaders of the evaluation split.

    ``val_dataloader``/``test_dataloader`` return ``[gallery images, queries]`` for
    ``data.val_split``/``data.split``; ``blocks[split]`` says which rows belong to which ranking.
    """

    def __init__(
        self,
        data_cfg: DictConfig,
        eval_transform: Callable,
        train_transform: Callable,
        tokenizer: Callable,
        max_words: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.seed = seed
        self.eval_transform = eval_transform
        self.train_transform = train_transform
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.blocks: dict[str, list[EvalBlock]] = {}
        self._train: TripletDataset | None = None

    # -- training --------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            splits = [s for _, s in as_blocks(load_split(self.cfg, self.cfg.train_split))]
            transform = self.eval_transform if self.cfg.preload else self.train_transform
            self._train = TripletDataset(splits, transform, self.max_words, self.cfg.preload)
        # data.batch_size is the global batch, split over the processes (same batches for any
        # number of them); the ragged last batch is dropped: eq 13 wants in-batch negatives
        return train_loader(
            self._train,
            self.cfg.batch_size,
            self.trainer,
            self.seed,
            self._collate_triplets,
            self.cfg.num_workers,
        )

    def _collate_triplets(self, items: list[tuple[Tensor, Tensor, str]]) -> dict[str, Any]:
        return {
            "reference": torch.stack([r for r, _, _ in items]),
            "target": torch.stack([t for _, t, _ in items]),
            "tokens": self.tokenizer([x for _, _, x in items]),
        }

    # -- evaluation ------------------------------------------------------------------------
    def eval_blocks(self, split_name: str) -> list[EvalBlock]:
        """The ranking problems of ``split_name`` (loaded once)."""
        if split_name not in self.blocks:
            blocks, g0, q0 = [], 0, 0
            for key, split in as_blocks(load_split(self.cfg, split_name)):
                if split.target is None and split.pair_ids == []:
                    raise ValueError(
                        f"{split.name} has no targets and no pair ids: nothing to evaluate or "
                        "submit (FashionIQ test labels are withheld; everyone reports val)."
                    )
                blocks.append(EvalBlock(key, split, g0, q0))
                g0, q0 = g0 + len(split.gallery), q0 + len(split.reference)
            self.blocks[split_name] = blocks
        return self.blocks[split_name]

    def _eval_loaders(self, split_name: str) -> list[DataLoader]:
        blocks = self.eval_blocks(split_name)
        gallery = [b.split.name_to_path[n] for b in blocks for n in b.split.gallery]
        kw = {"batch_size": self.cfg.batch_size, "num_workers": self.cfg.num_workers}
        images = ImageDataset(gallery, self.eval_transform, on_corrupt=self.cfg.on_corrupt)
        queries = QueryDataset(blocks, self.eval_transform, self.max_words, self.cfg.on_corrupt)
        return [
            DataLoader(images, **kw),
            DataLoader(queries, collate_fn=self._collate_queries, **kw),
        ]

    def _collate_queries(self, items: list[tuple[int, Tensor, bool, str]]) -> dict[str, Any]:
        return {
            "index": torch.tensor([i for i, _, _, _ in items], dtype=torch.long),
            "reference": torch.stack([p for _, p, _, _ in items]),
            "valid": torch.tensor([v for _, _, v, _ in items], dtype=torch.bool),
            "tokens": self.tokenizer([t for _, _, _, t in items]),
        }

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.cfg.val_split) if self.cfg.val_split else []

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.cfg.split)


# ------------------------------------------------------------------------- CIRR test1 files


def write_cirr_submission(
    out_dir: Path | str,
    split: CIRSplit,
    top50: Tensor,
    subset_top3: Tensor,
    name: str = "hug",
) -> dict[str, Path]:
    """Write the two CIRR evaluation-server files (cir.md §2.3), keys sorted.

    ``top50`` [Q, 50] and ``subset_top3`` [Q, 3] are gallery indices of ``split`` (the reference
    already removed from both). Writes ``recall_submission_<name>.json`` ({"version": "rc2",
    "metric": "recall", "<pairid>": [50 names]}) and ``recall_subset_submission_<name>.json``
    (3 names per pair); names carry no extension.
    """
    from xmodal.runs import atomic_write_text

    if len(split.pair_ids) != len(split.reference):
        raise ValueError(f"{split.name}: every query needs a pairid for a CIRR submission")
    out_dir = Path(out_dir)
    written = {}
    for metric, ranked in (("recall", top50), ("recall_subset", subset_top3)):
        body: dict[str, Any] = {"version": "rc2", "metric": metric}
        for pair_id, row in zip(split.pair_ids, ranked.tolist()):
            body[str(pair_id)] = [split.gallery[j] for j in row]
        path = out_dir / f"{metric}_submission_{name}.json"
        atomic_write_text(path, json.dumps(body, sort_keys=True) + "\n")
        written[metric] = path
    return written
