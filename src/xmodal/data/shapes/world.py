"""How much of each dataset a world holds, and the writer of its files."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from xmodal.data.ambiguity import Item
from xmodal.data.shapes.ambiguity import Ambiguity, Recorder, degrade
from xmodal.data.shapes.rendering import render
from xmodal.data.shapes.scenes import Scene

#: dataset name -> split -> what was written (counts), as recorded in MANIFEST.json
Counts = dict[str, dict[str, dict[str, int]]]


@dataclass(frozen=True)
class WorldSize:
    """How much of each dataset a world holds (images, triplets or image sets per split)."""

    coco: tuple[int, int, int, int]  # images: train, restval, val, test
    flickr30k: tuple[int, int, int]  # images: train, val, test
    fashioniq: tuple[int, int, int]  # triplets per category: train, val, test
    cirr: tuple[int, int, int]  # image sets of 6 images: train, val, test1
    imagenet: tuple[int, int]  # images per class: val, each variant
    coop: tuple[int, int, int]  # images per class: train, val, test
    pool: int  # external image-caption pairs
    wds_shards: int = 2
    #: the ambiguity world's pool holds this many new photos of every class of the classification
    #: sets (and as many unrelated images), at least ``pool`` images in all. Medium: 128, X-MoRe's
    #: K, so that (as in LAION) the K nearest index images of a query can all show its class
    pool_per_class: int = 0


SIZES: dict[str, WorldSize] = {
    "small": WorldSize(
        coco=(40, 10, 20, 30),
        flickr30k=(30, 10, 20),
        fashioniq=(12, 10, 8),
        cirr=(4, 4, 3),
        imagenet=(2, 1),
        coop=(1, 1, 3),
        pool=150,
    ),
    "medium": WorldSize(
        coco=(3600, 400, 250, 250),
        flickr30k=(500, 100, 100),
        fashioniq=(150, 120, 80),
        cirr=(60, 50, 40),
        imagenet=(5, 2),
        coop=(4, 2, 8),
        pool=2000,
        wds_shards=4,
        pool_per_class=128,
    ),
}


class Out:
    """Writes files under the (temporary) world root, creating folders on demand.

    ``ambiguity`` (None for the default world) makes :meth:`recorder` give each dataset writer the
    recorder of its items' ambiguity, drawn from its own generator
    ``shapes:<seed>:<name>:ambiguity``.
    """

    def __init__(self, root: Path, ambiguity: Ambiguity | None = None, seed: int = 0) -> None:
        self.root = root
        self._dirs: set[Path] = set()
        self.ambiguity, self.seed = ambiguity, seed
        self.recorders: dict[str, Recorder] = {}

    def recorder(self, name: str) -> Recorder | None:
        """The ambiguity recorder of dataset ``name``; None in the default world."""
        if self.ambiguity is None:
            return None
        if name not in self.recorders:
            rng = random.Random(f"shapes:{self.seed}:{name}:ambiguity")
            self.recorders[name] = Recorder(self.ambiguity, rng)
        return self.recorders[name]

    def write_sidecars(self) -> None:
        """Write the ``ambiguity.json`` of every dataset recorded so far."""
        for rec in self.recorders.values():
            for rel, content in rec.sidecars().items():
                self.path(rel).write_text(json.dumps(content, sort_keys=True), encoding="utf-8")

    def path(self, rel: str) -> Path:
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        return path

    def image(self, rel: str, scene: Scene, ambiguity: Item | None = None) -> bytes:
        """Render ``scene`` to ``rel`` (PNG if it ends in .png, else JPEG quality 90), degraded by
        ``ambiguity`` when given (:func:`xmodal.data.shapes.ambiguity.degrade`)."""
        buf = io.BytesIO()
        img = render(scene)
        if ambiguity is not None:
            img = degrade(img, scene, ambiguity)
        if rel.lower().endswith(".png"):
            img.save(buf, format="PNG")
        else:
            img.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        self.path(rel).write_bytes(data)
        return data

    def json(self, rel: str, obj: object) -> None:
        self.path(rel).write_text(json.dumps(obj), encoding="utf-8")

    def text(self, rel: str, text: str) -> None:
        self.path(rel).write_text(text, encoding="utf-8")
