"""From a ``data`` config to loaded splits and Lightning datamodules.

``load_split(data_cfg, split)`` dispatches on ``data.family`` to the loader module of that family
(``xmodal.data.<family>.load``) and writes the shapes world first when the config asks for it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xmodal import inputs
from xmodal.data.base import CIRSplit, ClassificationSplit, RetrievalSplit

FAMILIES = ("coco", "flickr30k", "fashioniq", "cirr", "imagenet", "coop")


def ensure_shapes_world(data_cfg: DictConfig, shapes_dir: Path | str, rank: int = 0) -> None:
    """Write the shapes world if ``data.shapes_world`` names a size: at ``data.shapes_dir`` (else
    ``shapes_dir``), the ambiguity world when ``data.shapes_ambiguity`` is true, drawn from
    ``data.shapes_seed``.

    Only rank 0 writes (atomically); other ranks wait for the manifest.
    """
    size = data_cfg.get("shapes_world")
    if not size:
        return
    from xmodal.data.shapes import write_world
    from xmodal.data.world_manifest import data_ambiguity, data_seed

    shapes_dir = data_cfg.get("shapes_dir") or shapes_dir
    ambiguity = data_ambiguity(data_cfg) or False
    manifest = Path(shapes_dir) / "MANIFEST.json"
    if rank == 0:
        write_world(shapes_dir, seed=data_seed(data_cfg), size=size, ambiguity=ambiguity)
        return
    deadline = time.time() + 600
    while not manifest.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 did not write the shapes world {manifest}")
        time.sleep(1)


def load_split(data_cfg: DictConfig, split: str | None = None) -> Any:
    """Load one split of the configured dataset.

    Returns a ``RetrievalSplit`` (coco, flickr30k), a ``ClassificationSplit`` (imagenet, coop), a
    ``CIRSplit`` (cirr) or a dict category -> ``CIRSplit`` (fashioniq). The split's images are
    noted as inputs of the run being recorded (``xmodal.inputs``), as the loader notes its
    annotation files.
    """
    loaded = _load(data_cfg, split)
    inputs.note_all(split_images(loaded))
    return loaded


def split_images(split: Any) -> list[Any]:
    """Every image reference of a loaded split (or dict of splits)."""
    if isinstance(split, dict):
        return [ref for part in split.values() for ref in split_images(part)]
    if isinstance(split, CIRSplit):
        return list(split.name_to_path.values())
    return list(getattr(split, "image_paths", []))


def check_data(data_cfg: DictConfig, splits: Sequence[str | None]) -> None:
    """Load ``splits`` once so a missing or malformed dataset stops the run before any model is
    built (with its one-paragraph ``DatasetLayoutError``)."""
    for name in dict.fromkeys(s for s in splits if s):
        load_split(data_cfg, name)


def _load(data_cfg: DictConfig, split: str | None) -> Any:
    family = data_cfg.family
    split = split or data_cfg.split
    root = data_cfg.root
    if family == "coco":
        from xmodal.data import coco

        # the extended-positive ground truth (ECCV Caption, CxC) exists for the 5k test only
        ids = bool(data_cfg.get("extended_positives")) and split == "test"
        return coco.load(root, split=split, fmt=data_cfg.format, ids=ids)
    if family == "flickr30k":
        from xmodal.data import flickr30k

        return flickr30k.load(root, split=split, fmt=data_cfg.format)
    if family == "fashioniq":
        from xmodal.data import fashioniq

        categories = list(data_cfg.categories) or list(fashioniq.CATEGORIES)
        return {
            cat: fashioniq.load(
                root,
                cat,
                split=split,
                protocol=data_cfg.protocol,
                remove_reference=data_cfg.remove_reference,
            )
            for cat in categories
        }
    if family == "cirr":
        from xmodal.data import cirr

        return cirr.load(root, split=split)
    if family == "imagenet":
        from xmodal.data import imagenet

        variant = data_cfg.dataset or "imagenet"
        return imagenet.load(root, variant=variant, num_classes=data_cfg.get("num_classes"))
    if family == "coop":
        from xmodal.data import coop

        return coop.load(root, data_cfg.dataset)
    raise ValueError(f"unknown data.family {family!r}; expected one of {', '.join(FAMILIES)}")


def split_summary(split: Any) -> dict[str, Any]:
    """Counts worth printing in metrics.json for any loaded split."""
    if isinstance(split, RetrievalSplit):
        return {"images": len(split.image_paths), "texts": len(split.captions)}
    if isinstance(split, ClassificationSplit):
        return {"images": len(split.image_paths), "classes": len(split.classnames)}
    if isinstance(split, CIRSplit):
        return {
            "queries": len(split.reference),
            "gallery": len(split.gallery),
            "protocol": split.protocol,
        }
    if isinstance(split, dict):
        return {k: split_summary(v) for k, v in split.items()}
    return {}


class PairDataset(Dataset):
    """Training pairs (image, one of its captions) of a ``RetrievalSplit``.

    Items are ``(pixels, caption)``. The caption is drawn from the image's captions by a function
    of (seed, epoch, index) only, so a resumed or multi-process run sees exactly the pairs an
    uninterrupted single-process run sees. With ``preload`` every image is decoded and transformed
    once (the shapes world is small), otherwise per item.
    """

    def __init__(
        self, split: RetrievalSplit, transform: Callable, preload: bool = False, seed: int = 0
    ) -> None:
        from xmodal.data.images import open_image

        self.split = split
        self.transform = transform
        self.open_image = open_image
        self.captions_of: list[list[str]] = [[] for _ in split.image_paths]
        for text, img in zip(split.captions, split.caption_image):
            self.captions_of[img].append(text)
        self.seed = seed
        self.epoch = 0
        self.pixels = (
            torch.stack([transform(open_image(p)) for p in split.image_paths]) if preload else None
        )

    def __len__(self) -> int:
        return len(self.split.image_paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        pixels = (
            self.pixels[i]
            if self.pixels is not None
            else self.transform(self.open_image(self.split.image_paths[i]))
        )
        choice = random.Random(f"{self.seed}:{self.epoch}:{i}").randrange(len(self.captions_of[i]))
        return pixels, self.captions_of[i][choice]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch) that also tells the dataset the epoch.

    Used with one process too, so 1 and N processes see the same global batches: rank r takes
    every world-th index of one permutation, and the union of the ranks' local batches equals the
    single-process batch. ``skip`` indices are left out of the next pass only (a run resumed in
    the middle of an epoch continues with the batches it had not trained on).
    """

    skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = epoch

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """The training ``DataLoader``, resumable in the middle of an epoch.

    ``position`` is ``(epoch, batches handed out in that epoch)``; a checkpoint records it
    (:class:`xmodal.callbacks.ExactResume`) and the resumed run calls :meth:`resume_at`, so the
    resumed epoch skips those batches (by index, without loading them) and trains on exactly the
    batches the uninterrupted run would have. Worker processes are seeded from ``(seed, epoch)``,
    not from the global random state, so a resumed epoch's workers draw what the uninterrupted
    run's did.
    """

    def __init__(
        self, *args: Any, seed: int = 0, generator: torch.Generator | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, generator=generator or torch.Generator(), **kwargs)
        self.seed = seed
        self.position = (0, 0)
        self._resume_at: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the next pass, if it is ``epoch``, after its first ``batches`` batches."""
        self._resume_at = (epoch, batches)

    # Lightning's interface for resumable loaders: it stores the position with the fit loop and
    # hands it back before the resumed epoch's iterator is built, except when the loader was
    # built before the checkpoint was restored (``estimated_stepping_batches``, used by
    # schedulers); ExactResume covers that case the same way.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at(int(state["epoch"]), int(state["batches"]))

    def __iter__(self):
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        start = 0
        if self._resume_at is not None:
            (at_epoch, batches), self._resume_at = self._resume_at, None
            if at_epoch == epoch and isinstance(sampler, EpochSampler):
                start = batches
                sampler.skip = batches * self.batch_size
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        self.position = (epoch, start)
        for batch in super().__iter__():
            self.position = (epoch, self.position[1] + 1)
            yield batch


def train_loader(
    dataset: Dataset,
    global_batch_size: int,
    trainer: pl.Trainer | None,
    seed: int,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A shuffled training loader whose global batch is the same for any number of processes.

    Each of the ``world`` ranks loads ``global_batch_size / world`` items per step. The ragged last
    batch is dropped (contrastive losses want full batches) unless it is the only one. Resumable
    in the middle of an epoch (:class:`ResumableLoader`).
    """
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    if global_batch_size % world:
        raise ValueError(
            f"data.batch_size={global_batch_size} is the global batch; it must be "
            f"divisible by the number of processes ({world})"
        )
    sampler = EpochSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    if trainer is not None:
        # Lightning builds the first iterator (and with workers, copies the dataset into them)
        # before it sets the epoch: a run resumed at epoch e would replay epoch 0's order
        sampler.set_epoch(trainer.current_epoch)
    local = global_batch_size // world
    return ResumableLoader(
        dataset,
        batch_size=local,
        sampler=sampler,
        drop_last=len(sampler) > local,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=False,
        seed=seed,
    )


class ImageTextDataModule(pl.LightningDataModule):
    """Image-caption pairs for contrastive training; the validation split for retrieval R@K."""

    def __init__(
        self, data_cfg: DictConfig, preprocess: Callable, tokenizer: Callable, seed: int = 0
    ) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.train_split: RetrievalSplit | None = None
        self.val_split: RetrievalSplit | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is None:
            self.train_split = load_split(self.cfg, self.cfg.train_split)
        if self.val_split is None and self.cfg.val_split:
            self.val_split = load_split(self.cfg, self.cfg.val_split)

    def _collate(self, items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, Any]:
        return torch.stack([p for p, _ in items]), self.tokenizer([c for _, c in items])

    def train_dataloader(self) -> DataLoader:
        ds = PairDataset(self.train_split, self.preprocess, self.cfg.preload, self.seed)
        return train_loader(
            ds, self.cfg.batch_size, self.trainer, self.seed, self._collate, self.cfg.num_workers
        )
