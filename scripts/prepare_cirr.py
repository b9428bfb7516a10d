"""Arrange CIRR (rc2) for ``xmodal.data.cirr`` and check the result.

The loader reads the official layout (``ROOT/cirr/{captions,image_splits}`` + ``ROOT/img_raw/
{train,dev,test1}``) and the CLIP4Cir layout (``cirr_dataset/{cirr/...,train,dev,test1}``).

- ``--source DIR``: an official or CLIP4Cir download; its ``cirr/`` and image folders are linked
  into ``ROOT`` in the official layout (``img_raw/``).
- ``--to-official``: in an existing CLIP4Cir-layout ``ROOT``, add ``img_raw/{train,dev,test1}``
  links to the image folders next to it.

Only symlinks are made; nothing is deleted. Then every split is loaded and counted.

    python scripts/prepare_cirr.py --root data/cirr --source ~/downloads/cirr_dataset
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

try:
    from xmodal.data import cirr, prepare
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import cirr, prepare

IMAGE_FOLDERS = ("train", "dev", "test1")


def image_root(folder: Path) -> Path:
    """Where ``train/ dev/ test1/`` live: ``img_raw/`` (official) or the folder (CLIP4Cir)."""
    return folder / "img_raw" if (folder / "img_raw").is_dir() else folder


def counts(root: Path, split: str) -> str:
    """Load one split; its counts as printed after ``ok``."""
    data = cirr.load(root, split=split)
    targets = "no targets" if data.target is None else "with targets"
    return f"{split:5s} {len(data.reference):6d} queries {len(data.gallery):6d} images, {targets}"


def main(argv: list[str] | None = None) -> int:
    parser = prepare.argument_parser(__doc__)
    parser.add_argument("--root", type=Path, required=True, help="dataset root to fill (data.root)")
    parser.add_argument("--source", type=Path, help="an official or CLIP4Cir CIRR download")
    parser.add_argument(
        "--to-official", action="store_true", help="add img_raw/ links in a CLIP4Cir-layout root"
    )
    args = parser.parse_args(argv)

    if args.source:
        source = args.source.expanduser().resolve()
        if not (source / "cirr").is_dir():
            raise SystemExit(f"error: {source / 'cirr'} (captions/, image_splits/) not found")
        prepare.link(source / "cirr", args.root / "cirr")
        for folder in IMAGE_FOLDERS:
            if (image_root(source) / folder).is_dir():
                prepare.link(image_root(source) / folder, args.root / "img_raw" / folder)
    if args.to_official:
        root = args.root.resolve()
        for folder in IMAGE_FOLDERS:
            if (root / folder).is_dir():
                prepare.link(root / folder, root / "img_raw" / folder)
    loads = ((split, partial(counts, args.root, split)) for split in cirr.SPLITS)
    return 0 if prepare.validate(loads) else 1


if __name__ == "__main__":
    sys.exit(main())
