"""MS-COCO captions (Karpathy splits) from the Karpathy JSON or the CLIP_benchmark webdataset.

Both formats give the same ``RetrievalSplit``: images in file order, each followed by its own
captions (real COCO has 5-7 per image, so ``caption_image`` comes from per-image counts).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from xmodal.data.base import RetrievalSplit
from xmodal.data.images import Layout, tar_ref, wds_samples

FORMATS = ("auto", "karpathy", "wds")
SPLITS = ("train", "val", "test")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

LAYOUT = """\
    <root>/dataset_coco.json              (fmt=karpathy: Karpathy's splits)
    <root>/val2014/COCO_val2014_*.jpg     (images at <root>/<filepath>/<filename>)
    <root>/train2014/COCO_train2014_*.jpg
  or
    <root>/wds/<split>/nshards.txt        (fmt=wds: clip-benchmark/wds_mscoco_captions)
    <root>/wds/<split>/0.tar ... <n-1>.tar  (<key>.jpg|png|webp + <key>.txt, captions by line)"""


def load(root: Path | str, split: str = "test", fmt: str = "auto") -> RetrievalSplit:
    """Load a COCO Karpathy split (``train`` includes ``restval``) as image-major captions."""
    root = Path(root)
    layout = Layout("coco", root, LAYOUT)
    if split not in SPLITS:
        raise ValueError(f"coco split must be one of {SPLITS}, got {split!r}")
    if fmt not in FORMATS:
        raise ValueError(f"coco fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        if (root / "dataset_coco.json").is_file():
            fmt = "karpathy"
        elif (root / "wds" / split / "nshards.txt").is_file():
            fmt = "wds"
        else:
            raise layout.error(
                f"found neither {root / 'dataset_coco.json'} nor "
                f"{root / 'wds' / split / 'nshards.txt'}"
            )
    if fmt == "karpathy":
        return load_karpathy(root / "dataset_coco.json", root, split, "coco", layout)
    return load_wds(root / "wds" / split, f"coco_{split}", layout)


def load_karpathy(
    json_path: Path, image_root: Path, split: str, name: str, layout: Layout
) -> RetrievalSplit:
    """Read a Karpathy ``dataset_*.json`` (shared with Flickr30k); images at
    ``image_root/<filepath>/<filename>`` (``filepath`` is absent for Flickr30k)."""
    data = layout.read_json(json_path)
    layout.check(
        isinstance(data, dict) and isinstance(data.get("images"), list),
        f"malformed {json_path}: expected an object with an 'images' list",
    )
    wanted = {"train": ("train", "restval")}.get(split, (split,))
    paths: list[Path] = []
    captions: list[str] = []
    caption_image: list[int] = []
    try:
        for entry in data["images"]:
            if entry["split"] not in wanted:
                continue
            sentences = [s["raw"].strip() for s in entry["sentences"]]
            layout.check(
                bool(sentences), f"malformed {json_path}: {entry['filename']} has no captions"
            )
            caption_image.extend([len(paths)] * len(sentences))
            captions.extend(sentences)
            paths.append(image_root / entry.get("filepath", "") / entry["filename"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise layout.error(
            f"malformed {json_path}: an image entry lacks split/filename/sentences[].raw ({exc!r})"
        ) from None
    layout.check(bool(paths), f"{json_path} has no images in split {split!r}")
    layout.require_all(paths, f"{split} images listed in {json_path.name}")
    return RetrievalSplit(f"{name}_{split}", paths, captions, caption_image)


def load_wds(split_dir: Path, name: str, layout: Layout) -> RetrievalSplit:
    """Read CLIP_benchmark webdataset shards: one sample per key, image + ``.txt`` captions."""
    text = layout.read_text(split_dir / "nshards.txt").strip()
    layout.check(text.isdigit(), f"malformed {split_dir / 'nshards.txt'}: expected an integer")
    shards = [split_dir / f"{i}.tar" for i in range(int(text))]
    layout.require_all(shards, f"tar shards named by {split_dir / 'nshards.txt'}")
    paths: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for shard in shards:
        for key, files in _wds_samples(shard, layout).items():
            image = next((files[e] for e in WDS_IMAGE_EXTS if e in files), None)
            layout.check(
                image is not None and "txt" in files,
                f"malformed shard {shard}: sample {key!r} needs an image "
                f"({'|'.join(WDS_IMAGE_EXTS)}) and a .txt, found {sorted(files)}",
            )
            lines = [c.strip() for c in files["txt"].split("\n") if c.strip()]
            layout.check(bool(lines), f"malformed shard {shard}: sample {key!r} has no captions")
            caption_image.extend([len(paths)] * len(lines))
            captions.extend(lines)
            paths.append(tar_ref(shard, image))
    return RetrievalSplit(name, paths, captions, caption_image)  # type: ignore[arg-type]


def _wds_samples(shard: Path, layout: Layout) -> dict[str, dict[str, str]]:
    """:func:`xmodal.data.images.wds_samples`, a broken shard reported as a layout error."""
    try:
        return wds_samples(shard)
    except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
        raise layout.error(f"malformed tar shard {shard}: {exc}") from None
