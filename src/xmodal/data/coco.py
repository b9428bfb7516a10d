"""MS-COCO captions (Karpathy splits) from the Karpathy JSON or the CLIP_benchmark webdataset.

Both formats give the same ``RetrievalSplit``: images in file order, each followed by its own
captions (real COCO has 5-7 per image, so ``caption_image`` comes from per-image counts).

With ``ids=True`` the split also carries COCO's image ids and caption (annotation) ids, which the
extended-positive ground truth (ECCV Caption, CxC, PMRP) is keyed by. Caption ids come from the
official ``annotations/captions_{train,val}2014.json``: a Karpathy sentence takes its ``sentid``
when that is an annotation of its image there (Karpathy's COCO file uses the annotation ids),
else the annotation of its image with the same text (lowercase words, punctuation and spacing
ignored; repeated texts in file order). A webdataset sample has no ids: its image is the COCO
image whose annotations hold all of its captions.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xmodal.data.base import RetrievalSplit
from xmodal.data.images import Layout, tar_ref, wds_samples

FORMATS = ("auto", "karpathy", "wds")
SPLITS = ("train", "val", "test")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: The official caption annotations of a COCO 2014 image folder (train2014 | val2014).
CAPTIONS_JSON = "annotations/captions_{folder}.json"

LAYOUT = """\
    <root>/dataset_coco.json              (fmt=karpathy: Karpathy's splits)
    <root>/val2014/COCO_val2014_*.jpg     (images at <root>/<filepath>/<filename>)
    <root>/train2014/COCO_train2014_*.jpg
  or
    <root>/wds/<split>/nshards.txt        (fmt=wds: clip-benchmark/wds_mscoco_captions)
    <root>/wds/<split>/0.tar ... <n-1>.tar  (<key>.jpg|png|webp + <key>.txt, captions by line)
  and, for the caption ids of the extended-positive evaluation (data.extended_positives):
    <root>/annotations/captions_val2014.json   (official COCO 2014 captions: "annotations" =
    <root>/annotations/captions_train2014.json  [{"image_id", "id", "caption"}]; train: both)"""


def load(
    root: Path | str, split: str = "test", fmt: str = "auto", ids: bool = False
) -> RetrievalSplit:
    """Load a COCO Karpathy split (``train`` includes ``restval``) as image-major captions;
    ``ids``: with COCO's image and caption ids (needs ``annotations/captions_*2014.json``)."""
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
        entries: list[dict] = []
        data = load_karpathy(root / "dataset_coco.json", root, split, "coco", layout, entries)
        if ids:
            data.image_ids, data.caption_ids = _karpathy_ids(entries, root, layout)
        return data
    data = load_wds(root / "wds" / split, f"coco_{split}", layout)
    if ids:
        folders = ("train2014", "val2014") if split == "train" else ("val2014",)
        data.image_ids, data.caption_ids = _wds_ids(data, root, folders, layout)
    return data


def load_karpathy(
    json_path: Path,
    image_root: Path,
    split: str,
    name: str,
    layout: Layout,
    entries: list[dict] | None = None,
) -> RetrievalSplit:
    """Read a Karpathy ``dataset_*.json`` (shared with Flickr30k); images at
    ``image_root/<filepath>/<filename>`` (``filepath`` is absent for Flickr30k). The split's image
    entries are appended to ``entries`` when given."""
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
            if entries is not None:
                entries.append(entry)
    except (KeyError, TypeError, AttributeError) as exc:
        raise layout.error(
            f"malformed {json_path}: an image entry lacks split/filename/sentences[].raw ({exc!r})"
        ) from None
    layout.check(bool(paths), f"{json_path} has no images in split {split!r}")
    layout.require_all(paths, f"{split} images listed in {json_path.name}")
    return RetrievalSplit(f"{name}_{split}", paths, captions, caption_image)


# ------------------------------------------------------------------------------ COCO ids


def normalise_caption(text: str) -> str:
    """A caption as compared across files: its lowercase words, one space apart."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class _Annotations:
    """The caption annotations of the official ``captions_*2014.json`` files: per image id, its
    ``[annotation id, normalised caption]`` in file order; per annotation id, its image id."""

    def __init__(self, root: Path, folders: Sequence[str], layout: Layout) -> None:
        self.by_image: dict[int, list[tuple[int, str]]] = {}
        self.image_of: dict[int, int] = {}
        for folder in folders:
            path = root / CAPTIONS_JSON.format(folder=folder)
            if not path.is_file():
                raise layout.error(
                    f"missing {path}: COCO's caption ids (data.extended_positives: the ECCV "
                    "Caption / CxC / PMRP ground truth is keyed by them) come from the official "
                    f"captions_{folder}.json, an object whose 'annotations' list "
                    "[{'image_id', 'id', 'caption'}]. Fix: unzip annotations_trainval2014.zip "
                    f"(cocodataset.org) into {root} (or `python scripts/prepare_coco.py --root "
                    f"{root} --annotations <folder with captions_{folder}.json>`), or set "
                    "data.extended_positives=null to evaluate without extended positives"
                )
            data = layout.read_json(path)
            try:
                for ann in data["annotations"]:
                    ann_id, image_id = int(ann["id"]), int(ann["image_id"])
                    caption = normalise_caption(str(ann["caption"]))
                    self.by_image.setdefault(image_id, []).append((ann_id, caption))
                    self.image_of[ann_id] = image_id
            except (KeyError, TypeError, ValueError) as exc:
                raise layout.error(
                    f"malformed {path}: expected 'annotations' = [{{'image_id', 'id', "
                    f"'caption'}}, ...] ({exc!r})"
                ) from None

    def caption_ids(
        self, image_id: int, captions: Sequence[str], sentids: Sequence[Any], what: str
    ) -> list[int]:
        """The annotation id of each caption of one image (see the module doc)."""
        anns = self.by_image.get(image_id, [])
        used: set[int] = set()
        out = []
        for caption, sentid in zip(captions, sentids):
            if isinstance(sentid, int) and self.image_of.get(sentid) == image_id:
                ann_id = sentid
            else:
                text = normalise_caption(caption)
                ann_id = next((a for a, t in anns if t == text and a not in used), None)
                if ann_id is None:
                    raise ValueError(
                        f"{what}: caption {caption!r} of COCO image {image_id} is not among "
                        f"that image's {len(anns)} annotations in captions_*2014.json"
                    )
            if ann_id in used:
                raise ValueError(f"{what}: two captions of COCO image {image_id} map to {ann_id}")
            used.add(ann_id)
            out.append(ann_id)
        return out


def _karpathy_ids(entries: list[dict], root: Path, layout: Layout) -> tuple[list[int], list[int]]:
    """COCO image ids (``cocoid``) and caption ids of the loaded Karpathy entries."""
    path = root / "dataset_coco.json"
    try:
        image_ids = [int(e["cocoid"]) for e in entries]
        folders = sorted({str(e["filepath"]) for e in entries})
    except (KeyError, TypeError, ValueError) as exc:
        raise layout.error(
            f"malformed {path}: an image entry lacks cocoid/filepath ({exc!r})"
        ) from None
    anns = _Annotations(root, folders, layout)
    caption_ids: list[int] = []
    try:
        for entry, image_id in zip(entries, image_ids):
            captions = [s["raw"] for s in entry["sentences"]]
            sentids = [s.get("sentid") for s in entry["sentences"]]
            caption_ids.extend(anns.caption_ids(image_id, captions, sentids, str(path)))
    except ValueError as exc:
        raise layout.error(str(exc)) from None
    return image_ids, caption_ids


def _wds_ids(
    data: RetrievalSplit, root: Path, folders: Sequence[str], layout: Layout
) -> tuple[list[int], list[int]]:
    """COCO ids of webdataset samples: each sample's image is the one COCO image whose
    annotations hold every one of its captions."""
    anns = _Annotations(root, folders, layout)
    images_of: dict[str, set[int]] = {}
    for image_id, listed in anns.by_image.items():
        for _, text in listed:
            images_of.setdefault(text, set()).add(image_id)
    per_image: list[list[str]] = [[] for _ in data.image_paths]
    for caption, image in zip(data.captions, data.caption_image):
        per_image[image].append(caption)
    image_ids: list[int] = []
    caption_ids: list[int] = []
    for ref, captions in zip(data.image_paths, per_image):
        found = set.intersection(*(images_of.get(normalise_caption(c), set()) for c in captions))
        layout.check(
            len(found) == 1,
            f"cannot tell the COCO image of webdataset sample {ref}: {len(found)} images of "
            f"{', '.join(CAPTIONS_JSON.format(folder=f) for f in folders)} have all of its "
            f"captions (e.g. {captions[0]!r}); use fmt=karpathy (dataset_coco.json has the ids)",
        )
        image_id = found.pop()
        image_ids.append(image_id)
        try:
            caption_ids.extend(anns.caption_ids(image_id, captions, [None] * len(captions), ref))
        except ValueError as exc:
            raise layout.error(str(exc)) from None
    return image_ids, caption_ids


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
