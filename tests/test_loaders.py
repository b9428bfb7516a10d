"""The real dataset loaders read every format the shapes world writes, and fail with a paragraph.

Expectations are recomputed from the files themselves (and the world's MANIFEST), not copied from
the loaders, so a loader that drops, reorders or misaligns anything fails here.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.data import cirr, coco, coop, fashioniq, flickr30k, imagenet
from xmodal.data.base import DatasetLayoutError
from xmodal.data.images import ImageDataset, open_image, split_tar_ref

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(shapes_world: Path) -> Path:
    """The small shapes world (written once per session by conftest's ``shapes_world``)."""
    return shapes_world


@pytest.fixture(scope="module")
def manifest(world: Path) -> dict:
    return json.loads((world / "MANIFEST.json").read_text())["counts"]


def mirror(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """``dst`` with a symlink to each child of ``src`` except ``skip`` (write only beside them)."""
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.name not in skip:
            (dst / child.name).symlink_to(child, target_is_directory=child.is_dir())
    return dst


def layout_message(call: Callable[[], object], dataset: str) -> str:
    """Run ``call``, expect the standard paragraph for ``dataset``, return its text."""
    with pytest.raises(DatasetLayoutError) as err:
        call()
    text = str(err.value)
    assert text.startswith(f"{dataset}: ")
    assert f"scripts/prepare_{dataset}.py" in text and "expected layout" in text
    return text


# ------------------------------------------------------------------------------------------------
# COCO and Flickr30k
# ------------------------------------------------------------------------------------------------


def karpathy_truth(path: Path, splits: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    images = json.loads(path.read_text())["images"]
    return [
        (img["filename"], [s["raw"] for s in img["sentences"]])
        for img in images
        if img["split"] in splits
    ]


def grouped(split) -> list[list[str]]:
    """Captions per image, from ``caption_image``."""
    out: list[list[str]] = [[] for _ in split.image_paths]
    for caption, image in zip(split.captions, split.caption_image):
        out[image].append(caption)
    return out


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_coco_karpathy_counts_and_alignment(world: Path, manifest: dict, split: str) -> None:
    data = coco.load(world / "coco", split=split)
    splits = ("train", "restval") if split == "train" else (split,)
    truth = karpathy_truth(world / "coco" / "dataset_coco.json", splits)
    assert [p.name for p in data.image_paths] == [name for name, _ in truth]
    assert grouped(data) == [caps for _, caps in truth]
    assert data.caption_image == sorted(data.caption_image)
    assert len(data.image_paths) == sum(manifest["coco"][s]["images"] for s in splits)
    assert len(data.captions) == sum(manifest["coco"][s]["captions"] for s in splits)
    assert all(p.is_file() and p.parent.name in ("train2014", "val2014") for p in data.image_paths)


def test_coco_has_variable_caption_counts(world: Path) -> None:
    counts = {len(c) for c in grouped(coco.load(world / "coco", "train"))}
    assert counts >= {5, 6}  # never assume 5 per image


def test_coco_wds_equals_karpathy(world: Path, manifest: dict) -> None:
    kar = coco.load(world / "coco", "test", fmt="karpathy")
    wds = coco.load(world / "coco", "test", fmt="wds")
    assert wds.captions == kar.captions and wds.caption_image == kar.caption_image
    assert len(wds.image_paths) == manifest["coco_wds"]["test"]["images"]
    shards = {split_tar_ref(ref)[0] for ref in wds.image_paths}  # type: ignore[index]
    assert len(shards) == manifest["coco_wds"]["test"]["shards"]
    for i in (0, len(kar.image_paths) - 1):
        a = np.asarray(open_image(kar.image_paths[i]))
        b = np.asarray(open_image(wds.image_paths[i]))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)


def test_coco_auto_picks_wds_when_only_wds_exists(world: Path, tmp_path: Path) -> None:
    root = mirror(world / "coco", tmp_path / "coco", skip=("dataset_coco.json",))
    data = coco.load(root, "test")
    assert split_tar_ref(data.image_paths[0]) is not None


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_flickr_karpathy_equals_nlphuji(world: Path, manifest: dict, split: str) -> None:
    kar = flickr30k.load(world / "flickr30k", split, fmt="karpathy")
    nlp = flickr30k.load(world / "flickr30k", split, fmt="nlphuji")
    assert kar == nlp
    truth = karpathy_truth(world / "flickr30k" / "dataset_flickr30k.json", (split,))
    assert grouped(kar) == [caps for _, caps in truth]
    assert [p.name for p in kar.image_paths] == [name for name, _ in truth]
    assert len(kar.image_paths) == manifest["flickr30k"][split]["images"]
    assert len(kar.captions) == manifest["flickr30k"][split]["captions"]


# ------------------------------------------------------------------------------------------------
# FashionIQ
# ------------------------------------------------------------------------------------------------


def fiq_json(world: Path, kind: str, cat: str, split: str) -> list:
    folder, stem = ("captions", "cap") if kind == "cap" else ("image_splits", "split")
    return json.loads((world / "fashioniq" / folder / f"{stem}.{cat}.{split}.json").read_text())


def fiq_lines(world: Path, cat: str, split: str) -> list[tuple[str, str, str]]:
    path = world / "fashioniq" / "captions_pairs" / f"fashion_iq-{split}-cap-{cat}.txt"
    rows = [line.split(";", 2) for line in path.read_text().splitlines()]
    return [(Path(r).stem, Path(t).stem, c) for r, t, c in rows]


def test_clip4cir_text_cleaning() -> None:
    assert fashioniq.clip4cir_text(["is RED.", " has dots?, "]) == "Is red and has dots"


@pytest.mark.parametrize("cat", fashioniq.CATEGORIES)
def test_fashioniq_protocol_a(world: Path, manifest: dict, cat: str) -> None:
    data = fashioniq.load(world / "fashioniq", cat, "val", "clip4cir")
    triplets = fiq_json(world, "cap", cat, "val")
    assert data.gallery == fiq_json(world, "split", cat, "val")  # A: the split file
    assert data.reference == [t["candidate"] for t in triplets]
    assert data.target == [t["target"] for t in triplets]
    assert data.captions == [t["captions"] for t in triplets]
    assert data.text == [fashioniq.clip4cir_text(t["captions"]) for t in triplets]
    assert data.remove_reference is False and data.protocol == "clip4cir"
    assert len(data.reference) == manifest[f"fashioniq/{cat}"]["val"]["triplets"]
    assert len(data.gallery) == manifest[f"fashioniq/{cat}"]["val"]["images"]
    assert set(data.name_to_path) == set(data.gallery)
    assert all(p.is_file() and p.stem == n for n, p in data.name_to_path.items())
    masked = fashioniq.load(world / "fashioniq", cat, "val", "clip4cir", remove_reference=True)
    assert masked.remove_reference is True and masked.gallery == data.gallery  # A'


@pytest.mark.parametrize("cat", fashioniq.CATEGORIES)
def test_fashioniq_protocol_b(world: Path, manifest: dict, cat: str) -> None:
    data = fashioniq.load(world / "fashioniq", cat, "val", "val")
    lines = fiq_lines(world, cat, "val")
    assert len(data.reference) == len(lines) == 2 * manifest[f"fashioniq/{cat}"]["val"]["pairs"]
    assert data.reference == [r for r, _, _ in lines] and data.target == [t for _, t, _ in lines]
    for i, (_, _, caption) in enumerate(lines):
        assert data.text[i] == f"{caption} and {lines[i ^ 1][2]}"  # own + sibling, both orders
    union = {r for r, _, _ in lines} | {t for _, t, _ in lines}
    assert set(data.gallery) == union and len(data.gallery) == len(union)
    assert len(union) < len(fiq_json(world, "split", cat, "val"))
    assert data.remove_reference is True


@pytest.mark.parametrize("cat", fashioniq.CATEGORIES)
def test_fashioniq_protocol_c(world: Path, cat: str) -> None:
    data = fashioniq.load(world / "fashioniq", cat, "val", "json_union")
    triplets = fiq_json(world, "cap", cat, "val")
    union = {t["candidate"] for t in triplets} | {t["target"] for t in triplets}
    assert set(data.gallery) == union and len(data.gallery) == len(union)
    assert len(data.reference) == len(triplets) and data.remove_reference is True
    assert data.text == fashioniq.load(world / "fashioniq", cat, "val").text


def test_fashioniq_train_and_test_splits(world: Path, manifest: dict) -> None:
    train = fashioniq.load(world / "fashioniq", "dress", "train")
    assert train.gallery == fiq_json(world, "split", "dress", "train")
    assert len(train.reference) == manifest["fashioniq/dress"]["train"]["triplets"]
    test = fashioniq.load(world / "fashioniq", "dress", "test")
    assert test.target is None
    assert len(test.reference) == manifest["fashioniq/dress"]["test"]["triplets"]
    assert test.gallery == fiq_json(world, "split", "dress", "test")


def test_fashioniq_reads_png_and_image_data_layout(world: Path, tmp_path: Path) -> None:
    data = fashioniq.load(world / "fashioniq", "shirt", "val")
    root = mirror(world / "fashioniq", tmp_path / "fiq", skip=("images",))
    folder = root / "image_data" / "shirt"
    folder.mkdir(parents=True)
    for path in data.name_to_path.values():
        (folder / path.name).symlink_to(path)
    other = fashioniq.load(root, "shirt", "val")
    assert other.gallery == data.gallery
    assert {n: p.name for n, p in other.name_to_path.items()} == {
        n: p.name for n, p in data.name_to_path.items()
    }
    suffixes = {
        p.suffix
        for c in fashioniq.CATEGORIES
        for p in fashioniq.load(world / "fashioniq", c, "train").name_to_path.values()
    }
    assert suffixes == {".jpg", ".png"}


# ------------------------------------------------------------------------------------------------
# CIRR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", cirr.SPLITS)
def test_cirr_splits(world: Path, manifest: dict, split: str) -> None:
    data = cirr.load(world / "cirr", split)
    caps = json.loads((world / "cirr/cirr/captions" / f"cap.rc2.{split}.json").read_text())
    files = json.loads((world / "cirr/cirr/image_splits" / f"split.rc2.{split}.json").read_text())
    assert data.gallery == list(files) and len(data.gallery) == manifest["cirr"][split]["images"]
    assert len(data.reference) == manifest["cirr"][split]["triplets"]
    assert data.pair_ids == [c["pairid"] for c in caps]
    assert data.text == [c["caption"] for c in caps]
    assert data.members == [c["img_set"]["members"] for c in caps]
    assert data.remove_reference is True
    assert all(data.name_to_path[n].is_file() for n in data.gallery)
    assert all(len(set(m)) == 6 and r in m for m, r in zip(data.members, data.reference))
    if split == "test1":
        assert data.target is None
    else:
        assert data.target == [c["target_hard"] for c in caps]
        assert all(t in m and t != r for t, m, r in zip(data.target, data.members, data.reference))


def test_cirr_clip4cir_layout(world: Path, tmp_path: Path) -> None:
    root = mirror(world / "cirr", tmp_path / "cirr_dataset", skip=("img_raw",))
    mirror(world / "cirr" / "img_raw", root)  # train/ dev/ test1/ next to cirr/
    official, other = cirr.load(world / "cirr", "val"), cirr.load(root, "val")
    assert other.target == official.target and other.gallery == official.gallery
    assert other.name_to_path[other.gallery[0]].parent == root / "dev"


# ------------------------------------------------------------------------------------------------
# ImageNet and variants
# ------------------------------------------------------------------------------------------------


def classnames(world: Path) -> dict[str, str]:
    lines = (world / "imagenet" / "classnames.txt").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


#: variant -> its key in the shapes world's MANIFEST.json
SHAPES_KEY = {
    "imagenet": "imagenet",
    "imagenet_a": "imagenet-a",
    "imagenet_r": "imagenet-r",
    "imagenet_v2": "imagenetv2",
    "imagenet_sketch": "imagenet-sketch",
}


def load_shapes_imagenet(world: Path, manifest: dict, variant: str):
    """A variant of the shapes world, which has its own class counts (48; A and R 16)."""
    return imagenet.load(world, variant, manifest[SHAPES_KEY[variant]]["test"]["classes"])


@pytest.mark.parametrize("variant", ["imagenet", "imagenet_sketch"])
def test_imagenet_full_label_space(world: Path, manifest: dict, variant: str) -> None:
    names = classnames(world)
    data = load_shapes_imagenet(world, manifest, variant)
    assert data.classnames == list(names.values())
    assert all(
        data.classnames[y] == names[p.parent.name] for p, y in zip(data.image_paths, data.labels)
    )
    assert all(list(names)[y] == p.parent.name for p, y in zip(data.image_paths, data.labels))


@pytest.mark.parametrize(
    ("variant", "key"), [("imagenet_a", "imagenet-a"), ("imagenet_r", "imagenet-r")]
)
def test_imagenet_a_r_are_subset_classifiers(
    world: Path, manifest: dict, variant: str, key: str
) -> None:
    names = classnames(world)
    data = load_shapes_imagenet(world, manifest, variant)
    wnids = sorted({p.parent.name for p in data.image_paths})
    assert len(data.classnames) == len(wnids) == manifest[key]["test"]["classes"] < len(names)
    assert len(data.image_paths) == manifest[key]["test"]["images"]
    # TPT / CLIP_benchmark: a mask over the 1k classes in 1k order, ImageFolder labels
    mask = [i for i, w in enumerate(names) if w in wnids]
    assert data.classnames == [list(names.values())[i] for i in mask]
    for path, label in zip(data.image_paths, data.labels):
        assert label == wnids.index(path.parent.name)
        assert data.classnames[label] == names[path.parent.name]


def test_imagenet_v2_label_is_folder_index(world: Path, manifest: dict) -> None:
    names = classnames(world)
    data = load_shapes_imagenet(world, manifest, "imagenet_v2")
    assert all(y == int(p.parent.name) for p, y in zip(data.image_paths, data.labels))
    assert data.classnames == list(names.values())
    assert len(data.image_paths) == manifest["imagenetv2"]["test"]["images"]
    # TPT: ImageFolder label (string-sorted folders) -> 1k index via sorted(range(n), key=str)
    folders = sorted({p.parent.name for p in data.image_paths})
    mask = sorted(range(len(names)), key=str)
    for path, label in zip(data.image_paths, data.labels):
        assert mask[folders.index(path.parent.name)] == label


# ------------------------------------------------------------------------------------------------
# CoOp datasets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(coop.DATASETS))
def test_coop_dataset(
    world: Path, manifest: dict, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = coop.DATASETS[name]
    with caplog.at_level(logging.WARNING, logger="xmodal.data.coop"):
        data = coop.load(world, name)
    assert "CoOp paper has" in caplog.text  # the small world has fewer images: warn only
    counts = manifest[spec.folder]["test"]
    assert len(data.image_paths) == counts["images"] and len(data.classnames) == counts["classes"]
    assert all(p.is_file() for p in data.image_paths)
    root = world / spec.folder
    if name == "fgvc_aircraft":
        variants = (root / "variants.txt").read_text().splitlines()
        lines = (root / "images_variant_test.txt").read_text().splitlines()
        assert data.classnames == variants
        expected = [
            (f"{ln.split(' ', 1)[0]}.jpg", variants.index(ln.split(" ", 1)[1])) for ln in lines
        ]
    else:
        test = json.loads((root / spec.split_file).read_text())["test"]
        expected = [(rel, label) for rel, label, _ in test]
        assert all(data.classnames[label] == cname for _, label, cname in test)
    image_dir = root / spec.image_dir if spec.image_dir else root
    assert [
        (str(p.relative_to(image_dir)), y) for p, y in zip(data.image_paths, data.labels)
    ] == expected


def test_coop_registry_and_cars_paths(world: Path) -> None:
    assert len(coop.DATASETS) == 10
    assert coop.DATASETS["caltech101"].num_classes == 100
    cars = coop.load(world, "stanford_cars")
    assert all(p.parent.parent == world / "stanford_cars" for p in cars.image_paths)
    assert any("_" in c for c in coop.load(world, "oxford_pets").classnames)  # "_" kept
    with pytest.raises(ValueError, match="unknown CoOp dataset"):
        coop.load(world, "cifar10")


# ------------------------------------------------------------------------------------------------
# Error paragraphs: missing file, malformed file, wrong layout
# ------------------------------------------------------------------------------------------------


def test_errors_coco(world: Path, tmp_path: Path) -> None:
    text = layout_message(lambda: coco.load(tmp_path), "coco")
    assert str(tmp_path / "dataset_coco.json") in text and "nshards.txt" in text
    bad = mirror(world / "coco", tmp_path / "bad", skip=("dataset_coco.json",))
    (bad / "dataset_coco.json").write_text('{"images": [')
    text = layout_message(lambda: coco.load(bad), "coco")
    assert f"malformed JSON in {bad / 'dataset_coco.json'}" in text
    wds = tmp_path / "wds_root" / "wds" / "test"
    wds.mkdir(parents=True)
    (wds / "0.tar").symlink_to(world / "coco/wds/test/0.tar")
    (wds / "nshards.txt").write_text("3\n")
    text = layout_message(lambda: coco.load(tmp_path / "wds_root", fmt="wds"), "coco")
    assert str(wds / "1.tar") in text and "2 of 3" in text


def test_errors_flickr(world: Path, tmp_path: Path) -> None:
    root = mirror(world / "flickr30k", tmp_path / "f", skip=("flickr30k-images",))
    text = layout_message(lambda: flickr30k.load(root), "flickr30k")
    assert f"missing folder {root / 'flickr30k-images'}" in text
    root = mirror(world / "flickr30k", tmp_path / "g", skip=("flickr_annotations_30k.csv",))
    with open(root / "flickr_annotations_30k.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ["raw", "sentids", "split", "filename", "img_id"],
                ["not json", "[]", "test", "x.jpg", "0"],
            ]
        )
    text = layout_message(lambda: flickr30k.load(root, fmt="nlphuji"), "flickr30k")
    assert "flickr_annotations_30k.csv line 2" in text and "not a JSON list" in text


def test_errors_fashioniq(world: Path, tmp_path: Path) -> None:
    root = mirror(world / "fashioniq", tmp_path / "a", skip=("image_splits",))
    text = layout_message(lambda: fashioniq.load(root, "dress"), "fashioniq")
    assert f"missing file {root / 'image_splits' / 'split.dress.val.json'}" in text
    root = mirror(world / "fashioniq", tmp_path / "b", skip=("captions_pairs",))
    (root / "captions_pairs").mkdir()
    lines = (world / "fashioniq/captions_pairs/fashion_iq-val-cap-dress.txt").read_text()
    path = root / "captions_pairs" / "fashion_iq-val-cap-dress.txt"
    path.write_text("".join(lines.splitlines(keepends=True)[1:]))  # one line short
    text = layout_message(lambda: fashioniq.load(root, "dress", protocol="val"), "fashioniq")
    assert f"malformed {path}" in text
    root = mirror(world / "fashioniq", tmp_path / "c", skip=("images",))
    (root / "images").mkdir()
    text = layout_message(lambda: fashioniq.load(root, "toptee"), "fashioniq")
    assert "images are missing" in text and str(root / "images") in text
    with pytest.raises(ValueError, match="protocol"):
        fashioniq.load(world / "fashioniq", "dress", protocol="union")


def test_errors_cirr(world: Path, tmp_path: Path) -> None:
    root = mirror(world / "cirr", tmp_path / "a", skip=("img_raw",))  # wrong layout: no images
    text = layout_message(lambda: cirr.load(root), "cirr")
    assert "images listed in split.rc2.val.json are missing" in text and str(root / "dev") in text
    root = tmp_path / "b"
    (root / "cirr" / "captions").mkdir(parents=True)
    (root / "cirr" / "image_splits").symlink_to(world / "cirr/cirr/image_splits")
    (root / "img_raw").symlink_to(world / "cirr/img_raw")
    cap = root / "cirr/captions/cap.rc2.val.json"
    cap.write_text('[{"pairid": 1}]')
    text = layout_message(lambda: cirr.load(root), "cirr")
    assert f"malformed {cap}" in text and "target_hard" in text
    text = layout_message(lambda: cirr.load(root, "test1"), "cirr")
    assert f"missing file {root / 'cirr/captions/cap.rc2.test1.json'}" in text


def test_errors_imagenet(world: Path, tmp_path: Path) -> None:
    text = layout_message(lambda: imagenet.load(tmp_path), "imagenet")
    assert f"missing file {tmp_path / 'imagenet' / 'classnames.txt'}" in text
    root = mirror(world, tmp_path / "w", skip=("imagenet-rendition",))
    folder = root / "imagenet-rendition" / "imagenet-r"
    folder.mkdir(parents=True)
    source = world / "imagenet-rendition" / "imagenet-r"
    (folder / "n99999999").symlink_to(next(d for d in sorted(source.iterdir()) if d.is_dir()))
    text = layout_message(lambda: imagenet.load(root, "imagenet_r"), "imagenet")
    assert "n99999999" in text and "classnames.txt" in text


def _official_sized_imagenet(world: Path, root: Path) -> tuple[list[str], Path]:
    """An ImageNet tree with the official class counts (1000; A and R 200), one image per class
    folder (a link to a shapes-world image): 1000 wnids, val, V2 and Sketch, A and R."""
    image = next((world / "imagenet/images/val").glob("*/*.JPEG"))
    wnids = [f"n{i:08d}" for i in range(1000)]
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet/classnames.txt").write_text("".join(f"{w} class {w}\n" for w in wnids))
    for variant, spec in imagenet.VARIANTS.items():
        folders = [str(i) for i in range(1000)] if variant == "imagenet_v2" else wnids
        for name in folders[: spec.num_classes]:
            (root / spec.folder / name).mkdir(parents=True)
            (root / spec.folder / name / "1.jpg").symlink_to(image)
    return wnids, image


def test_partial_imagenet_downloads_are_refused(world: Path, tmp_path: Path, caplog) -> None:
    """A missing class folder must not silently turn a 200-way classifier into a 199-way one."""
    import shutil

    root = tmp_path / "data"
    wnids, _ = _official_sized_imagenet(world, root)
    with caplog.at_level(logging.WARNING, logger="xmodal.data.imagenet"):
        for variant, spec in imagenet.VARIANTS.items():
            data = imagenet.load(root, variant)
            assert len(data.classnames) == spec.num_classes and len(data.image_paths) == (
                spec.num_classes
            )
    assert "the official ImageNet-A has 7500" in caplog.text  # one image per class: a warning

    folder_a = root / "imagenet-adversarial/imagenet-a"
    shutil.rmtree(folder_a / wnids[7])
    text = layout_message(lambda: imagenet.load(root, "imagenet_a"), "imagenet")
    assert f"{folder_a}: found 199 ImageNet-A class folders, expected 200" in text
    assert "partial download" in text and "data.num_classes" in text

    folder_val = root / "imagenet/images/val"
    shutil.rmtree(folder_val / wnids[3])
    text = layout_message(lambda: imagenet.load(root, "imagenet"), "imagenet")
    assert f"{folder_val}: found 999 ImageNet val class folders (missing e.g. {wnids[3]})" in text
    assert "expected 1000" in text

    folder_v2 = root / imagenet.VARIANTS["imagenet_v2"].folder
    shutil.rmtree(folder_v2 / "512")
    text = layout_message(lambda: imagenet.load(root, "imagenet_v2"), "imagenet")
    assert "found 999 ImageNet-V2 class folders (missing e.g. 512), expected 1000" in text

    folder_r = root / "imagenet-rendition/imagenet-r"
    (folder_r / wnids[0] / "1.jpg").unlink()
    text = layout_message(lambda: imagenet.load(root, "imagenet_r"), "imagenet")
    assert f"1 of the 200 class folders in {folder_r} hold no images (e.g. {wnids[0]})" in text

    names = root / "imagenet/classnames.txt"
    names.write_text("".join(names.read_text().splitlines(keepends=True)[:-1]))
    text = layout_message(lambda: imagenet.load(root, "imagenet_sketch"), "imagenet")
    assert f"{names}: found 999 classes, expected 1000" in text


def test_declared_class_counts_load_the_shapes_world(world: Path, manifest: dict, xmodal_env):
    """The shapes world has fewer classes; its data configs declare them (data.num_classes)."""
    from xmodal.config import compose
    from xmodal.data.datamodule import load_split

    for variant, key in SHAPES_KEY.items():
        cfg = compose("eval", [f"data=shapes_{variant}", "data.shapes_world=small"])
        data = load_split(cfg.data)
        assert len(data.classnames) == cfg.data.num_classes == manifest[key]["test"]["classes"]
        assert cfg.data.num_classes < imagenet.VARIANTS[variant].num_classes
        # without the declaration the official count is required, and a wrong one is refused
        text = layout_message(lambda v=variant: imagenet.load(world, v), "imagenet")
        assert "partial download" in text
        wrong = cfg.data.num_classes + 1
        text = layout_message(lambda v=variant, n=wrong: imagenet.load(world, v, n), "imagenet")
        assert f"expected {wrong}; data.num_classes declares" in text


def test_errors_coop(world: Path, tmp_path: Path) -> None:
    text = layout_message(lambda: coop.load(tmp_path, "dtd"), "coop")
    assert str(tmp_path / "dtd" / "split_zhou_DescribableTextures.json") in text
    root = tmp_path / "w"
    mirror(world / "eurosat", root / "eurosat", skip=("split_zhou_EuroSAT.json",))
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text('{"test": [["a.jpg", 0]]}')
    text = layout_message(lambda: coop.load(root, "eurosat"), "coop")
    assert "split_zhou_EuroSAT.json" in text and "[path, label, name]" in text


# ------------------------------------------------------------------------------------------------
# Corrupt images in a real split
# ------------------------------------------------------------------------------------------------


def test_corrupt_image_in_split_skip_vs_fail(world: Path, tmp_path: Path) -> None:
    refs: list = list(coco.load(world / "coco", "test", fmt="wds").image_paths[:3])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    refs.insert(1, broken)

    def transform(img) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)

    loader = torch.utils.data.DataLoader(ImageDataset(refs, transform, "skip"), batch_size=4)
    index, batch, valid = next(iter(loader))
    assert valid.tolist() == [True, False, True, True] and batch.shape == (4, 3, 8, 8)
    assert batch[1].abs().sum() == 0 and int((~valid).sum()) == 1
    with pytest.raises(OSError, match="data.on_corrupt=skip"):
        next(iter(torch.utils.data.DataLoader(ImageDataset(refs, transform), batch_size=4)))


# ------------------------------------------------------------------------------------------------
# scripts/prepare_<dataset>.py
# ------------------------------------------------------------------------------------------------


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize(
    "name",
    [
        "prepare_coco",
        "prepare_flickr30k",
        "prepare_fashioniq",
        "prepare_cirr",
        "prepare_imagenet",
        "prepare_coop",
    ],
)
def test_prepare_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        script(name).main(["--help"])
    assert exit_.value.code == 0 and "--root" in capsys.readouterr().out.replace(
        "--data-root", "--root"
    )


def test_prepare_validate_world(world: Path, manifest: dict, capsys: pytest.CaptureFixture) -> None:
    assert script("prepare_coco").main(["--root", str(world / "coco")]) == 0
    assert script("prepare_flickr30k").main(["--root", str(world / "flickr30k")]) == 0
    assert script("prepare_fashioniq").main(["--root", str(world / "fashioniq")]) == 0
    assert script("prepare_cirr").main(["--root", str(world / "cirr")]) == 0
    counts = [f"--num-classes={v}={manifest[k]['test']['classes']}" for v, k in SHAPES_KEY.items()]
    assert script("prepare_imagenet").main(["--data-root", str(world), *counts]) == 0
    assert script("prepare_coop").main(["--data-root", str(world)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "10/10 datasets ready" in out
    assert script("prepare_coop").main(["--data-root", str(world / "nowhere")]) == 1
    assert "MISS" in capsys.readouterr().out


def test_prepare_conversions(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # COCO from a wds snapshot; Flickr from an nlphuji snapshot with the zipped images
    prep = script("prepare_coco")
    args = ["--root", str(tmp_path / "coco"), "--hf-snapshot", str(world / "coco/wds")]
    assert prep.main([*args, "--annotations", str(world / "coco/annotations")]) == 0
    assert "test   " in (out := capsys.readouterr().out) and ", COCO ids" in out
    # wds + the linked captions json give the ids the world's Karpathy json gives
    prepared = coco.load(tmp_path / "coco", "test", ids=True)
    karpathy = coco.load(world / "coco", "test", fmt="karpathy", ids=True)
    assert prepared.image_ids == karpathy.image_ids and prepared.caption_ids == karpathy.caption_ids
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "flickr_annotations_30k.csv").symlink_to(world / "flickr30k/flickr_annotations_30k.csv")
    with zipfile.ZipFile(snap / "flickr30k-images.zip", "w") as zf:
        for path in sorted((world / "flickr30k/flickr30k-images").iterdir()):
            zf.write(path, f"flickr30k-images/{path.name}")
    args = ["--root", str(tmp_path / "flickr"), "--nlphuji-snapshot", str(snap)]
    assert script("prepare_flickr30k").main(args) == 0
    # FashionIQ image_data/<cat>/ -> images/
    source = mirror(world / "fashioniq", tmp_path / "fiq_src", skip=("images",))
    for cat in fashioniq.CATEGORIES:
        (source / "image_data" / cat).mkdir(parents=True)
        for split in fashioniq.SPLITS:
            for path in fashioniq.load(world / "fashioniq", cat, split).name_to_path.values():
                if not (source / "image_data" / cat / path.name).exists():
                    (source / "image_data" / cat / path.name).symlink_to(path)
    args = ["--root", str(tmp_path / "fiq"), "--source", str(source)]
    assert script("prepare_fashioniq").main(args) == 0
    assert (tmp_path / "fiq" / "images").is_dir()
    # CIRR CLIP4Cir -> official
    clip4cir = mirror(world / "cirr", tmp_path / "cirr_dataset", skip=("img_raw",))
    mirror(world / "cirr" / "img_raw", clip4cir)
    assert script("prepare_cirr").main(["--root", str(clip4cir), "--to-official"]) == 0
    assert (clip4cir / "img_raw" / "dev").is_symlink()
    assert "FAIL" not in capsys.readouterr().out


def test_prepare_imagenet_sorts_val(world: Path, tmp_path: Path) -> None:
    from scipy.io import savemat

    flat = tmp_path / "val_flat"
    flat.mkdir()
    names = classnames(world)
    truth = {}
    for path in sorted((world / "imagenet/images/val").glob("*/*.JPEG")):
        (flat / path.name).symlink_to(path)
        truth[path.name] = path.parent.name
    # a devkit: meta.mat synsets (leaves have num_children 0) + one ILSVRC2012_ID per val image
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i + 1, w, names[w], 0) for i, w in enumerate(names)] + [(len(names) + 1, "n0", "x", 3)]
    savemat(devkit / "meta.mat", {"synsets": np.array(rows, dtype=dtype)})
    ids = {w: i + 1 for i, w in enumerate(names)}
    lines = [str(ids[truth[name]]) for name in sorted(truth)]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    args = [
        "--data-root",
        str(out),
        "--val-images",
        str(flat),
        "--devkit",
        str(devkit.parent),
        "--classnames",
        str(world / "imagenet/classnames.txt"),
        f"--num-classes=imagenet={len(names)}",
    ]
    assert script("prepare_imagenet").main(args) == 0
    data, ref = (
        imagenet.load(out, "imagenet", len(names)),
        imagenet.load(world, "imagenet", len(names)),
    )
    assert [p.name for p in data.image_paths] == [p.name for p in ref.image_paths]
    assert data.labels == ref.labels
