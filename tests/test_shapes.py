"""The synthetic shapes world: rendering, captions, modifications and every on-disk format."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from xmodal.data.coop import DATASETS as COOP
from xmodal.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    describe,
    describe_change,
    modify,
    random_scene,
    render,
    write_world,
)

CATS = ("dress", "shirt", "toptee")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes") / "world"
    return root, write_world(root, seed=0, size="small")


def load(path: Path) -> object:
    return json.loads(path.read_text())


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# ---------------------------------------------------------------- determinism and caching


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    root, manifest = world
    reference = hashes(root)
    other = tmp_path / "other"
    assert write_world(other, seed=1)["seed"] == 1
    changed = hashes(other)
    assert changed != reference
    assert changed["coco/dataset_coco.json"] != reference["coco/dataset_coco.json"]
    # the same seed at the same place replaces the other world with identical bytes
    assert write_world(other, seed=0) == manifest
    assert hashes(other) == reference
    assert [p.name for p in tmp_path.iterdir()] == ["other"]  # no temp folders left behind


def test_cached_call_does_not_rewrite(world):
    root, manifest = world
    files = [root / "MANIFEST.json", root / "coco/dataset_coco.json", root / "pool/metadata.csv"]
    before = [p.stat().st_mtime_ns for p in files]
    assert write_world(root, seed=0, size="small") == manifest
    assert [p.stat().st_mtime_ns for p in files] == before
    assert load(root / "MANIFEST.json") == manifest
    assert manifest["seed"] == 0 and manifest["size"] == "small" and manifest["format_version"]


def test_refuses_foreign_folder_and_unknown_size(tmp_path):
    (tmp_path / "mine.txt").write_text("not a world")
    with pytest.raises(FileExistsError):
        write_world(tmp_path)
    with pytest.raises(ValueError, match="size"):
        write_world(tmp_path / "x", size="huge")
    assert set(SIZES) >= {"small", "medium"}


# ---------------------------------------------------------------- rendering


def one(shape: str = "circle", colour: str = "red", **kw) -> Scene:
    return Scene((SceneObject(shape, colour, **kw),))


def test_render_is_deterministic_and_shows_colour_position_and_shape():
    scene = random_scene(random.Random(3), 3, fills=("solid", "striped", "dotted"))
    assert render(scene).tobytes() == render(scene).tobytes()
    img = np.asarray(render(one("square", "red")), dtype=int)
    assert img.shape == (64, 64, 3)
    assert np.abs(img[32, 32] - COLOURS["red"]).max() < 10  # centre is the object's colour
    assert np.abs(img[2, 2] - BACKGROUNDS["grey"]).max() < 10  # corner is the background
    blue = np.asarray(render(one("square", "blue")), dtype=int)
    assert np.abs(blue[32, 32] - COLOURS["blue"]).max() < 10
    left = np.asarray(render(one(pos=(0, 1))), dtype=int)
    assert np.abs(left[32, 10] - COLOURS["red"]).max() < 10
    assert np.abs(left[32, 53] - BACKGROUNDS["grey"]).max() < 10
    # inside the square's corner but outside the circle
    circle = np.asarray(render(one("circle")), dtype=int)
    square = np.asarray(render(one("square")), dtype=int)
    assert np.abs(circle[38, 38] - BACKGROUNDS["grey"]).max() < 30
    assert np.abs(square[38, 38] - COLOURS["red"]).max() < 30
    images = {s: np.asarray(render(one(s)), dtype=int) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (np.abs(images[a] - images[b]).sum(-1) > 60).sum() > 15, (a, b)
    big = np.asarray(render(one(size="large")), dtype=int)
    small = np.asarray(render(one(size="small")), dtype=int)
    assert (np.abs(big - small).sum(-1) > 60).sum() > 100


def test_render_styles_differ():
    obj = SceneObject("star", "red")
    sketch = np.asarray(render(Scene((obj,), style="sketch")), dtype=int)
    assert (sketch.max(-1) - sketch.min(-1)).max() < 15  # grey pencil lines, no colour
    assert sketch.min() < 180  # but something is drawn
    for style in ("cartoon", "noisy"):
        img = render(Scene((obj,), style=style, seed=5))
        assert img.tobytes() != render(Scene((obj,))).tobytes()


# ---------------------------------------------------------------- captions


def test_captions_mention_the_actual_colours_and_shapes():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng, background=rng.choice(("grey", "beige", "sky")))
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        caption = describe(scene, rng)
        w = words(caption)
        assert {x for x in w if x in COLOURS} <= colours, caption
        assert {x for x in w if x in SHAPES} <= shapes, caption
        pairs = {(o.colour, o.shape) for o in scene.objects}
        assert any((a, b) in pairs for a, b in zip(w, w[1:])), caption
        for n, number in ((2, "two"), (3, "three")):
            if f"{number} shapes" in caption.lower():
                assert len(scene.objects) == n
    scene = random_scene(random.Random(1), 1)
    assert len({describe(scene, rng) for _ in range(20)}) >= 5  # several distinct phrasings


def test_sketch_captions_name_no_colour():
    rng = random.Random(2)
    scene = random_scene(rng, 2, style="sketch")
    for _ in range(20):
        assert not set(words(describe(scene, rng))) & set(COLOURS)


# ---------------------------------------------------------------- modifications


def check_change(kind: str, ref: Scene, tgt: Scene, texts: list[str]) -> None:
    assert len(texts) == 2 and texts[0] != texts[1]
    keys = lambda s: sorted(o.key() for o in s.objects)  # noqa: E731
    assert keys(ref) != keys(tgt) or ref.background != tgt.background
    gone = [o for o in ref.objects if o.key() not in keys(tgt)]
    new = [o for o in tgt.objects if o.key() not in keys(ref)]
    for text in texts:
        w = set(words(text))
        if kind == "recolour":
            assert new[0].colour in w and new[0].shape in w and new[0].shape == gone[0].shape
        elif kind == "reshape":
            assert new[0].shape in w and new[0].colour == gone[0].colour
        elif kind == "resize":
            grow = {"bigger", "larger", "enlarge"}
            assert w & (grow if new[0].size == "large" else {"smaller", "shrink"})
        elif kind == "move":
            col, row = new[0].pos
            expected = {("left", "centre", "right")[col], ("top", "middle", "bottom")[row]}
            expected -= {"centre", "middle"} if (col, row) != (1, 1) else set()
            assert expected & w and new[0].pos != gone[0].pos
        elif kind == "add":
            assert not gone and new[0].colour in w and new[0].shape in w
        elif kind == "remove":
            assert not new and gone[0].shape in w and len(tgt.objects) == len(ref.objects) - 1
        elif kind == "refill":
            assert ({"outlined", "striped", "dotted", "chequered", "solid"} & w) and new
        elif kind == "background":
            assert tgt.background in w


@pytest.mark.parametrize(
    "kind", ["recolour", "reshape", "resize", "move", "refill", "add", "remove", "background"]
)
def test_modification_texts_describe_the_real_change(kind):
    rng = random.Random(kind)
    for _ in range(40):
        ref = random_scene(rng, rng.randint(2, 3), fills=("solid", "striped"))
        tgt, texts = modify(
            ref,
            rng,
            kind,
            fills=("solid", "striped", "dotted"),
            backgrounds=("grey", "sky"),
            max_objects=4,
        )
        check_change(kind, ref, tgt, texts)
        describe_change(tgt, ref, rng)  # the inverse change is describable too


def test_modify_random_kinds_and_bounds():
    rng = random.Random(7)
    seen = set()
    for _ in range(200):
        ref = random_scene(rng, shapes=("circle", "star"))
        tgt, texts = modify(ref, rng, shapes=("circle", "star"))
        assert {o.shape for o in tgt.objects} <= {"circle", "star"}
        assert len(texts) == 2
        seen.add(len(tgt.objects) - len(ref.objects))
    assert seen == {-1, 0, 1}
    with pytest.raises(ValueError):
        modify(one(), rng, "remove")  # a lone object cannot be removed


# ---------------------------------------------------------------- COCO and Flickr30k


def test_coco_karpathy_and_wds(world):
    root, manifest = world
    data = load(root / "coco/dataset_coco.json")
    assert data["dataset"] == "coco"
    counts = manifest["counts"]["coco"]
    sentids = []
    n_caps = []
    for i, im in enumerate(data["images"]):
        assert im["imgid"] == i and im["split"] in counts
        folder = "train2014" if im["split"] == "train" else "val2014"
        assert im["filepath"] == folder
        assert im["filename"] == f"COCO_{folder}_{im['cocoid']:012d}.jpg"
        assert (root / "coco" / folder / im["filename"]).is_file()
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == i and s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        sentids += im["sentids"]
        n_caps.append(len(im["sentences"]))
    assert len(set(sentids)) == len(sentids)
    assert set(n_caps) == {5, 6, 7}
    assert 0.05 < sum(n > 5 for n in n_caps) / len(n_caps) < 0.2
    for split, c in counts.items():
        assert c["images"] == sum(im["split"] == split for im in data["images"])
    test = [im for im in data["images"] if im["split"] == "test"]
    assert {n for n in (len(im["sentences"]) for im in test)} == {5, 6, 7}

    wds = root / "coco/wds"
    assert (wds / "dataset_type.txt").read_text().strip() == "retrieval"
    n_shards = int((wds / "test/nshards.txt").read_text())
    assert n_shards >= 2
    samples: dict[str, dict[str, bytes]] = {}
    for s in range(n_shards):
        with tarfile.open(wds / f"test/{s}.tar") as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert len(samples) == len(test)
    for key, im in zip(sorted(samples), test):
        assert samples[key]["txt"].decode().split("\n") == [s["raw"] for s in im["sentences"]]
        assert samples[key]["jpg"] == (root / "coco/val2014" / im["filename"]).read_bytes()


def test_flickr30k_karpathy_and_csv(world):
    root, manifest = world
    data = load(root / "flickr30k/dataset_flickr30k.json")
    assert data["dataset"] == "flickr30k"
    with (root / "flickr30k/flickr_annotations_30k.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["images"])
    for im, row in zip(data["images"], rows):
        assert len(im["sentences"]) == 5
        assert re.fullmatch(r"\d+\.jpg", im["filename"])
        assert (root / "flickr30k/flickr30k-images" / im["filename"]).is_file()
        assert json.loads(row["raw"]) == [s["raw"] for s in im["sentences"]]
        assert json.loads(row["sentids"]) == im["sentids"]
        assert (row["split"], row["filename"], int(row["img_id"])) == (
            im["split"],
            im["filename"],
            im["imgid"],
        )
    for split, c in manifest["counts"]["flickr30k"].items():
        assert c["images"] == sum(r["split"] == split for r in rows)


# ---------------------------------------------------------------- FashionIQ and CIRR


def test_fashioniq(world):
    root, manifest = world
    fiq = root / "fashioniq"
    images = {p.stem: p.suffix for p in (fiq / "images").iterdir()}
    assert ".png" in images.values() and ".jpg" in images.values()
    owner: dict[str, str] = {}
    for cat in CATS:
        for split in ("train", "val", "test"):
            names = load(fiq / f"image_splits/split.{cat}.{split}.json")
            triplets = load(fiq / f"captions/cap.{cat}.{split}.json")
            assert len(triplets) == manifest["counts"][f"fashioniq/{cat}"][split]["triplets"]
            used = set()
            for t in triplets:
                assert len(t["captions"]) == 2
                assert ("target" in t) == (split != "test")
                used |= {t["candidate"], t.get("target", t["candidate"])}
                if split == "val":
                    assert t["candidate"] != t["target"]
            assert used <= set(names) and len(names) > len(used)  # plus distractors
            for asin in names:
                assert re.fullmatch(r"B00[A-Z0-9]{7}", asin) and asin in images
                assert owner.setdefault(asin, cat) == cat  # unique across categories
            if split == "test":
                continue
            lines = (fiq / f"captions_pairs/fashion_iq-{split}-cap-{cat}.txt").read_text()
            lines = lines.splitlines()
            assert len(lines) % 2 == 0
            json_triplets = {(t["candidate"], t["target"]): t["captions"] for t in triplets}
            pairs = set()
            for a, b in zip(lines[::2], lines[1::2]):
                ref, tgt, cap = a.split(";")
                assert b.split(";")[:2] == [ref, tgt]
                key = (
                    ref.removeprefix(f"{cat}/").removesuffix(".jpg"),
                    tgt.removeprefix(f"{cat}/").removesuffix(".jpg"),
                )
                assert [cap, b.split(";")[2]] == json_triplets[key]
                pairs.add(key)
            assert 0 < len(pairs) < len(triplets)
    # the categories are visibly different sub-worlds (their backgrounds)
    corners = {}
    for cat in CATS:
        asin = load(fiq / f"image_splits/split.{cat}.val.json")[0]
        img = np.asarray(render_file(fiq / "images" / f"{asin}{images[asin]}"), dtype=int)
        corners[cat] = img[:3, :3].reshape(-1, 3).mean(0)
    assert min(np.abs(corners[a] - corners[b]).max() for a in CATS for b in CATS if a < b) > 15


def render_file(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def test_cirr(world):
    root, manifest = world
    pairids = []
    for split, folder in (("train", "train"), ("val", "dev"), ("test1", "test1")):
        entries = load(root / f"cirr/cirr/captions/cap.rc2.{split}.json")
        split_map = load(root / f"cirr/cirr/image_splits/split.rc2.{split}.json")
        assert manifest["counts"]["cirr"][split]["triplets"] == len(entries)
        for name, rel in split_map.items():
            prefix = "./train/" if split == "train" else f"./{folder}/"
            assert rel.startswith(prefix) and rel.endswith(f"/{name}.png")
            assert (root / "cirr/img_raw" / rel).is_file()
            assert re.fullmatch(rf"{folder}-\d+-\d-img[01]", name)
        for e in entries:
            pairids.append(e["pairid"])
            members = e["img_set"]["members"]
            assert len(set(members)) == 6 and set(members) <= set(split_map)
            assert members[e["img_set"]["reference_rank"]] == e["reference"]
            assert isinstance(e["caption"], str) and e["caption"]
            if split == "test1":
                assert "target_hard" not in e and "target_soft" not in e
                assert "target_rank" not in e["img_set"]
                continue
            assert e["target_hard"] in members and e["target_hard"] != e["reference"]
            assert members[e["img_set"]["target_rank"]] == e["target_hard"]
            assert e["target_soft"] == {e["target_hard"]: 1.0}
    assert len(set(pairids)) == len(pairids)


# ---------------------------------------------------------------- classification trees


def test_imagenet_trees(world):
    root, manifest = world
    lines = (root / "imagenet/classnames.txt").read_text().splitlines()
    wnids = [line.split(" ", 1)[0] for line in lines]
    names = [line.split(" ", 1)[1] for line in lines]
    assert wnids == sorted(wnids) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert len(set(names)) == len(names) > 10
    for name in names:
        colour, shape = name.split()
        assert colour in COLOURS and shape in SHAPES
    val = root / "imagenet/images/val"
    assert sorted(p.name for p in val.iterdir()) == wnids
    assert all(p.suffix == ".JPEG" for p in val.rglob("*") if p.is_file())
    subsets = []
    for rel in ("imagenet-adversarial/imagenet-a", "imagenet-rendition/imagenet-r"):
        folders = {p.name for p in (root / rel).iterdir() if p.is_dir()}
        assert folders < set(wnids) and all(any((root / rel / w).iterdir()) for w in folders)
        subsets.append(folders)
    assert subsets[0] != subsets[1] and subsets[0] & subsets[1]
    assert manifest["counts"]["imagenet-a"]["test"]["classes"] == len(subsets[0])
    v2 = root / "imagenetv2/imagenetv2-matched-frequency-format-val"
    folders = sorted(p.name for p in v2.iterdir())
    assert sorted(folders, key=int) == [str(i) for i in range(len(wnids))]
    assert folders != sorted(folders, key=int)  # string order differs from label order
    sketch = root / "imagenet-sketch/images"
    assert sorted(p.name for p in sketch.iterdir()) == wnids
    img = np.asarray(render_file(next((sketch / wnids[0]).iterdir())), dtype=int)
    assert (img.max(-1) - img.min(-1)).mean() < 10  # grey sketches


def test_coop_split_files(world):
    root, manifest = world
    for spec in COOP.values():  # the loader's table (datasets/zeroshot.md §2)
        if spec.folder == "fgvc_aircraft":  # text files, checked below
            continue
        folder, image_dir = spec.folder, spec.image_dir
        split = load(root / folder / spec.split_file)
        assert set(split) == {"train", "val", "test"}
        label_to_name: dict[int, str] = {}
        for part, items in split.items():
            assert len(items) == manifest["counts"][folder][part]["images"] > 0
            for rel, label, name in items:
                assert label_to_name.setdefault(label, name) == name
                assert (root / folder / image_dir / rel).is_file(), (folder, rel)
        assert sorted(label_to_name) == list(range(len(label_to_name)))
        assert 5 <= len(set(label_to_name.values())) == len(label_to_name) <= 12
    pets = {name for _, _, name in load(root / "oxford_pets/split_zhou_OxfordPets.json")["test"]}
    assert all("_" in name and name == name.lower() for name in pets)
    cars = load(root / "stanford_cars/split_zhou_StanfordCars.json")
    assert {rel.split("/")[0] for rel, _, _ in cars["test"]} == {"cars_test"}
    flowers = load(root / "oxford_flowers/split_zhou_OxfordFlowers.json")
    cat_to_name = load(root / "oxford_flowers/cat_to_name.json")
    assert all(cat_to_name[str(label + 1)] == name for _, label, name in flowers["test"])
    assert (root / "caltech-101/101_ObjectCategories/BACKGROUND_Google").is_dir()

    aircraft = root / "fgvc_aircraft"
    variants = (aircraft / "variants.txt").read_text().splitlines()
    assert not list(aircraft.glob("*.json"))
    for part in ("train", "val", "test"):
        lines = (aircraft / f"images_variant_{part}.txt").read_text().splitlines()
        assert len(lines) == manifest["counts"]["fgvc_aircraft"][part]["images"]
        for line in lines:
            image_id, variant = line.split(" ", 1)
            assert variant in variants and (aircraft / "images" / f"{image_id}.jpg").is_file()


def test_pool(world):
    root, manifest = world
    with (root / "pool/metadata.csv").open(newline="") as f:
        rows = [(r["image_path"], r["caption"]) for r in csv.DictReader(f)]
    table = pq.read_table(root / "pool/metadata.parquet").to_pydict()
    assert list(zip(table["image_path"], table["caption"])) == rows
    assert len(rows) == manifest["counts"]["pool"]["all"]["images"]
    assert all((root / "pool" / path).is_file() for path, _ in rows)
    assert len({c for _, c in rows}) < len(rows)  # web-like duplicate captions
