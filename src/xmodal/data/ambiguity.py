"""Per-item ambiguity sidecars: where a dataset's ``ambiguity.json`` lies and how to read it.

The shapes world written with ``ambiguity=True`` (:mod:`xmodal.data.shapes.ambiguity`) records,
beside the annotations of every dataset, the ambiguity it injected into each item::

    {"format": 1, "fraction": 0.5, "kinds": ["blur", ...],
     "items": {"<item id>": {"level": 0.62, "kind": "blur"}, ...}}

``level`` is in [0, 1] (0: the item is clear, its kind is ``"none"``). Item ids are, per family:

- coco, flickr30k: an image's path relative to the sidecar's folder (``val2014/COCO_...jpg``) for
  the image, ``<image id>#<j>`` for its j-th caption (0-based, in annotation order);
- fashioniq, cirr: ``<reference>><target>`` for a query (its reference and target image names);
- imagenet, coop: the image's path relative to the sidecar's folder (the variant's or CoOp
  dataset's folder, e.g. ``n01234567/ILSVRC2012_val_00000001.JPEG``);
- the X-MoRe pool: the ``image_path`` of the metadata row.

The writers and the scorer (:mod:`xmodal.protocols.uncertainty`) both locate the sidecar with
:func:`sidecar_folder`, so what is written is what is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.errors import DatasetLayoutError

FILE = "ambiguity.json"
FORMAT = 1
CLEAR = "none"  # the kind of an item with level 0


@dataclass(frozen=True)
class Item:
    """The ambiguity injected into one item: ``level`` in [0, 1] and its ``kind``."""

    level: float
    kind: str = CLEAR


def sidecar_folder(family: str, root: Path | str, dataset: str | None = None) -> Path:
    """The folder holding the ``ambiguity.json`` of a dataset (``data.family``, ``data.root``,
    ``data.dataset``): the dataset root, or for imagenet / coop the variant's / dataset's folder
    under the data root."""
    root = Path(root)
    if family == "imagenet":
        from xmodal.data.imagenet import VARIANTS

        return root / VARIANTS[dataset or "imagenet"].folder
    if family == "coop":
        from xmodal.data.coop import DATASETS

        if dataset not in DATASETS:
            raise ValueError(f"coop dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
        return root / DATASETS[dataset].folder
    return root


def cir_item(reference: str, target: str) -> str:
    """The item id of a composed-retrieval query."""
    return f"{reference}>{target}"


def caption_item(image_item: str, j: int) -> str:
    """The item id of the j-th caption of an image."""
    return f"{image_item}#{j}"


def read_sidecar(path: Path | str) -> dict[str, Item]:
    """``item id -> Item`` of an ``ambiguity.json`` (a DatasetLayoutError names a bad file)."""
    path = Path(path)
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetLayoutError(f"{path}: cannot read the ambiguity sidecar ({err})") from err
    items = data.get("items") if isinstance(data, dict) else None
    if data.get("format") != FORMAT or not isinstance(items, dict):
        raise DatasetLayoutError(
            f"{path}: expected {{'format': {FORMAT}, 'items': {{id: {{'level', 'kind'}}}}}} "
            "(written by xmodal.data.shapes.write_world(..., ambiguity=True)); rewrite the world"
        )
    out = {}
    for key, value in items.items():
        level = float(value["level"])
        if not 0.0 <= level <= 1.0:
            raise DatasetLayoutError(f"{path}: item {key} has level {level}, expected [0, 1]")
        out[key] = Item(level, str(value["kind"]))
    return out
