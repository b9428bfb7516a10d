"""Composed image retrieval data (FashionIQ, CIRR) for trainable methods: a datamodule.

Any CIR method (RUIR, HUG) trains on triplets (reference image, modification text, target image)
and is evaluated by ranking a gallery for each query (:mod:`xmodal.protocols.cir`). This module
holds the data side:

- **Training** (:class:`CIRDataModule`): the triplets of ``data.train_split``. FashionIQ categories
  are joined into one training set (joint training, as CLIP4Cir and the RUIR authors' framework);
  ``data.categories=[dress]`` trains on one category. The text of a triplet follows ``text_mode``
  (:data:`TEXT_MODES`, datasets/cir.md §1.2). Batches are dicts ``{"index", "reference", "text",
  "target"}`` (``text`` already tokenised).
- **Evaluation**: per subset (a FashionIQ category, or a CIRR split; :class:`EvalSubset`) two
  loaders: the gallery images ``(idx, pixels, valid)`` and the queries ``(idx, tokens)``
  (``(idx, ref_pixels, tokens)`` with ``query_images=True``, for methods that need the reference
  pixels). Under every protocol the reference is a gallery image, so methods that only need
  reference *features* look them up in the encoded gallery (:attr:`EvalSubset.reference`) and
  every image is encoded once.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xmodal.data.base import CIRSplit
from xmodal.data.datamodule import load_split, train_loader

#: How a training triplet's text is built from its captions (datasets/cir.md §1.2):
#:
#: - ``both_orders``: FashionIQ gives one sample per caption order, "c1 and c2" and "c2 and c1"
#:   (VAL/MUR/PLI style; under ``protocol=val`` the caption-pair lines already are one per order,
#:   so each line is one sample).
#: - ``random``: CLIP4Cir's, drawn anew each epoch: "C1 and c2", "C2 and c1", "C1" or "C2"
#:   (p = 1/4 each, captions stripped of ".?, ", the first capitalised). The draw is a function of
#:   (seed, epoch, sample index) only (:class:`TripletDataset`), so it differs across epochs and
#:   samples and does not depend on the number of DataLoader workers or processes.
#: - ``fixed``: the protocol's evaluation text (clip4cir: "C1 and c2"; val: own + sibling caption).
#: - ``blip_caption``: HUG's, the captions joined with ", " then LAVIS' ``blip_caption`` cleaning
#:   (:func:`blip_caption`); the evaluation queries use the same text (:func:`query_texts`).
#:
#: A CIRR triplet has a single caption, used raw in every mode but ``blip_caption``.
TEXT_MODES = ("both_orders", "random", "fixed", "blip_caption")


# ----------------------------------------------------------------------------- texts


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS' ``blip_caption`` processor: lowercase, punctuation ``.!"()*#:;~`` to spaces,
    whitespace collapsed, at most ``max_words`` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    words = re.sub(r"\s{2,}", " ", text).strip().split(" ")
    return " ".join(words[:max_words])


def random_fiq_text(captions: Sequence[str], rng: random.Random) -> str:
    """CLIP4Cir's randomised FashionIQ training text: one of "C1 and c2", "C2 and c1", "C1",
    "C2" with p = 1/4 each."""
    c1, c2 = (c.strip(".?, ") for c in captions[:2])
    return rng.choice([f"{c1.capitalize()} and {c2}", f"{c2.capitalize()} and {c1}",
                       c1.capitalize(), c2.capitalize()])  # fmt: skip


def training_texts(split: CIRSplit, mode: str, max_words: int = 50) -> list[tuple[int, str | None]]:
    """The training samples of ``split`` as ``(triplet index, text)``; text None means "draw a
    random one each time" (``mode="random"``). See :data:`TEXT_MODES`; ``max_words`` cuts the
    ``blip_caption`` texts."""
    if mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {mode!r}")
    samples: list[tuple[int, str | None]] = []
    for i, captions in enumerate(split.captions):
        if mode == "blip_caption":
            samples.append((i, blip_caption(", ".join(captions), max_words)))
        elif len(captions) < 2:  # CIRR: the caption as is
            samples.append((i, captions[0]))
        elif mode == "random":
            samples.append((i, None))
        elif mode == "fixed" or split.protocol == "val":  # val lines are one per order already
            samples.append((i, split.text[i]))
        else:  # both_orders
            c1, c2 = captions[:2]
            samples += [(i, f"{c1} and {c2}"), (i, f"{c2} and {c1}")]
    return samples


def query_texts(split: CIRSplit, mode: str, max_words: int = 50) -> list[str]:
    """The evaluation text of each query: the protocol's (``split.text``), or under
    ``mode="blip_caption"`` the query's captions cleaned the way the model was trained (HUG)."""
    if mode != "blip_caption":
        return list(split.text)
    captions = split.captions or [[t] for t in split.text]
    return [blip_caption(", ".join(c), max_words) for c in captions]


# ----------------------------------------------------------------------------- datasets


class PixelStore:
    """Transformed images by path: decoded once and kept when ``preload`` (small datasets such
    as the shapes world), otherwise decoded on every access."""

    def __init__(self, transform: Callable, preload: bool = False) -> None:
        from xmodal.data.images import open_image

        self.transform = transform
        self.preload = preload
        self.open_image = open_image
        self._kept: dict[str, Tensor] = {}

    def __call__(self, path: Path | str) -> Tensor:
        key = str(path)
        if key in self._kept:
            return self._kept[key]
        pixels = self.transform(self.open_image(path))
        if self.preload:
            self._kept[key] = pixels
        return pixels

    def warm(self, paths: Sequence[Path | str]) -> None:
        """Decode every path now (only with ``preload``), so DataLoader workers share them."""
        if self.preload:
            for path in paths:
                self(path)


class TripletDataset(Dataset):
    """Training triplets of one or more CIR splits: items ``(index, ref_pixels, text, tgt_pixels)``
    where ``index`` numbers the samples of this dataset.

    A ``random`` text is drawn from ``random.Random(f"{seed}:{epoch}:{index}")``: a fresh draw per
    epoch (``epoch`` is set by :class:`xmodal.data.datamodule.EpochSampler` before each epoch's
    workers start) that is the same for any number of workers or processes and for a resumed run.
    A generator held by the dataset would be copied into every worker and never advance there:
    with 2 workers both drew the same sequence, epoch after epoch.
    """

    def __init__(
        self,
        splits: Sequence[CIRSplit],
        text_mode: str,
        pixels: PixelStore,
        seed: int = 0,
        max_words: int = 50,
    ) -> None:
        self.rows: list[tuple[CIRSplit, int, str | None]] = []
        for split in splits:
            if split.target is None:
                raise ValueError(
                    f"{split.name}: this split has no targets (labels withheld) and cannot be "
                    "trained on; set data.train_split to a labelled split (train)."
                )
            texts = training_texts(split, text_mode, max_words)
            self.rows += [(split, i, text) for i, text in texts]
        self.pixels = pixels
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, Tensor, str, Tensor]:
        split, i, text = self.rows[index]
        if text is None:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            text = random_fiq_text(split.captions[i], rng)
        ref = self.pixels(split.name_to_path[split.reference[i]])
        tgt = self.pixels(split.name_to_path[split.target[i]])
        return index, ref, text, tgt


class GalleryDataset(Dataset):
    """The gallery images of a subset: items ``(index, pixels, valid)`` like ``ImageDataset``."""

    def __init__(self, paths: Sequence[Path], pixels: PixelStore, on_corrupt: str) -> None:
        from xmodal.data.images import ImageDataset

        self.paths = list(paths)
        self.pixels = pixels
        self.images = ImageDataset(self.paths, pixels.transform, on_corrupt=on_corrupt)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor, bool]:
        if self.pixels.preload:
            return index, self.pixels(self.paths[index]), True
        return self.images[index]


class QueryDataset(Dataset):
    """The queries of a subset: ``(index, text)``, or ``(index, ref_pixels, text)``."""

    def __init__(self, subset: EvalSubset, texts: Sequence[str], pixels: PixelStore | None) -> None:
        self.subset = subset
        self.texts = list(texts)
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple:
        split = self.subset.split
        if self.pixels is None:
            return index, self.texts[index]
        return index, self.pixels(split.name_to_path[split.reference[index]]), self.texts[index]


# ----------------------------------------------------------------------------- evaluation views


@dataclass
class EvalSubset:
    """One evaluated set of queries with its gallery, as gallery indices.

    ``key`` names it in metric keys: ``"dress"`` (FashionIQ category, keys ``<stage>/dress/R@10``)
    or ``""`` for the CIRR split being evaluated (``<stage>/R@1``); a CIRR submission split keeps
    its name (``"test1"``). ``target`` is None when the labels are withheld (CIRR test1).
    """

    key: str
    family: str
    split: CIRSplit
    reference: Tensor  # long [Q]
    target: Tensor | None  # long [Q]
    members: Tensor | None  # long [Q, 6] (CIRR)

    @classmethod
    def build(cls, key: str, family: str, split: CIRSplit) -> EvalSubset:
        """Map the split's image names to gallery indices."""
        index = {name: i for i, name in enumerate(split.gallery)}

        def indices(names: Sequence[str]) -> Tensor:
            return torch.tensor([index[n] for n in names], dtype=torch.long)

        return cls(
            key=key,
            family=family,
            split=split,
            reference=indices(split.reference),
            target=None if split.target is None else indices(split.target),
            members=None if split.members is None else torch.stack(
                [indices(m) for m in split.members]
            ),
        )  # fmt: skip

    def to(self, device: torch.device | str) -> EvalSubset:
        """The subset with its index tensors on ``device`` (where the embeddings are ranked)."""
        target, members = self.target, self.members
        return replace(
            self,
            reference=self.reference.to(device),
            target=None if target is None else target.to(device),
            members=None if members is None else members.to(device),
        )

    def restrict(
        self, gallery_seen: Tensor, query_seen: Tensor
    ) -> tuple[EvalSubset, Tensor, Tensor]:
        """The subset limited to the gallery items and queries that were encoded (smoke runs with
        ``limit_*_batches``): queries whose reference, target or group members were not encoded
        are dropped. Returns ``(subset, kept gallery indices, kept query indices)``."""
        new_index = torch.cumsum(gallery_seen.long(), 0) - 1
        needed = [self.reference[:, None]]
        needed += [
            x if x.ndim == 2 else x[:, None] for x in (self.target, self.members) if x is not None
        ]
        keep = query_seen & gallery_seen[torch.cat(needed, dim=1)].all(dim=1)
        g_keep, q_keep = gallery_seen.nonzero().squeeze(1), keep.nonzero().squeeze(1)
        s = self.split
        rows = q_keep.tolist()

        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in rows]

        split = replace(
            s,
            reference=pick(s.reference),
            text=pick(s.text),
            target=pick(s.target),
            gallery=[s.gallery[i] for i in g_keep.tolist()],
            captions=pick(s.captions) if s.captions else [],
            pair_ids=pick(s.pair_ids) if s.pair_ids else [],
            members=pick(s.members),
        )
        subset = replace(
            self,
            split=split,
            reference=new_index[self.reference[q_keep]],
            target=None if self.target is None else new_index[self.target[q_keep]],
            members=None if self.members is None else new_index[self.members[q_keep]],
        )
        return subset, g_keep, q_keep

    @property
    def gallery_paths(self) -> list[Path]:
        return [self.split.name_to_path[n] for n in self.split.gallery]

    @property
    def prefix(self) -> str:
        """Metric-key prefix: ``"dress/"``, or ``""`` for the evaluated CIRR split."""
        return f"{self.key}/" if self.key else ""

    def counts(self) -> dict[str, Any]:
        """Query and gallery counts and the protocol, for metrics.json."""
        return {
            f"{self.prefix}num_queries": len(self.split.text),
            f"{self.prefix}num_gallery": len(self.split.gallery),
            f"{self.prefix}protocol": self.split.protocol
            + ("+remove_reference" if self.split.remove_reference else ""),
        }


# ----------------------------------------------------------------------------- datamodule


def _as_subsets(family: str, loaded: Any) -> dict[str, CIRSplit]:
    """``load_split`` output as ``{key: CIRSplit}``: FashionIQ by category, CIRR one split."""
    if family == "fashioniq":
        return dict(loaded)
    if family == "cirr":
        return {"": loaded}
    raise ValueError(
        f"data.family={family!r} is not a composed image retrieval dataset; use a FashionIQ or "
        "CIRR data config (data=fashioniq, cirr, shapes_fashioniq or shapes_cirr)."
    )


class CIRDataModule(pl.LightningDataModule):
    """Training triplets and per-subset evaluation loaders of a FashionIQ or CIRR data config.

    Args:
        data_cfg: the ``data`` config (family fashioniq or cirr; ``train_split``, ``val_split``,
            ``split``, ``categories``, ``protocol``, ``remove_reference``, ``preload`` ...).
        preprocess: image transform of the backbone; tokenizer: its tokenizer.
        text_mode: training text (:data:`TEXT_MODES`); ``blip_caption`` also sets the queries'.
        query_images: query loaders also yield the reference pixels.
        extra_test_splits: further splits evaluated at test time (CIRR ``test1``, for the
            submission files); subsets keep the split name as key.
        train_preprocess: transform of the training images (augmentation); default
            ``preprocess``. With ``data.preload`` training images are decoded once with
            ``preprocess`` instead (a preloaded augmentation would be frozen).
        max_words: length cut of the ``blip_caption`` texts.

    ``data.batch_size`` is the global training batch, split over the processes, so 1 and N
    processes see the same batches (:func:`xmodal.data.datamodule.train_loader`).
    """

    def __init__(
        self,
        data_cfg: DictConfig,
        preprocess: Callable,
        tokenizer: Callable,
        *,
        text_mode: str = "both_orders",
        query_images: bool = False,
        extra_test_splits: Sequence[str] = (),
        seed: int = 0,
        train_preprocess: Callable | None = None,
        max_words: int = 50,
    ) -> None:
        super().__init__()
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        self.cfg = data_cfg
        self.family = str(data_cfg.family)
        _as_subsets(self.family, {})  # fail early on a non-CIR dataset
        self.tokenizer = tokenizer
        self.text_mode = text_mode
        self.query_images = query_images
        self.extra_test_splits = [s for s in extra_test_splits if s and s != data_cfg.split]
        self.seed = seed
        self.max_words = max_words
        self.pixels = PixelStore(preprocess, preload=bool(data_cfg.preload))
        self.train_pixels = self.pixels
        if train_preprocess is not None and not data_cfg.preload:
            self.train_pixels = PixelStore(train_preprocess)
        self.train_set: TripletDataset | None = None
        self.val_subsets: list[EvalSubset] = []
        self.test_subsets: list[EvalSubset] = []
        self._loaded: dict[str, dict[str, CIRSplit]] = {}

    # -- loading --------------------------------------------------------------------------------
    def load(self, split: str) -> dict[str, CIRSplit]:
        """``{key: CIRSplit}`` of a split, loaded once."""
        if split not in self._loaded:
            self._loaded[split] = _as_subsets(self.family, load_split(self.cfg, split))
        return self._loaded[split]

    def _eval_subsets(self, split: str, is_main: bool) -> list[EvalSubset]:
        subsets = []
        for key, cir in self.load(split).items():
            if cir.target is None and self.family == "fashioniq":
                raise ValueError(
                    f"FashionIQ {split}: labels are withheld (cap.<category>.{split}.json has no "
                    "'target'), so it cannot be evaluated; everyone reports val: set "
                    "data.split=val (and data.val_split=val)."
                )
            subsets.append(EvalSubset.build(key if is_main else split, self.family, cir))
        return subsets

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            train = list(self.load(self.cfg.train_split).values())
            self.train_set = TripletDataset(
                train, self.text_mode, self.train_pixels, self.seed, self.max_words
            )
            self.train_pixels.warm(
                [s.name_to_path[n] for s in train for n in s.reference + s.target]
            )
        if stage in (None, "fit", "validate") and not self.val_subsets and self.cfg.val_split:
            self.val_subsets = self._eval_subsets(self.cfg.val_split, is_main=True)
        if stage in (None, "test") and not self.test_subsets:
            self.test_subsets = self._eval_subsets(self.cfg.split, is_main=True)
            for split in self.extra_test_splits:
                self.test_subsets += self._eval_subsets(split, is_main=False)

    # -- loaders --------------------------------------------------------------------------------
    def _collate_train(self, items: list[tuple[int, Tensor, str, Tensor]]) -> dict[str, Any]:
        return {
            "index": torch.tensor([i for i, *_ in items], dtype=torch.long),
            "reference": torch.stack([r for _, r, _, _ in items]),
            "text": self.tokenizer([t for _, _, t, _ in items]),
            "target": torch.stack([t for *_, t in items]),
        }

    def _collate_queries(self, items: list[tuple]) -> tuple:
        idx = torch.tensor([it[0] for it in items], dtype=torch.long)
        tokens = self.tokenizer([it[-1] for it in items])
        if self.query_images:
            return idx, torch.stack([it[1] for it in items]), tokens
        return idx, tokens

    def train_dataloader(self) -> DataLoader:
        # contrastive losses want full batches: the ragged last one is dropped unless the only one
        return train_loader(
            self.train_set,
            self.cfg.batch_size,
            self.trainer,
            self.seed,
            self._collate_train,
            self.cfg.num_workers,
        )

    def _eval_loaders(self, subsets: list[EvalSubset]) -> list[DataLoader]:
        """For subset s: loader 2s = its gallery images, loader 2s+1 = its queries."""
        kw = {"batch_size": self.cfg.batch_size, "num_workers": self.cfg.num_workers}
        loaders = []
        for subset in subsets:
            gallery = GalleryDataset(subset.gallery_paths, self.pixels, self.cfg.on_corrupt)
            texts = query_texts(subset.split, self.text_mode, self.max_words)
            queries = QueryDataset(subset, texts, self.pixels if self.query_images else None)
            loaders += [
                DataLoader(gallery, **kw),
                DataLoader(queries, collate_fn=self._collate_queries, **kw),
            ]
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_subsets)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_subsets)
