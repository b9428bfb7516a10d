"""Arrange FashionIQ for ``xmodal.data.fashioniq`` and check the result.

``--source DIR`` is a download with ``captions/`` and ``image_splits/`` (XiaoxiaoGuo/fashion-iq)
and images either in ``images/`` (CLIP4Cir layout, .jpg or .png) or ``image_data/<category>/``
(MUR/PLI layout), optionally ``captions_pairs/`` (VAL's files, for ``protocol=val``). The folders
are linked into ``ROOT``; images from ``image_data/<category>/`` are linked one by one into
``ROOT/images/`` (``--skip-images`` keeps the ``image_data`` layout, which the loader also reads).
Only symlinks are made; nothing is deleted. Then every category is loaded and counted under
every protocol whose files exist.

    python scripts/prepare_fashioniq.py --root data/fashioniq --source ~/downloads/fashion-iq
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

try:
    from xmodal.data import fashioniq, prepare
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import fashioniq, prepare

FOLDERS = ("captions", "image_splits", "captions_pairs", "images")


def flatten_image_data(source: Path, root: Path) -> None:
    """Link ``source/image_data/<cat>/<asin>.*`` as ``root/images/<asin>.*``."""
    for cat in fashioniq.CATEGORIES:
        folder = source / "image_data" / cat
        if not folder.is_dir():
            continue
        names = sorted(os.listdir(folder))
        for name in names:
            prepare.link(folder / name, root / "images" / name, quiet=True)
        prepare.report("link", f"{len(names)} files of {folder} into {root / 'images'}")


def applies(root: Path, split: str, protocol: str) -> bool:
    """Whether ``split`` is checked under ``protocol`` (it defines the split, its files exist)."""
    if protocol == "val":
        return split != "test" and (root / "captions_pairs").is_dir()
    return not (split == "train" and protocol == "json_union")


def counts(root: Path, cat: str, split: str, protocol: str) -> str:
    """Load one category and split under one protocol; its counts as printed after ``ok``."""
    data = fashioniq.load(root, cat, split=split, protocol=protocol)
    return (
        f"{cat:6s} {split:5s} {protocol:10s} {len(data.reference):6d} queries "
        f"{len(data.gallery):6d} gallery" + ("" if data.target is not None else " (no targets)")
    )


def validate(root: Path) -> bool:
    """Load each category and split under each protocol whose files exist; print the counts."""
    return prepare.validate(
        (f"{cat} {split} {protocol}", partial(counts, root, cat, split, protocol))
        for split in ("train", "val", "test")
        for protocol in fashioniq.PROTOCOLS
        if applies(root, split, protocol)
        for cat in fashioniq.CATEGORIES
    )


def main(argv: list[str] | None = None) -> int:
    parser = prepare.argument_parser(__doc__)
    parser.add_argument("--root", type=Path, required=True, help="dataset root to fill (data.root)")
    parser.add_argument("--source", type=Path, help="the downloaded FashionIQ folder")
    parser.add_argument(
        "--skip-images", action="store_true", help="do not flatten image_data/<cat>/ into images/"
    )
    args = parser.parse_args(argv)

    if args.source:
        source = args.source.expanduser().resolve()
        if not source.is_dir():
            raise SystemExit(f"error: {source} is not a folder")
        for folder in FOLDERS:
            if (source / folder).is_dir():
                prepare.link(source / folder, args.root / folder)
        if (source / "image_data").is_dir():
            if args.skip_images:
                prepare.link(source / "image_data", args.root / "image_data")
            else:
                flatten_image_data(source, args.root)
    return 0 if validate(args.root) else 1


if __name__ == "__main__":
    sys.exit(main())
