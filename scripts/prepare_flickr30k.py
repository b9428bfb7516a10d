"""Arrange Flickr30k for ``xmodal.data.flickr30k`` and check the result.

- nlphuji snapshot (``huggingface-cli download nlphuji/flickr30k --repo-type dataset --local-dir
  SNAP``): ``--nlphuji-snapshot SNAP`` links ``flickr_annotations_30k.csv`` and unpacks
  ``flickr30k-images.zip`` into ``ROOT/flickr30k-images/`` (or links that folder if unpacked);
- Karpathy's ``dataset_flickr30k.json``: ``--karpathy-json FILE --images .../flickr30k-images``.

Only symlinks (and the unzip) are made; nothing is deleted. Then every split is loaded and counted.

    python scripts/prepare_flickr30k.py --root data/flickr30k --nlphuji-snapshot ~/hf/flickr30k
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

try:
    from xmodal.data import flickr30k
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import flickr30k
from xmodal.data.base import DatasetLayoutError

IMAGES = "flickr30k-images"


def link(src: Path, dst: Path) -> None:
    """Symlink ``dst`` -> ``src`` unless ``dst`` already exists (never overwrites)."""
    src = src.expanduser().resolve()
    if not src.exists():
        raise SystemExit(f"error: {src} does not exist")
    if dst.exists() or dst.is_symlink():
        print(f"keep   {dst} (exists)")
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())
    print(f"link   {dst} -> {src}")


def from_snapshot(snapshot: Path, root: Path) -> None:
    """Link the nlphuji CSV and provide the images folder (unzipping if needed)."""
    link(snapshot / "flickr_annotations_30k.csv", root / "flickr_annotations_30k.csv")
    if (snapshot / IMAGES).is_dir():
        link(snapshot / IMAGES, root / IMAGES)
    elif (root / IMAGES).exists():
        print(f"keep   {root / IMAGES} (exists)")
    elif (snapshot / f"{IMAGES}.zip").is_file():
        print(f"unzip  {snapshot / f'{IMAGES}.zip'} -> {root}")
        with zipfile.ZipFile(snapshot / f"{IMAGES}.zip") as zf:
            zf.extractall(root)
    else:
        raise SystemExit(f"error: neither {IMAGES}/ nor {IMAGES}.zip in {snapshot}")


def validate(root: Path) -> bool:
    """Load every split in every format present and print its counts."""
    ok = False
    for fmt, marker in (
        ("karpathy", "dataset_flickr30k.json"),
        ("nlphuji", "flickr_annotations_30k.csv"),
    ):
        if not (root / marker).exists():
            continue
        for split in flickr30k.SPLITS:
            try:
                data = flickr30k.load(root, split=split, fmt=fmt)
            except DatasetLayoutError as exc:
                print(f"FAIL   {fmt} {split}:\n{exc}")
                return False
            print(
                f"ok     {fmt:8s} {split:5s} {len(data.image_paths):7d} images "
                f"{len(data.captions):7d} captions"
            )
            ok = True
    if not ok:
        print(f"FAIL   no dataset_flickr30k.json or flickr_annotations_30k.csv in {root}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="dataset root to fill (data.root)")
    parser.add_argument("--nlphuji-snapshot", type=Path, help="local nlphuji/flickr30k snapshot")
    parser.add_argument("--karpathy-json", type=Path, help="Karpathy's dataset_flickr30k.json")
    parser.add_argument("--images", type=Path, help="an unpacked flickr30k-images/ folder")
    args = parser.parse_args(argv)

    if args.nlphuji_snapshot:
        from_snapshot(args.nlphuji_snapshot.expanduser(), args.root)
    if args.karpathy_json:
        link(args.karpathy_json, args.root / "dataset_flickr30k.json")
    if args.images:
        link(args.images, args.root / IMAGES)
    return 0 if validate(args.root) else 1


if __name__ == "__main__":
    sys.exit(main())
