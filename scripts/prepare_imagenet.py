"""Arrange ImageNet val (+ variants) for ``xmodal.data.imagenet`` and check the result.

- ``--val-images DIR`` (the flat ``ILSVRC2012_val_*.JPEG`` folder) with labels from either
  ``--devkit DIR`` (``ILSVRC2012_devkit_t12`` with ``data/meta.mat`` and
  ``data/ILSVRC2012_validation_ground_truth.txt``) or ``--val-labels FILE`` (lines
  ``<file> <wnid>``, or Kaggle's ``LOC_val_solution.csv``) is sorted into
  ``DATA_ROOT/imagenet/images/val/<wnid>/`` by symlinks (``--move`` moves the files instead).
- ``--classnames FILE``: CoOp's ``classnames.txt`` (``wnid name`` per line), linked to
  ``DATA_ROOT/imagenet/classnames.txt``.
- The variants are used as unpacked: ``imagenet-adversarial/imagenet-a/``,
  ``imagenet-rendition/imagenet-r/``, ``imagenetv2/imagenetv2-matched-frequency-format-val/``,
  ``imagenet-sketch/images/``.

Nothing is deleted. Then every variant present is loaded and counted; a variant must hold its
official number of classes (1000; A and R 200) unless ``--num-classes VARIANT=N`` declares another
(a copy such as the shapes world; the ``data.num_classes`` of its config).

    python scripts/prepare_imagenet.py --data-root data --val-images ~/ILSVRC2012_img_val \\
        --devkit ~/ILSVRC2012_devkit_t12 --classnames ~/coop/imagenet/classnames.txt
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

try:
    from xmodal.data import imagenet, prepare
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import imagenet, prepare


def labels_from_devkit(devkit: Path, files: list[str]) -> dict[str, str]:
    """file name -> wnid from the devkit's meta.mat and validation ground truth."""
    from scipy.io import loadmat

    synsets = loadmat(devkit / "data" / "meta.mat", squeeze_me=True)["synsets"]
    wnid_of = {
        int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0
    }
    truth = (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    if len(truth) != len(files):
        raise SystemExit(f"error: {len(truth)} ground-truth labels for {len(files)} val images")
    return {name: wnid_of[int(t)] for name, t in zip(sorted(files), truth)}


def labels_from_file(path: Path) -> dict[str, str]:
    """file name -> wnid from ``<file> <wnid>`` lines or Kaggle's LOC_val_solution.csv."""
    labels = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("ImageId"):
            continue
        if "," in line:  # ImageId,PredictionString ("n01751748 x y x y ...")
            image_id, prediction = line.split(",", 1)
            labels[f"{image_id}.JPEG"] = prediction.split()[0]
        else:
            name, wnid = line.split()[:2]
            labels[Path(name).name] = wnid
    return labels


def sort_val(val_images: Path, labels: dict[str, str], out: Path, move: bool) -> None:
    """Place each val image under ``out/<wnid>/`` (symlink, or move with ``move``)."""
    done = 0
    for name, wnid in sorted(labels.items()):
        src, dst = val_images / name, out / wnid / name
        if dst.exists() or dst.is_symlink():
            continue
        if not src.is_file():
            raise SystemExit(f"error: {src} is listed in the labels but missing")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(str(src), dst)
        else:
            dst.symlink_to(src.resolve())
        done += 1
    prepare.report("move" if move else "link", f"{done} val images into {out}/<wnid>/")


def counts(data_root: Path, variant: str, num_classes: int | None = None) -> str:
    """Load one variant; its counts as printed after ``ok``."""
    data = imagenet.load(data_root, variant, num_classes)
    return (
        f"{variant:15s} {len(data.image_paths):7d} images "
        f"{len(set(data.labels)):5d} classes present, {len(data.classnames)}-way"
    )


def present(
    data_root: Path, num_classes: dict[str, int] | None = None
) -> Iterator[tuple[str, Callable[[], str]]]:
    """``(variant, load)`` for each variant whose folder exists; prints ``skip`` for the others."""
    num_classes = num_classes or {}
    for variant, spec in imagenet.VARIANTS.items():
        if (data_root / spec.folder).is_dir():
            yield variant, partial(counts, data_root, variant, num_classes.get(variant))
        else:
            prepare.report("skip", f"{variant:15s} ({data_root / spec.folder} not found)")


def main(argv: list[str] | None = None) -> int:
    parser = prepare.argument_parser(__doc__)
    parser.add_argument("--data-root", type=Path, required=True, help="data root (data.root)")
    parser.add_argument("--val-images", type=Path, help="flat ILSVRC2012 val image folder")
    parser.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12 folder")
    parser.add_argument(
        "--val-labels", type=Path, help="'<file> <wnid>' lines or LOC_val_solution.csv"
    )
    parser.add_argument("--classnames", type=Path, help="CoOp imagenet/classnames.txt")
    parser.add_argument("--move", action="store_true", help="move val images instead of linking")
    parser.add_argument(
        "--num-classes",
        action="append",
        default=[],
        metavar="VARIANT=N",
        help="class count of a non-official copy (e.g. imagenet_a=16); repeatable",
    )
    args = parser.parse_args(argv)
    num_classes = {}
    for item in args.num_classes:
        variant, _, n = item.partition("=")
        if variant not in imagenet.VARIANTS or not n.isdigit():
            parser.error(
                f"--num-classes {item}: expected VARIANT=N, VARIANT in {list(imagenet.VARIANTS)}"
            )
        num_classes[variant] = int(n)

    if args.classnames:
        prepare.link(args.classnames, args.data_root / imagenet.CLASSNAMES, resolve=True)
    if args.val_images:
        files = sorted(p.name for p in args.val_images.iterdir() if p.is_file())
        if args.devkit:
            labels = labels_from_devkit(args.devkit, files)
        elif args.val_labels:
            labels = labels_from_file(args.val_labels)
        else:
            raise SystemExit("error: --val-images needs --devkit or --val-labels")
        out = args.data_root / imagenet.VARIANTS["imagenet"].folder
        sort_val(args.val_images.expanduser().resolve(), labels, out, args.move)
    return 0 if prepare.validate(present(args.data_root, num_classes)) else 1


if __name__ == "__main__":
    sys.exit(main())
