"""Arrange MS-COCO captions for ``xmodal.data.coco`` and check the result.

Either (or both) of the two formats the loader reads:

- the CLIP_benchmark webdataset, a local snapshot of ``clip-benchmark/wds_mscoco_captions``
  (``huggingface-cli download clip-benchmark/wds_mscoco_captions --repo-type dataset
  --local-dir SNAP``): ``--hf-snapshot SNAP`` links ``SNAP/<split>/`` to ``ROOT/wds/<split>/``;
- Karpathy's ``dataset_coco.json`` with the COCO 2014 images: ``--karpathy-json FILE --images
  .../val2014 .../train2014`` links them to ``ROOT/dataset_coco.json`` and ``ROOT/val2014/`` etc.

``--annotations DIR`` links the official ``captions_{train,val}2014.json`` (from
annotations_trainval2014.zip) to ``ROOT/annotations/``: the caption ids of the extended-positive
evaluation (``data.extended_positives``: ECCV Caption, CxC, PMRP).

Only symlinks are made; nothing is deleted. Then every split found is loaded and counted (the test
split with its COCO ids when the annotations are there).

    python scripts/prepare_coco.py --root data/coco --hf-snapshot ~/hf/wds_mscoco_captions
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

try:
    from xmodal.data import coco, prepare
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import coco, prepare


def present(root: Path, fmt: str, split: str) -> bool:
    """Whether ``root`` holds ``split`` in format ``fmt``."""
    if fmt == "karpathy":
        return (root / "dataset_coco.json").exists()
    return (root / "wds" / split).is_dir()


def counts(root: Path, fmt: str, split: str) -> str:
    """Load one split in one format; its counts as printed after ``ok``."""
    ids = split == "test" and (root / coco.CAPTIONS_JSON.format(folder="val2014")).exists()
    data = coco.load(root, split=split, fmt=fmt, ids=ids)
    per_image = [data.caption_image.count(i) for i in range(len(data.image_paths))]
    return (
        f"{fmt:8s} {split:5s} {len(data.image_paths):7d} images "
        f"{len(data.captions):7d} captions ({min(per_image)}-{max(per_image)} per image)"
        + (", COCO ids" if ids else "")
    )


def validate(root: Path) -> bool:
    """Load every split in every format present and print its counts."""
    loads = [
        (f"{fmt} {split}", partial(counts, root, fmt, split))
        for fmt in ("karpathy", "wds")
        for split in coco.SPLITS
        if present(root, fmt, split)
    ]
    if not loads:
        prepare.report("FAIL", f"nothing to load under {root}; see --help")
        return False
    return prepare.validate(loads, stop_at_first=True)


def main(argv: list[str] | None = None) -> int:
    parser = prepare.argument_parser(__doc__)
    parser.add_argument("--root", type=Path, required=True, help="dataset root to fill (data.root)")
    parser.add_argument("--hf-snapshot", type=Path, help="local clip-benchmark/wds_mscoco_captions")
    parser.add_argument("--karpathy-json", type=Path, help="Karpathy's dataset_coco.json")
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="val2014/ train2014/")
    parser.add_argument(
        "--annotations", type=Path, help="folder of captions_{train,val}2014.json (caption ids)"
    )
    args = parser.parse_args(argv)

    if args.hf_snapshot:
        splits = [d for d in sorted(args.hf_snapshot.iterdir()) if (d / "nshards.txt").is_file()]
        if not splits:
            raise SystemExit(f"error: no <split>/nshards.txt in {args.hf_snapshot}")
        for d in splits:
            prepare.link(d, args.root / "wds" / d.name, resolve=True)
    if args.karpathy_json:
        prepare.link(args.karpathy_json, args.root / "dataset_coco.json", resolve=True)
    for folder in args.images:
        prepare.link(folder, args.root / folder.expanduser().resolve().name, resolve=True)
    if args.annotations:
        for folder in ("train2014", "val2014"):
            name = coco.CAPTIONS_JSON.format(folder=folder)
            src = args.annotations.expanduser().resolve() / Path(name).name
            if src.is_file():
                prepare.link(src, args.root / name)
            else:
                prepare.report("skip", f"{src} (not there)")
    return 0 if validate(args.root) else 1


if __name__ == "__main__":
    sys.exit(main())
