"""Check the 10 CoOp zero-shot datasets under ``DATA_ROOT`` and print what is missing.

CoOp's split files (``split_zhou_*.json``) come from the Google-Drive links in CoOp's
DATASETS.md and the images from each dataset's site; unpack both as listed in
zeroshot.md §2, e.g. ``DATA_ROOT/oxford_flowers/{jpg/,split_zhou_OxfordFlowers.json}``. No
conversion is needed, so this script only checks: the folder, the image dir, the split file,
then loads the test split and compares its counts with the CoOp paper.

    python scripts/prepare_coop.py --data-root data [--datasets dtd eurosat]
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path

try:
    from xmodal.data import coop, prepare
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import coop, prepare


def counts(data_root: Path, name: str) -> str:
    """Load the test split of ``name``; its counts as printed after ``ok``."""
    spec = coop.DATASETS[name]
    data = coop.load(data_root, name)
    same = len(data.image_paths) == spec.num_test and len(data.classnames) == spec.num_classes
    return (
        f"{name:15s} {len(data.image_paths):6d} test images {len(data.classnames):4d} classes"
        + ("" if same else f"  (CoOp paper: {spec.num_test} / {spec.num_classes})")
    )


def check(data_root: Path, name: str) -> bool:
    """Print what is missing for ``name``, else its loaded counts."""
    spec = coop.DATASETS[name]
    root = data_root / spec.folder
    needed = [root, root / spec.image_dir, root / spec.split_file]
    if name == "fgvc_aircraft":
        needed.append(root / "variants.txt")
    missing = [str(p) for p in dict.fromkeys(needed) if not p.exists()]
    if missing:
        prepare.report("MISS", f"{name:15s} " + ", ".join(missing))
        return False
    return prepare.validate([(name, partial(counts, data_root, name))])


def main(argv: list[str] | None = None) -> int:
    parser = prepare.argument_parser(__doc__)
    parser.add_argument("--data-root", type=Path, required=True, help="data root (data.root)")
    parser.add_argument(
        "--datasets", nargs="*", default=list(coop.DATASETS), choices=list(coop.DATASETS)
    )
    args = parser.parse_args(argv)
    logging.getLogger("xmodal.data.coop").setLevel(logging.ERROR)  # counts are printed below
    results = [check(args.data_root, name) for name in args.datasets]
    print(f"{sum(results)}/{len(results)} datasets ready")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
