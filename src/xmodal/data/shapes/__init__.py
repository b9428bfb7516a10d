"""A deterministic synthetic "shapes world", written to disk in the real dataset formats.

No real dataset can be downloaded in tests, CI or the demo, so this module draws a small world of
coloured shapes and writes it in exactly the on-disk formats of the real datasets (see
``datasets/cir.md``, ``datasets/zeroshot.md`` and ``methods/uclip.md`` §4). The real loaders then
read it unchanged, and a tiny CLIP trained on its captions can learn colour, shape and position.

The world
    A :class:`Scene` is a plain background with 1-3 :class:`SceneObject` s, each with a shape
    (``SHAPES``), a colour (``COLOURS``), a size (small/large), a cell of a 3x3 grid
    (left/centre/right x top/middle/bottom) and a fill pattern. :func:`render` draws it (a pure
    function of the scene), :func:`describe` writes a caption that is true of it, and
    :func:`modify` applies one real change (recolour, reshape, resize, move, refill, add, remove,
    background) and returns two texts that describe that change.

The package
    ``scenes`` (the scene model), ``rendering``, ``captions`` (captions and modifications),
    ``world`` (sizes, the file writer) and one writer per format: ``coco`` (COCO, Flickr30k),
    ``fashioniq``, ``cirr``, ``imagenet``, ``coop``, ``pool``. The writers take file names and
    folders from the loaders' own tables (``xmodal.data.coop.DATASETS``,
    ``xmodal.data.imagenet.VARIANTS``, ``xmodal.data.fashioniq.caption_path``, ...), so what is
    written is what is read.

The layout written by :func:`write_world` (paths relative to ``root``)::

    MANIFEST.json                    seed, size, format version, counts per dataset/split
    coco/dataset_coco.json           Karpathy json (train|restval|val|test, 5-7 captions/image)
    coco/{train2014,val2014}/COCO_<folder>_<cocoid:012d>.jpg
    coco/wds/test/{nshards.txt,0.tar,...}   CLIP_benchmark webdataset of the test split
    coco/wds/dataset_type.txt        "retrieval"
    flickr30k/dataset_flickr30k.json Karpathy json (5 captions/image)
    flickr30k/flickr_annotations_30k.csv    nlphuji layout (raw, sentids, split, filename, img_id)
    flickr30k/flickr30k-images/<id>.jpg
    fashioniq/captions/cap.<cat>.<split>.json        test has no "target"
    fashioniq/image_splits/split.<cat>.<split>.json  asins (plus distractors)
    fashioniq/captions_pairs/fashion_iq-<train|val>-cap-<cat>.txt   VAL pairs (~90% subset)
    fashioniq/images/<asin>.jpg|.png                 about 5% are .png
    cirr/cirr/captions/cap.rc2.<train|val|test1>.json
    cirr/cirr/image_splits/split.rc2.<train|val|test1>.json
    cirr/img_raw/{train/<n>,dev,test1}/<name>.png
    imagenet/classnames.txt, imagenet/images/val/<wnid>/*.JPEG    classes = "<colour> <shape>"
    imagenet-adversarial/imagenet-a/<wnid>/      (subset, cluttered "noisy" style)
    imagenet-rendition/imagenet-r/<wnid>/        (another subset, "cartoon" style)
    imagenetv2/imagenetv2-matched-frequency-format-val/<label>/
    imagenet-sketch/images/<wnid>/               ("sketch" style: grey outlines)
    oxford_flowers, dtd, oxford_pets, stanford_cars, ucf101, caltech-101, food-101, sun397,
    fgvc_aircraft, eurosat                       CoOp folders, image dirs and split files
    pool/images/<i>.jpg, pool/metadata.{csv,parquet}   external image-caption pool (X-MoRe)

Everything is drawn with seeded ``random.Random`` generators (one per dataset), so the same seed and
size give byte-identical files. Images are 64x64, JPEG quality 90 (PNG for CIRR).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from xmodal.data.shapes import cirr, coco, coop, fashioniq, imagenet, pool
from xmodal.data.shapes.ambiguity import Ambiguity
from xmodal.data.shapes.captions import describe, describe_change, modify
from xmodal.data.shapes.fashioniq import FASHIONIQ_CATEGORIES
from xmodal.data.shapes.rendering import IMAGE_SIZE, render
from xmodal.data.shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    FILLS,
    KINDS,
    PALE_BACKGROUNDS,
    SHAPES,
    STYLES,
    Scene,
    SceneObject,
    random_scene,
)
from xmodal.data.shapes.world import SIZES, Counts, Out, WorldSize
from xmodal.data.world_manifest import FORMAT_VERSION, matches, read_manifest

__all__ = [
    "Ambiguity",
    "BACKGROUNDS",
    "COLOURS",
    "FASHIONIQ_CATEGORIES",
    "FILLS",
    "FORMAT_VERSION",
    "IMAGE_SIZE",
    "KINDS",
    "PALE_BACKGROUNDS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "Scene",
    "SceneObject",
    "WorldSize",
    "describe",
    "describe_change",
    "modify",
    "random_scene",
    "render",
    "write_world",
]


_WRITERS: dict[str, Callable[[Out, random.Random, WorldSize], Counts]] = {
    "coco": coco.write_coco,
    "flickr30k": coco.write_flickr30k,
    "fashioniq": fashioniq.write_fashioniq,
    "cirr": cirr.write_cirr,
    "imagenet": imagenet.write_imagenet,
    "coop": coop.write_coop,
    "pool": pool.write_pool,
}


def _ambiguity(value: bool | Ambiguity | Mapping | None) -> Ambiguity | None:
    if value is None or value is False:
        return None
    if value is True:
        return Ambiguity()
    if isinstance(value, Ambiguity):
        return value
    return Ambiguity(**dict(value))


def write_world(
    root: str | Path,
    seed: int = 0,
    size: str = "small",
    ambiguity: bool | Ambiguity | Mapping | None = False,
) -> dict:
    """Write the shapes world under ``root`` in every real dataset format; return its manifest.

    Deterministic: the same ``seed``, ``size`` and ``ambiguity`` give byte-identical files. If
    ``root`` already holds this world (same seed, size, ambiguity and format version) it is
    returned without rewriting. The world is written to a temporary sibling folder and renamed
    into place, so an interrupted write never leaves half a world. An existing world of another
    seed/size is replaced; any other non-empty folder is refused.

    ``ambiguity`` (True, an :class:`Ambiguity` or its fields as a mapping, e.g.
    ``{"pool_noise": 0.5}``) writes the ambiguity world: the same scenes, with per-item ambiguity
    injected and recorded in an ``ambiguity.json`` beside the annotations of every dataset
    (:mod:`xmodal.data.shapes.ambiguity`). Write it to its own root: it replaces a default world.
    """
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; expected one of {sorted(SIZES)}")
    spec = _ambiguity(ambiguity)
    root = Path(root)
    manifest_path = root / "MANIFEST.json"
    record = None if spec is None else spec.record()
    old = read_manifest(manifest_path)
    if matches(old, seed, size, record):
        return old  # type: ignore[return-value]
    if root.exists() and old is None and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no shapes world; refusing to write")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        out = Out(tmp, spec, seed)
        counts: dict = {}
        for name, writer in _WRITERS.items():
            # one generator per dataset: changing one dataset leaves the others' bytes alone
            counts.update(writer(out, random.Random(f"shapes:{seed}:{name}"), SIZES[size]))
        manifest = {
            "name": "xmodal shapes world",
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "size": size,
            "image_size": IMAGE_SIZE,
            "counts": counts,
        }
        if spec is not None:
            out.write_sidecars()
            manifest["ambiguity"] = spec.record()
        out.text("MANIFEST.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _move_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = read_manifest(manifest_path)
    if not matches(done, seed, size, record):  # another process won a race with another world
        raise RuntimeError(f"{root} was replaced concurrently by a different world")
    return done  # type: ignore[return-value]


def _move_into_place(tmp: Path, root: Path) -> None:
    """Rename ``tmp`` to ``root``, replacing an older world (or an empty folder) there."""
    trash = None
    if root.exists():
        if not any(root.iterdir()):
            root.rmdir()
        else:
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, trash / "world")
    try:
        os.replace(tmp, root)
    except OSError:
        if not root.exists():  # not a lost race: nothing to fall back on
            raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
