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

Class counts are checked: a variant must have exactly its official number of class folders (1000;
A and R 200), and ImageNet, V2 and Sketch a 1000-line ``classnames.txt``, so a partial download
never silently becomes a 199-way classifier; an empty class folder is refused too. A copy with
other counts (the shapes world) declares its own with ``num_classes`` (``data.num_classes``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from xmodal.data.base import ClassificationSplit
from xmodal.data.images import Layout, list_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """Where a variant lives under ``data_root`` and how its folders become labels."""

    folder: str
    labels: str  # "wnid_1k" | "wnid_subset" | "index_1k"
    title: str  # for messages
    num_classes: int  # official class folders
    num_images: int  # official test images (datasets/zeroshot.md §2)


VARIANTS: dict[str, Variant] = {
    "imagenet": Variant("imagenet/images/val", "wnid_1k", "ImageNet val", 1000, 50_000),
    "imagenet_a": Variant(
        "imagenet-adversarial/imagenet-a", "wnid_subset", "ImageNet-A", 200, 7_500
    ),
    "imagenet_r": Variant(
        "imagenet-rendition/imagenet-r", "wnid_subset", "ImageNet-R", 200, 30_000
    ),
    "imagenet_v2": Variant(
        "imagenetv2/imagenetv2-matched-frequency-format-val",
        "index_1k",
        "ImageNet-V2",
        1000,
        10_000,
    ),
    "imagenet_sketch": Variant(
        "imagenet-sketch/images", "wnid_1k", "ImageNet-Sketch", 1000, 50_889
    ),
}
LABEL_SPACE = 1000  # lines of classnames.txt: the label space of ImageNet, V2 and Sketch
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


def _check_count(
    layout: Layout, found: int, expected: int, where: Path, what: str, declared: bool
) -> None:
    """Raise the layout paragraph unless ``found == expected`` (``what``: a description)."""
    if found == expected:
        return
    fix = (
        "data.num_classes declares this copy's own count: check it"
        if declared
        else "a partial download or extraction? Re-extract the official archive (a copy with "
        "other classes, such as the shapes world, declares its count with data.num_classes)"
    )
    layout.check(False, f"{where}: found {found} {what}, expected {expected}; {fix}")


def load(
    data_root: Path | str, variant: str = "imagenet", num_classes: int | None = None
) -> ClassificationSplit:
    """Load the test images of an ImageNet variant with its label space (see module doc).

    ``num_classes``: the class count the variant's folders must hold (None: the official one,
    ``VARIANTS[variant].num_classes``); for ImageNet, V2 and Sketch ``classnames.txt`` must list
    as many classes. Any other count raises the layout error.
    """
    data_root = Path(data_root)
    layout = Layout("imagenet", data_root, LAYOUT)
    if variant not in VARIANTS:
        raise ValueError(f"imagenet variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    spec = VARIANTS[variant]
    declared = num_classes is not None
    expected = int(num_classes) if declared else spec.num_classes
    names = read_classnames(data_root / CLASSNAMES, layout)
    if spec.labels != "wnid_subset":  # labels span the whole classnames.txt
        space = expected if declared else LABEL_SPACE
        _check_count(layout, len(names), space, data_root / CLASSNAMES, "classes", declared)
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

    what = f"{spec.title} class folders"
    if spec.labels != "wnid_subset":  # name the classes without a folder
        present = {d.name for d in class_dirs}
        keys = [str(i) for i in range(len(names))] if spec.labels == "index_1k" else list(names)
        missing = [k for k in keys if k not in present]
        what += f" (missing e.g. {', '.join(missing[:5])})" if missing else ""
    _check_count(layout, len(class_dirs), expected, folder, what, declared)

    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for d in class_dirs:
        files = list_images(d)
        paths.extend(files)
        labels.extend([label_of[d.name]] * len(files))
        empty += [] if files else [d.name]
    layout.check(bool(paths), f"no images in the class folders of {folder}")
    layout.check(
        not empty,
        f"{len(empty)} of the {len(class_dirs)} class folders in {folder} hold no images "
        f"(e.g. {', '.join(empty[:5])}): an incomplete download or extraction",
    )
    if not declared and len(paths) != spec.num_images:
        log.warning(
            "%s: %d test images in %s, the official %s has %d (check the download)",
            variant,
            len(paths),
            folder,
            spec.title,
            spec.num_images,
        )
    return ClassificationSplit(variant, paths, labels, classnames)
