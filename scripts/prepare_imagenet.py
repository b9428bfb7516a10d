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

Nothing is deleted. Then every variant present is loaded and counted.

    python scripts/prepare_imagenet.py --data-root data --val-images ~/ILSVRC2012_img_val \\
        --devkit ~/ILSVRC2012_devkit_t12 --classnames ~/coop/imagenet/classnames.txt
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

try:
    from xmodal.data import imagenet
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from xmodal.data import imagenet
from xmodal.data.base import DatasetLayoutError


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
    print(f"{'move' if move else 'link'}   {done} val images into {out}/<wnid>/")


def validate(data_root: Path) -> bool:
    """Load every variant whose folder exists and print its counts."""
    ok, found = True, False
    for variant, spec in imagenet.VARIANTS.items():
        if not (data_root / spec.folder).is_dir():
            print(f"skip   {variant:15s} ({data_root / spec.folder} not found)")
            continue
        found = True
        try:
            data = imagenet.load(data_root, variant)
        except DatasetLayoutError as exc:
            print(f"FAIL   {variant}:\n{exc}")
            ok = False
            continue
        print(
            f"ok     {variant:15s} {len(data.image_paths):7d} images "
            f"{len(set(data.labels)):5d} classes present, {len(data.classnames)}-way"
        )
    return ok and found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, required=True, help="data root (data.root)")
    parser.add_argument("--val-images", type=Path, help="flat ILSVRC2012 val image folder")
    parser.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12 folder")
    parser.add_argument(
        "--val-labels", type=Path, help="'<file> <wnid>' lines or LOC_val_solution.csv"
    )
    parser.add_argument("--classnames", type=Path, help="CoOp imagenet/classnames.txt")
    parser.add_argument("--move", action="store_true", help="move val images instead of linking")
    args = parser.parse_args(argv)

    if args.classnames:
        dst = args.data_root / imagenet.CLASSNAMES
        if dst.exists() or dst.is_symlink():
            print(f"keep   {dst} (exists)")
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(args.classnames.expanduser().resolve())
            print(f"link   {dst}")
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
    return 0 if validate(args.data_root) else 1


if __name__ == "__main__":
    sys.exit(main())
