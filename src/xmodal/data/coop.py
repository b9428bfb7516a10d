"""The 10 CoOp zero-shot datasets, test split of CoOp's ``split_zhou_*.json`` (zeroshot.md §1-§2).

Each split file is ``{"train"|"val"|"test": [[relpath, label, classname], ...]}`` with relpaths
relative to the dataset's image dir (Stanford Cars: the dataset root). FGVCAircraft has no JSON:
``images_variant_test.txt`` lines ``<image id> <variant>`` and the label order of ``variants.txt``.
Class names keep ``_``; the prompt builder replaces it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from xmodal.data.base import ClassificationSplit
from xmodal.data.images import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoopDataset:
    """Where one CoOp dataset lives under ``data_root`` and its official sizes (CoOp paper)."""

    folder: str
    image_dir: str
    split_file: str
    num_classes: int
    num_test: int


DATASETS: dict[str, CoopDataset] = {
    "oxford_flowers": CoopDataset(
        "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102, 2463
    ),
    "dtd": CoopDataset("dtd", "images", "split_zhou_DescribableTextures.json", 47, 1692),
    "oxford_pets": CoopDataset("oxford_pets", "images", "split_zhou_OxfordPets.json", 37, 3669),
    "stanford_cars": CoopDataset("stanford_cars", "", "split_zhou_StanfordCars.json", 196, 8041),
    "ucf101": CoopDataset("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101, 3783),
    "caltech101": CoopDataset(
        "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100, 2465
    ),
    "food101": CoopDataset("food-101", "images", "split_zhou_Food101.json", 101, 30300),
    "sun397": CoopDataset("sun397", "SUN397", "split_zhou_SUN397.json", 397, 19850),
    "fgvc_aircraft": CoopDataset("fgvc_aircraft", "images", "images_variant_test.txt", 100, 3333),
    "eurosat": CoopDataset("eurosat", "2750", "split_zhou_EuroSAT.json", 10, 8100),
}


def layout_for(name: str) -> str:
    """The expected tree of one dataset, for error messages and the prepare script."""
    spec = DATASETS[name]
    image_dir = f"{spec.folder}/{spec.image_dir}/" if spec.image_dir else f"{spec.folder}/"
    if name == "fgvc_aircraft":
        return (
            f"    <data_root>/{spec.folder}/variants.txt           (one variant per line, "
            "label order)\n"
            f"    <data_root>/{spec.folder}/images_variant_test.txt  ('<image id> <variant>')\n"
            f"    <data_root>/{image_dir}<image id>.jpg"
        )
    return (
        f"    <data_root>/{spec.folder}/{spec.split_file}   "
        '{"test": [[relpath, label, classname], ...], ...}\n'
        f"    <data_root>/{image_dir}<relpath>"
    )


def load(data_root: Path | str, name: str) -> ClassificationSplit:
    """Load the CoOp test split of dataset ``name`` (a key of ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown CoOp dataset {name!r}; choose one of {tuple(DATASETS)}")
    data_root = Path(data_root)
    spec = DATASETS[name]
    root = data_root / spec.folder
    layout = Layout("coop", data_root, layout_for(name))
    image_dir = root / spec.image_dir if spec.image_dir else root
    if name == "fgvc_aircraft":
        paths, labels, classnames = _read_aircraft(root, image_dir, layout)
    else:
        paths, labels, classnames = _read_split(root / spec.split_file, image_dir, layout)
    layout.require_all(paths, f"{name} test images")
    if len(classnames) != spec.num_classes or len(paths) != spec.num_test:
        log.warning(
            "%s: %d classes / %d test images on disk, the CoOp paper has %d / %d "
            "(expected for the synthetic shapes world; check the download otherwise)",
            name,
            len(classnames),
            len(paths),
            spec.num_classes,
            spec.num_test,
        )
    return ClassificationSplit(name, paths, labels, classnames)


def _read_split(
    path: Path, image_dir: Path, layout: Layout
) -> tuple[list[Path], list[int], list[str]]:
    data = layout.read_json(path)
    layout.check(
        isinstance(data, dict) and isinstance(data.get("test"), list) and bool(data["test"]),
        f"malformed {path}: expected an object with a non-empty 'test' list",
    )
    names: dict[int, str] = {}
    for part in ("train", "val", "test"):
        for item in data.get(part) or []:
            ok = (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and isinstance(item[2], str)
            )
            layout.check(ok, f"malformed {path}: {part} entry {item!r} is not [path, label, name]")
            old = names.setdefault(item[1], item[2])
            layout.check(old == item[2], f"malformed {path}: label {item[1]} has two names")
    classnames = _ordered(names, path, layout)
    paths = [image_dir / relpath for relpath, _, _ in data["test"]]
    labels = [label for _, label, _ in data["test"]]
    return paths, labels, classnames


def _read_aircraft(
    root: Path, image_dir: Path, layout: Layout
) -> tuple[list[Path], list[int], list[str]]:
    classnames = [ln.strip() for ln in layout.read_text(root / "variants.txt").splitlines()]
    classnames = [c for c in classnames if c]
    label_of = {c: i for i, c in enumerate(classnames)}
    test_file = root / "images_variant_test.txt"
    paths, labels = [], []
    for i, line in enumerate(layout.read_text(test_file).splitlines()):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        layout.check(
            variant in label_of,
            f"malformed {test_file} line {i + 1}: variant {variant!r} is not in variants.txt",
        )
        paths.append(image_dir / f"{image_id}.jpg")
        labels.append(label_of[variant])
    layout.check(bool(paths), f"malformed {test_file}: no test images")
    return paths, labels, classnames


def _ordered(names: dict[int, str], path: Path, layout: Layout) -> list[str]:
    """Class names in label order; labels must be 0..C-1."""
    count = max(names) + 1
    gaps = [i for i in range(count) if i not in names]
    layout.check(min(names) >= 0 and not gaps, f"malformed {path}: labels {gaps[:5]} have no entry")
    return [names[i] for i in range(count)]
