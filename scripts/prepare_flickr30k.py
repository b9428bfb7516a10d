"""Arrange Flickr30k for ``xmodal.data.flickr30k`` and check the result.

- nlphuji snapshot (``huggingface-cli download nlphuji/flickr30k --repo-type dataset --local-dir
  SNAP``): ``--nlphuji-snapshot SNAP`` links ``flickr_annotations_30k.csv`` and unpacks
  ``flickr30k-images.zip`` into ``ROOT/flickr30k-images/`` (or links that folder if unpacked);
- Karpathy's ``dataset_flickr30k.json``: ``--karpathy-json FILE --images .../flickr30k-images``.

Only symlinks (and the unzip) are made; nothing is deleted. Then every split is loaded and counted.

    python scripts/prepare_flickr30k.py --root data/flickr30k --nlphuji-snapshot ~/hf/flickr30k
"""

from __future__ import annotations

import sys
import zipfile
from functools import partial
from pathlib import Path

try:
    from xmodal.data import flickr30k, prepare
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import flickr30k, prepare

IMAGES = "flickr30k-images"
FORMATS = {"karpathy": "dataset_flickr30k.json", "nlphuji": "flickr_annotations_30k.csv"}


def from_snapshot(snapshot: Path, root: Path) -> None:
    """Link the nlphuji CSV and provide the images folder (unzipping if needed)."""
    csv = "flickr_annotations_30k.csv"
    prepare.link(snapshot / csv, root / csv, resolve=True)
    if (snapshot / IMAGES).is_dir():
        prepare.link(snapshot / IMAGES, root / IMAGES, resolve=True)
    elif (root / IMAGES).exists():
        prepare.report("keep", f"{root / IMAGES} (exists)")
    elif (snapshot / f"{IMAGES}.zip").is_file():
        prepare.report("unzip", f"{snapshot / f'{IMAGES}.zip'} -> {root}")
        with zipfile.ZipFile(snapshot / f"{IMAGES}.zip") as zf:
            zf.extractall(root)
    else:
        raise SystemExit(f"error: neither {IMAGES}/ nor {IMAGES}.zip in {snapshot}")


def counts(root: Path, fmt: str, split: str) -> str:
    """Load one split in one format; its counts as printed after ``ok``."""
    data = flickr30k.load(root, split=split, fmt=fmt)
    return f"{fmt:8s} {split:5s} {len(data.image_paths):7d} images {len(data.captions):7d} captions"


def validate(root: Path) -> bool:
    """Load every split in every format present and print its counts."""
    loads = [
        (f"{fmt} {split}", partial(counts, root, fmt, split))
        for fmt, marker in FORMATS.items()
        if (root / marker).exists()
        for split in flickr30k.SPLITS
    ]
    if not loads:
        prepare.report("FAIL", f"no dataset_flickr30k.json or flickr_annotations_30k.csv in {root}")
        return False
    return prepare.validate(loads, stop_at_first=True)


def main(argv: list[str] | None = None) -> int:
    parser = prepare.argument_parser(__doc__)
    parser.add_argument("--root", type=Path, required=True, help="dataset root to fill (data.root)")
    parser.add_argument("--nlphuji-snapshot", type=Path, help="local nlphuji/flickr30k snapshot")
    parser.add_argument("--karpathy-json", type=Path, help="Karpathy's dataset_flickr30k.json")
    parser.add_argument("--images", type=Path, help="an unpacked flickr30k-images/ folder")
    args = parser.parse_args(argv)

    if args.nlphuji_snapshot:
        from_snapshot(args.nlphuji_snapshot.expanduser(), args.root)
    if args.karpathy_json:
        prepare.link(args.karpathy_json, args.root / FORMATS["karpathy"], resolve=True)
    if args.images:
        prepare.link(args.images, args.root / IMAGES, resolve=True)
    return 0 if validate(args.root) else 1


if __name__ == "__main__":
    sys.exit(main())
