"""ImageNet val and its variants (A, R, V2, Sketch) in the CoOp/TPT layout (zeroshot.md §2-§3).

Class names come from CoOp's ``imagenet/classnames.txt`` (``wnid name`` per line, 1k order).

- ``imagenet``, ``imagenet_sketch``: wnid folders; label = the wnid's line in classnames.txt (the
  standard 1k index, which equals ImageFolder order over all 1000 sorted wnids).
- ``imagenet_a``, ``imagenet_r``: evaluated as C'-way classifiers over the wnid folders present
  (200 on real data): label = ImageFolder order over the sorted wnids, classnames = their names in
  that order. This equals TPT's / CLIP_benchmark's official 200-class masks, with no hard-coded
  list, because the 1k order is itself sorted by wnid.
- ``imagenet_v2``: folders ``0``..``999`` are 1k indices, so label = int(folder). TPT instead
  labels by ImageFolder's string-sorted folders and maps back through
  ``imagenet_v_mask = sorted(range(1000), key=str)``; mask[ImageFolder label] == int(folder), so
  the two are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xmodal.data.base import ClassificationSplit
from xmodal.data.images import Layout, list_images


@dataclass(frozen=True)
class Variant:
    """Where a variant lives under ``data_root`` and how its folders become labels."""

    folder: str
    labels: str  # "wnid_1k" | "wnid_subset" | "index_1k"


VARIANTS: dict[str, Variant] = {
    "imagenet": Variant("imagenet/images/val", "wnid_1k"),
    "imagenet_a": Variant("imagenet-adversarial/imagenet-a", "wnid_subset"),
    "imagenet_r": Variant("imagenet-rendition/imagenet-r", "wnid_subset"),
    "imagenet_v2": Variant("imagenetv2/imagenetv2-matched-frequency-format-val", "index_1k"),
    "imagenet_sketch": Variant("imagenet-sketch/images", "wnid_1k"),
}
CLASSNAMES = "imagenet/classnames.txt"

LAYOUT = """\
    <data_root>/imagenet/classnames.txt        ("n01440764 tench" per line, 1k order)
    <data_root>/imagenet/images/val/<wnid>/*.JPEG
    <data_root>/imagenet-adversarial/imagenet-a/<wnid>/*.jpg    (200 wnids + README.txt)
    <data_root>/imagenet-rendition/imagenet-r/<wnid>/*.jpg      (200 wnids)
    <data_root>/imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg
    <data_root>/imagenet-sketch/images/<wnid>/*.JPEG"""


def read_classnames(path: Path, layout: Layout) -> dict[str, str]:
    """wnid -> class name from CoOp's ``classnames.txt``, in file (1k label) order."""
    names: dict[str, str] = {}
    for i, line in enumerate(layout.read_text(path).splitlines()):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        layout.check(bool(name.strip()), f"malformed {path} line {i + 1}: expected 'wnid name'")
        layout.check(wnid not in names, f"malformed {path} line {i + 1}: duplicate wnid {wnid}")
        names[wnid] = name.strip()
    layout.check(bool(names), f"malformed {path}: no classes")
    return names


def load(data_root: Path | str, variant: str = "imagenet") -> ClassificationSplit:
    """Load the test images of an ImageNet variant with its label space (see module doc)."""
    data_root = Path(data_root)
    layout = Layout("imagenet", data_root, LAYOUT)
    if variant not in VARIANTS:
        raise ValueError(f"imagenet variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    spec = VARIANTS[variant]
    names = read_classnames(data_root / CLASSNAMES, layout)
    folder = layout.require(data_root / spec.folder, "folder")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    layout.check(bool(class_dirs), f"no class folders in {folder}")

    position = {wnid: i for i, wnid in enumerate(names)}
    if spec.labels == "index_1k":
        bad = [d.name for d in class_dirs if not (d.name.isdigit() and int(d.name) < len(names))]
        layout.check(not bad, f"folders {bad[:5]} in {folder} are not class indices 0..999")
        label_of = {d.name: int(d.name) for d in class_dirs}
        classnames = list(names.values())
    else:
        unknown = [d.name for d in class_dirs if d.name not in names]
        layout.check(not unknown, f"wnid folders {unknown[:5]} in {folder} are not in {CLASSNAMES}")
        if spec.labels == "wnid_1k":
            label_of = {d.name: position[d.name] for d in class_dirs}
            classnames = list(names.values())
        else:
            label_of = {d.name: i for i, d in enumerate(class_dirs)}
            classnames = [names[d.name] for d in class_dirs]

    paths: list[Path] = []
    labels: list[int] = []
    for d in class_dirs:
        files = list_images(d)
        paths.extend(files)
        labels.extend([label_of[d.name]] * len(files))
    layout.check(bool(paths), f"no images in the class folders of {folder}")
    return ClassificationSplit(variant, paths, labels, classnames)
