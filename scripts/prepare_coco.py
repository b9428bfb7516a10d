"""Arrange MS-COCO captions for ``xmodal.data.coco`` and check the result.

Either (or both) of the two formats the loader reads:

- the CLIP_benchmark webdataset, a local snapshot of ``clip-benchmark/wds_mscoco_captions``
  (``huggingface-cli download clip-benchmark/wds_mscoco_captions --repo-type dataset
  --local-dir SNAP``): ``--hf-snapshot SNAP`` links ``SNAP/<split>/`` to ``ROOT/wds/<split>/``;
- Karpathy's ``dataset_coco.json`` with the COCO 2014 images: ``--karpathy-json FILE --images
  .../val2014 .../train2014`` links them to ``ROOT/dataset_coco.json`` and ``ROOT/val2014/`` etc.

Only symlinks are made; nothing is deleted. Then every split found is loaded and counted.

    python scripts/prepare_coco.py --root data/coco --hf-snapshot ~/hf/wds_mscoco_captions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from xmodal.data import coco
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import coco
from xmodal.data.base import DatasetLayoutError


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


def validate(root: Path) -> bool:
    """Load every split in every format present and print its counts."""
    ok = False
    for fmt in ("karpathy", "wds"):
        for split in coco.SPLITS:
            if fmt == "wds" and not (root / "wds" / split).is_dir():
                continue
            if fmt == "karpathy" and not (root / "dataset_coco.json").exists():
                continue
            try:
                data = coco.load(root, split=split, fmt=fmt)
            except DatasetLayoutError as exc:
                print(f"FAIL   {fmt} {split}:\n{exc}")
                return False
            per_image = [data.caption_image.count(i) for i in range(len(data.image_paths))]
            print(
                f"ok     {fmt:8s} {split:5s} {len(data.image_paths):7d} images "
                f"{len(data.captions):7d} captions ({min(per_image)}-{max(per_image)} per image)"
            )
            ok = True
    if not ok:
        print(f"FAIL   nothing to load under {root}; see --help")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="dataset root to fill (data.root)")
    parser.add_argument("--hf-snapshot", type=Path, help="local clip-benchmark/wds_mscoco_captions")
    parser.add_argument("--karpathy-json", type=Path, help="Karpathy's dataset_coco.json")
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="val2014/ train2014/")
    args = parser.parse_args(argv)

    if args.hf_snapshot:
        splits = [d for d in sorted(args.hf_snapshot.iterdir()) if (d / "nshards.txt").is_file()]
        if not splits:
            raise SystemExit(f"error: no <split>/nshards.txt in {args.hf_snapshot}")
        for d in splits:
            link(d, args.root / "wds" / d.name)
    if args.karpathy_json:
        link(args.karpathy_json, args.root / "dataset_coco.json")
    for folder in args.images:
        link(folder, args.root / folder.expanduser().resolve().name)
    return 0 if validate(args.root) else 1


if __name__ == "__main__":
    sys.exit(main())
