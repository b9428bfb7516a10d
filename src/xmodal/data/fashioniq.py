"""FashionIQ (dress / shirt / toptee) under the four evaluation protocols of cir.md §1.3.

- ``clip4cir`` (A): queries = the JSON triplets, text "C1 and c2"; gallery =
  ``split.{cat}.{split}.json``; the reference stays in the ranking.
- ``clip4cir`` + ``remove_reference=True`` (A'): as A with the reference removed.
- ``val`` (B): queries = every VAL ``captions_pairs`` line, text = own caption + " and " + sibling
  caption; gallery = union of references and targets in those lines; reference removed.
- ``json_union`` (C): queries as A; gallery = union of candidates and targets in the JSON;
  reference removed.

The galleries differ by up to 2x, so never mix protocols in one table. ``split="train"`` returns
the training triplets with the train split file as gallery; ``split="test"`` has no targets.
"""

from __future__ import annotations

import os
from pathlib import Path

from xmodal.data.base import CIRSplit
from xmodal.data.images import Layout

CATEGORIES = ("dress", "shirt", "toptee")
PROTOCOLS = ("clip4cir", "val", "json_union")
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".png", ".jpeg")

LAYOUT = """\
    <root>/captions/cap.{dress,shirt,toptee}.{train,val,test}.json
        [{"candidate": asin, "target": asin, "captions": [c1, c2]}, ...]  (test: no target)
    <root>/image_splits/split.{dress,shirt,toptee}.{train,val,test}.json  [asin, ...]
    <root>/images/<asin>.jpg|.png                (or <root>/image_data/<category>/<asin>.jpg)
    <root>/captions_pairs/fashion_iq-{train,val}-cap-<category>.txt   (protocol=val only;
        lines "cat/ref.jpg;cat/tgt.jpg;caption", two consecutive lines per triplet)"""


def caption_path(root: Path | str, category: str, split: str) -> Path:
    """``<root>/captions/cap.<category>.<split>.json``: the triplets of a category."""
    return Path(root) / "captions" / f"cap.{category}.{split}.json"


def split_path(root: Path | str, category: str, split: str) -> Path:
    """``<root>/image_splits/split.<category>.<split>.json``: the images of a category."""
    return Path(root) / "image_splits" / f"split.{category}.{split}.json"


def pairs_path(root: Path | str, category: str, split: str) -> Path:
    """``<root>/captions_pairs/fashion_iq-<split>-cap-<category>.txt``: the VAL caption pairs."""
    return Path(root) / "captions_pairs" / f"fashion_iq-{split}-cap-{category}.txt"


def clip4cir_text(captions: list[str]) -> str:
    """CLIP4Cir's deterministic eval text "C1 and c2": strip '.?, ', capitalise the first."""
    cleaned = [c.strip(".?, ") for c in captions]
    return " and ".join([cleaned[0].capitalize(), *cleaned[1:]])


def load(
    root: Path | str,
    category: str,
    split: str = "val",
    protocol: str = "clip4cir",
    remove_reference: bool | None = None,
) -> CIRSplit:
    """Load one FashionIQ category under ``protocol``; ``remove_reference=None`` means the
    protocol's own choice (kept for clip4cir, removed for val and json_union)."""
    root = Path(root)
    layout = Layout("fashioniq", root, LAYOUT)
    for value, allowed, what in (
        (category, CATEGORIES, "category"),
        (split, SPLITS, "split"),
        (protocol, PROTOCOLS, "protocol"),
    ):
        if value not in allowed:
            raise ValueError(f"fashioniq {what} must be one of {allowed}, got {value!r}")

    split_file = split_path(root, category, split)
    if protocol == "val":
        pairs_file = pairs_path(root, category, split)
        reference, target, captions = _read_pairs(pairs_file, layout)
        text = [f"{own} and {sibling}" for own, sibling in captions]
    else:
        cap_file = caption_path(root, category, split)
        reference, target, captions = _read_triplets(cap_file, layout)
        text = [clip4cir_text(c) for c in captions]

    if protocol == "clip4cir" or split == "train":
        gallery = _read_split(split_file, layout)
        source = split_file.name
    else:
        pairs = zip(reference, target or reference)
        gallery = list(dict.fromkeys(n for pair in pairs for n in pair))
        source = "the union of references and targets"
    in_gallery = set(gallery)
    for name in reference + (target or []):
        layout.check(name in in_gallery, f"image {name} of a query is not in {source}")

    images = _image_index(root, category, layout)
    missing = [n for n in gallery if n not in images]
    if missing:
        raise layout.error(
            f"{len(missing)} of {len(gallery)} {category} {split} images are missing, e.g. "
            f"{', '.join(missing[:5])} (looked for <asin>.jpg/.png in {root / 'images'} and "
            f"{root / 'image_data' / category})"
        )
    if remove_reference is None:
        remove_reference = protocol != "clip4cir"
    return CIRSplit(
        name=f"fashioniq_{category}_{split}",
        protocol=protocol,
        reference=reference,
        text=text,
        target=target,
        gallery=gallery,
        name_to_path={n: images[n] for n in gallery},
        remove_reference=remove_reference,
        captions=captions,
    )


def _read_split(path: Path, layout: Layout) -> list[str]:
    names = layout.read_json(path)
    layout.check(
        isinstance(names, list) and all(isinstance(n, str) for n in names),
        f"malformed {path}: expected a JSON list of image names",
    )
    layout.check(len(set(names)) == len(names), f"malformed {path}: duplicate image names")
    return names


def _read_triplets(
    path: Path, layout: Layout
) -> tuple[list[str], list[str] | None, list[list[str]]]:
    """(candidates, targets or None when the split withholds them, caption lists)."""
    data = layout.read_json(path)
    layout.check(isinstance(data, list) and bool(data), f"malformed {path}: expected a JSON list")
    reference, target, captions = [], [], []
    for i, item in enumerate(data):
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("candidate"), str)
            and isinstance(item.get("captions"), list)
            and len(item["captions"]) >= 1
            and all(isinstance(c, str) for c in item["captions"])
        )
        layout.check(ok, f"malformed {path}: entry {i} needs 'candidate' and 'captions' [c1, c2]")
        reference.append(item["candidate"])
        target.append(item.get("target"))
        captions.append(list(item["captions"]))
    has_target = [t is not None for t in target]
    layout.check(
        all(has_target) or not any(has_target),
        f"malformed {path}: only some entries have a 'target'",
    )
    return reference, (target if all(has_target) else None), captions


def _read_pairs(path: Path, layout: Layout) -> tuple[list[str], list[str], list[list[str]]]:
    """VAL caption-pair lines; each line's sibling is the other line of its consecutive pair."""
    lines = [ln for ln in layout.read_text(path).splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        parts = line.split(";", 2)
        layout.check(len(parts) == 3, f"malformed {path} line {i + 1}: expected 'ref;tgt;caption'")
        rows.append((Path(parts[0]).stem, Path(parts[1]).stem, parts[2].strip()))
    layout.check(
        len(rows) % 2 == 0 and bool(rows), f"malformed {path}: expected two lines per triplet"
    )
    reference, target, captions = [], [], []
    for i, (ref, tgt, caption) in enumerate(rows):
        sibling = rows[i ^ 1]
        layout.check(
            sibling[:2] == (ref, tgt),
            f"malformed {path} lines {i + 1}/{(i ^ 1) + 1}: a triplet's two lines must share "
            "reference and target",
        )
        reference.append(ref)
        target.append(tgt)
        captions.append([caption, sibling[2]])
    return reference, target, captions


def _image_index(root: Path, category: str, layout: Layout) -> dict[str, Path]:
    """asin -> image path from ``images/`` and/or ``image_data/<category>/`` (.jpg preferred)."""
    folders = [d for d in (root / "images", root / "image_data" / category) if d.is_dir()]
    layout.check(bool(folders), f"missing folder {root / 'images'} (or image_data/{category}/)")
    index: dict[str, Path] = {}
    for folder in reversed(folders):  # images/ wins over image_data/<cat>/
        found: dict[str, Path] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTS:
                    rank = IMAGE_EXTS.index(ext.lower())
                    old = found.get(stem)
                    if old is None or rank < IMAGE_EXTS.index(old.suffix.lower()):
                        found[stem] = Path(entry.path)
        index.update(found)
    return index
