"""Flickr30k captions (Karpathy splits) from the Karpathy JSON or the nlphuji/flickr30k CSV.

Both give the same ``RetrievalSplit`` (images in file order, each followed by its captions). The
nlphuji snapshot keeps the whole dataset in one CSV with the Karpathy split as a column.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from xmodal.data.base import RetrievalSplit
from xmodal.data.coco import load_karpathy
from xmodal.data.images import Layout

FORMATS = ("auto", "karpathy", "nlphuji")
SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("raw", "split", "filename")

LAYOUT = """\
    <root>/dataset_flickr30k.json         (fmt=karpathy: Karpathy's splits)
  or
    <root>/flickr_annotations_30k.csv     (fmt=nlphuji: columns raw (JSON list), sentids, split,
                                           filename, img_id; from nlphuji/flickr30k)
  and
    <root>/flickr30k-images/<filename>.jpg"""


def load(root: Path | str, split: str = "test", fmt: str = "auto") -> RetrievalSplit:
    """Load a Flickr30k Karpathy split as image-major captions."""
    root = Path(root)
    layout = Layout("flickr30k", root, LAYOUT)
    if split not in SPLITS:
        raise ValueError(f"flickr30k split must be one of {SPLITS}, got {split!r}")
    if fmt not in FORMATS:
        raise ValueError(f"flickr30k fmt must be one of {FORMATS}, got {fmt!r}")
    karpathy, nlphuji = root / "dataset_flickr30k.json", root / "flickr_annotations_30k.csv"
    if fmt == "auto":
        if karpathy.is_file():
            fmt = "karpathy"
        elif nlphuji.is_file():
            fmt = "nlphuji"
        else:
            raise layout.error(f"found neither {karpathy} nor {nlphuji}")
    image_dir = layout.require(root / "flickr30k-images", "folder")
    if fmt == "karpathy":
        return load_karpathy(karpathy, image_dir, split, "flickr30k", layout)
    return _load_nlphuji(nlphuji, image_dir, split, layout)


def _load_nlphuji(csv_path: Path, image_dir: Path, split: str, layout: Layout) -> RetrievalSplit:
    text = layout.read_text(csv_path)
    rows = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in CSV_COLUMNS if c not in (rows.fieldnames or [])]
    layout.check(not missing, f"malformed {csv_path}: missing columns {missing}")
    paths: list[Path] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for row in rows:
        if row["split"] != split:
            continue
        try:
            sentences = json.loads(row["raw"])
        except (json.JSONDecodeError, TypeError):
            sentences = None
        layout.check(
            isinstance(sentences, list) and bool(sentences),
            f"malformed {csv_path} line {rows.line_num}: raw is not a JSON list of captions",
        )
        sentences = [str(s).strip() for s in sentences]
        caption_image.extend([len(paths)] * len(sentences))
        captions.extend(sentences)
        paths.append(image_dir / row["filename"])
    layout.check(bool(paths), f"{csv_path} has no rows with split == {split!r}")
    layout.require_all(paths, f"{split} images listed in {csv_path.name}")
    return RetrievalSplit(f"flickr30k_{split}", paths, captions, caption_image)
