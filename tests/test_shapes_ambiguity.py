"""The ambiguity world: the default world's scenes with per-item ambiguity injected and recorded.

The sidecars are checked against the written files, never against a replay of the generator: the
ambiguity world and the default world share their scenes (the ambiguity draws use their own
random streams), so a clear item is byte-identical to its default-world twin and a degraded one
lets its level be measured back from the two files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from xmodal.data.ambiguity import read_sidecar, sidecar_folder
from xmodal.data.shapes import COLOURS, SHAPES, Ambiguity, write_world
from xmodal.data.shapes.ambiguity import (
    CAPTION_LEVELS,
    CONFLICT_LEVELS,
    POOL_CLASS_SHARE,
    TEXT_LEVELS,
    pool_scene,
)
from xmodal.data.shapes.pool import shows, web_concepts
from xmodal.data.shapes.world import SIZES, Out
from xmodal.data.world_manifest import AMBIGUITY_VERSION

CATS = ("dress", "shirt", "toptee")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ambiguity")
    write_world(base / "default", seed=0, size="small")
    # training splits ambiguous too, so that every split's items are measured back below
    write_world(base / "ambiguity", seed=0, size="small", ambiguity={"train": True})
    return base / "default", base / "ambiguity"


def load(path: Path) -> object:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("noisy") / "world"
    write_world(root, seed=0, size="small", ambiguity={"pool_noise": 0.5})
    return root


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(skip):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- the default world, determinism


def test_default_world_has_no_sidecar_and_ambiguity_false_is_the_default(worlds, tmp_path):
    default, _ = worlds
    assert not list(default.rglob("ambiguity.json"))
    assert "ambiguity" not in load(default / "MANIFEST.json")
    write_world(tmp_path / "w", seed=0, size="small", ambiguity=False)
    assert digest(tmp_path / "w") == digest(default)


def test_same_seed_same_bytes_and_the_draws_follow_the_seed(worlds, tmp_path):
    _, amb = worlds
    write_world(tmp_path / "again", seed=0, size="small", ambiguity=Ambiguity(train=True))
    assert digest(tmp_path / "again") == digest(amb)
    draws = {
        seed: [Out(tmp_path, Ambiguity(), seed).recorder("coco").draw(["blur"]) for _ in range(20)]
        for seed in (0, 1)
    }
    assert draws[0] != draws[1]


def test_manifest_records_the_ambiguity(worlds, noisy):
    _, amb = worlds
    record = {"fraction": 0.5, "pool_noise": 0.0, "train": True, "version": AMBIGUITY_VERSION}
    assert load(amb / "MANIFEST.json")["ambiguity"] == record
    noisy_record = {**record, "pool_noise": 0.5, "train": False}
    assert load(noisy / "MANIFEST.json")["ambiguity"] == noisy_record
    assert load(noisy / "pool" / "ambiguity.json")["pool_noise"] == 0.5
    with pytest.raises(ValueError, match="pool_noise"):
        write_world(noisy.parent / "bad", ambiguity={"pool_noise": 1.5})


def _ambiguous_share(items: dict, ids) -> float:
    ids = list(ids)
    assert ids
    return float(np.mean([items[i].level > 0 for i in ids]))


def test_training_splits_stay_clear_unless_asked(worlds, noisy):
    """By default (``noisy`` has ``train=False``) every training item is clear and about half of
    the evaluation items are ambiguous; ``train=True`` (``worlds``) makes both about half."""
    _, amb = worlds
    for world, train in ((amb, True), (noisy, False)):
        cirr = read_sidecar(world / "cirr" / "ambiguity.json")
        coco = read_sidecar(world / "coco" / "ambiguity.json")
        fiq = read_sidecar(world / "fashioniq" / "ambiguity.json")
        split = {
            (s, "cirr"): [i for i in cirr if i.startswith("train-") == (s == "train")]
            for s in ("train", "eval")
        }
        karpathy = load(world / "coco" / "dataset_coco.json")["images"]
        for s, names in (("train", ("train", "restval")), ("eval", ("val", "test"))):
            images = [
                f"{im['filepath']}/{im['filename']}" for im in karpathy if im["split"] in names
            ]
            split[s, "coco"] = [i for i in coco if i.split("#")[0] in set(images)]
            split[s, "fashioniq"] = [
                f"{t['candidate']}>{t['target']}"
                for cat in CATS
                for t in load(
                    world
                    / f"fashioniq/captions/cap.{cat}.{'train' if s == 'train' else 'val'}.json"
                )
            ]
        for dataset, items in (("cirr", cirr), ("coco", coco), ("fashioniq", fiq)):
            assert 0.25 < _ambiguous_share(items, split["eval", dataset]) < 0.75, dataset
            share = _ambiguous_share(items, split["train", dataset])
            assert (0.25 < share < 0.75) if train else share == 0.0, (dataset, train, share)


def test_every_dataset_has_a_sidecar_with_levels_in_range(worlds):
    _, amb = worlds
    folders = {str(p.parent.relative_to(amb)) for p in amb.rglob("ambiguity.json")}
    expected = {"coco", "flickr30k", "fashioniq", "cirr", "pool"}
    expected |= {str(sidecar_folder("imagenet", "", v)) for v in ("imagenet", "imagenet_a")}
    expected |= {str(sidecar_folder("coop", "", "oxford_pets"))}
    assert expected <= folders
    for path in amb.rglob("ambiguity.json"):
        items = read_sidecar(path)
        assert items and all(0.0 <= it.level <= 1.0 for it in items.values())
        assert all((it.level == 0) == (it.kind == "none") for it in items.values())
        if path.parent.name != "pool":  # about half of every dataset is ambiguous
            share = np.mean([it.level > 0 for it in items.values()])
            assert 0.25 < share < 0.75, (path, share)


# ---------------------------------------------------------------- images: measured back


def _fit(reference: np.ndarray, observed: np.ndarray, make, grid: np.ndarray) -> float:
    """The grid level whose degradation of ``reference`` is closest to ``observed``."""
    errors = [np.abs(make(level) - observed).mean() for level in grid]
    return float(grid[int(np.argmin(errors))])


def check_image(default_file: Path, amb_file: Path, level: float, kind: str) -> None:
    """A clear image is its default-world twin byte for byte; a degraded one differs, and its
    blur radius / contrast factor / occluded area, fitted from the two files, gives its level."""
    if kind == "none":
        assert amb_file.read_bytes() == default_file.read_bytes(), amb_file
        return
    ref, got = pixels(default_file), pixels(amb_file)
    assert np.abs(ref - got).mean() > 0, (amb_file, kind, level)
    grid = np.round(np.arange(0.1, 1.001, 0.05), 2)
    img = Image.open(default_file).convert("RGB")
    if kind == "blur":
        make = lambda x: np.asarray(img.filter(ImageFilter.GaussianBlur(float(3 * x))), float)  # noqa: E731
        assert abs(_fit(ref, got, make, grid) - level) <= 0.1, (amb_file, level)
    elif kind == "contrast":
        make = lambda x: np.asarray(ImageEnhance.Contrast(img).enhance(float(1 - 0.9 * x)), float)  # noqa: E731
        assert abs(_fit(ref, got, make, grid) - level) <= 0.1, (amb_file, level)
    elif kind == "occlusion":  # grey squares of side level x object width over every object
        grey = (np.abs(got - 128).max(-1) < 12) & (np.abs(ref - 128).max(-1) >= 12)
        assert grey.sum() > 0 or level < 0.3  # a low level hides less than a pixel
    else:
        assert kind == "clutter"


def test_coco_and_flickr_images_match_their_sidecar(worlds):
    default, amb = worlds
    for name in ("coco", "flickr30k"):
        items = read_sidecar(amb / name / "ambiguity.json")
        images = {k: v for k, v in items.items() if "#" not in k}
        assert {v.kind for v in images.values()} == {
            "none",
            "blur",
            "occlusion",
            "contrast",
            "clutter",
        }
        for image_id, item in images.items():
            check_image(default / name / image_id, amb / name / image_id, item.level, item.kind)
        occluded = [(k, v.level) for k, v in images.items() if v.kind == "occlusion"]
        area = [(np.abs(pixels(amb / name / k) - 128).max(-1) < 12).mean() for k, _ in occluded]
        assert np.corrcoef([lv for _, lv in occluded], area)[0, 1] > 0.5  # more level, more grey


def test_classification_images_match_their_sidecar(worlds):
    default, amb = worlds
    checked = 0
    for family, dataset in (("imagenet", "imagenet"), ("imagenet", "imagenet_a"), ("coop", "dtd")):
        folder = sidecar_folder(family, amb, dataset)
        twin = sidecar_folder(family, default, dataset)
        for image_id, item in read_sidecar(folder / "ambiguity.json").items():
            check_image(twin / image_id, folder / image_id, item.level, item.kind)
            checked += 1
    assert checked > 100


# ---------------------------------------------------------------- captions: the level from the text


def caption_level(text: str) -> float:
    """How much a caption of the ambiguity world says, read from its words alone."""
    w = words(text)
    colours = [x for x in w if x in COLOURS]
    shapes = [x for x in w if x in SHAPES or x[:-1] in SHAPES]
    if {"large", "big", "small", "little"} & set(w):
        return 0.0  # clear captions give every object's size
    pairs = sum(1 for a, b in zip(w, w[1:]) if a in COLOURS and b in SHAPES)
    if pairs and pairs == len(colours) == len(shapes):
        return 0.25
    if colours or shapes:
        return 0.5
    return 0.75 if set(w) & {"one", "two", "three"} else 1.0


def test_captions_match_their_sidecar(worlds):
    _, amb = worlds
    items = read_sidecar(amb / "coco" / "ambiguity.json")
    data = load(amb / "coco" / "dataset_coco.json")
    seen = set()
    for im in data["images"]:
        image_id = f"{im['filepath']}/{im['filename']}"
        n_objects = None
        for j, sentence in enumerate(im["sentences"]):
            item = items[f"{image_id}#{j}"]
            assert caption_level(sentence["raw"]) == item.level, (sentence["raw"], item)
            assert item.kind == ("none" if item.level == 0 else "vague")
            if item.level == 0.75:
                n_objects = words(sentence["raw"])[0]
            seen.add(item.level)
        if n_objects is not None:  # the count agrees with the clear captions of the image
            clear = [
                s["raw"]
                for j, s in enumerate(im["sentences"])
                if items[f"{image_id}#{j}"].level == 0
            ]
            for text in clear:
                n = sum(1 for x in words(text) if x in SHAPES)
                assert ["zero", "one", "two", "three"][n] == n_objects
    assert seen == {0.0, *CAPTION_LEVELS}


# ---------------------------------------------------------------- composed retrieval texts


def test_fashioniq_queries_match_their_sidecar(worlds):
    default, amb = worlds
    items = read_sidecar(amb / "fashioniq" / "ambiguity.json")
    kinds = set()
    for cat in CATS:
        for split in ("train", "val"):
            clear = load(default / f"fashioniq/captions/cap.{cat}.{split}.json")
            made = load(amb / f"fashioniq/captions/cap.{cat}.{split}.json")
            names = set(load(amb / f"fashioniq/image_splits/split.{cat}.{split}.json"))
            assert len(clear) == len(made)
            for twin, t in zip(clear, made):
                item = items[f"{t['candidate']}>{t['target']}"]
                kinds.add(item.kind)
                assert t["target"] == twin["target"] and t["candidate"] in names
                image_kind = item.kind in ("blur", "occlusion", "contrast", "clutter")
                # a degraded reference is a new copy of the reference image; texts stay exact
                assert (t["candidate"] != twin["candidate"]) == image_kind
                if image_kind:
                    assert t["candidate"].startswith("B01") and t["captions"] == twin["captions"]
                    check_image(
                        default / f"fashioniq/images/{twin['candidate']}.jpg",
                        amb / f"fashioniq/images/{t['candidate']}.jpg",
                        item.level,
                        item.kind,
                    )
                else:
                    check_texts(item.kind, item.level, twin["captions"], t["captions"])
    assert kinds == {"none", "blur", "occlusion", "contrast", "clutter", "vague", "conflict"}


def test_cirr_queries_match_their_sidecar(worlds):
    default, amb = worlds
    items = read_sidecar(amb / "cirr" / "ambiguity.json")
    kinds = set()
    for split in ("train", "val"):
        clear = load(default / f"cirr/cirr/captions/cap.rc2.{split}.json")
        made = load(amb / f"cirr/cirr/captions/cap.rc2.{split}.json")
        for twin, t in zip(clear, made, strict=True):
            assert (t["reference"], t["target_hard"]) == (twin["reference"], twin["target_hard"])
            item = items[f"{t['reference']}>{t['target_hard']}"]
            kinds.add(item.kind)
            check_texts(item.kind, item.level, [twin["caption"]], [t["caption"]])
    assert kinds == {"none", "vague", "conflict"}


VAGUE_WORDS = {
    TEXT_LEVELS[0]: (
        "change the colour of",
        "change the shape of",
        "change the size of",
        "change the pattern of",
        "another",
        "somewhere else",
        "remove a shape",
        "one shape less",
        "an extra",
        "add a",
        "change the background",
    ),
    TEXT_LEVELS[1]: (
        "one of the shapes",
        "a shape",
        "one shape",
        "number of shapes",
        "colours",
        "looks different",
    ),
    TEXT_LEVELS[2]: (
        "something",
        "make it different",
        "change it",
        "is different",
        "not the same",
        "looks different",
    ),
}


def check_texts(kind: str, level: float, exact: list[str], texts: list[str]) -> None:
    """Clear texts are the default world's; vague ones say only what their level allows; a
    conflict names the changed object with another colour (0.5) or as an absent shape (1)."""
    if kind == "none":
        assert texts == exact
        return
    assert texts != exact
    if kind == "vague":
        assert level in TEXT_LEVELS
        for text in texts:
            assert any(p in text for p in VAGUE_WORDS[level]), (level, text)
            if level > 0.5:  # neither colour nor shape is named any more
                assert not {x for x in words(text) if x in COLOURS or x in SHAPES}, text
        return
    assert kind == "conflict" and level in CONFLICT_LEVELS
    said = {x for t in texts for x in words(t)}
    truth = {x for t in exact for x in words(t)}
    new_colours = {x for x in said if x in COLOURS} - truth
    new_shapes = {x for x in said if x in SHAPES} - truth
    assert new_colours, (exact, texts)  # a colour the true change never mentions
    assert bool(new_shapes) == (level == 1.0), (level, exact, texts)


# ---------------------------------------------------------------- the X-MoRe pool


def pool_rows(root: Path) -> dict[str, str]:
    with (root / "pool" / "metadata.csv").open(newline="") as f:
        return {r["image_path"]: r["caption"] for r in csv.DictReader(f)}


def pairs(text: str) -> set[tuple[str, str]]:
    w = words(text)
    return {(a, b) for a, b in zip(w, w[1:]) if a in COLOURS and b in SHAPES} | {
        (a, c) for a, b, c in zip(w, w[1:], w[2:]) if a in COLOURS and c in SHAPES
    }


def test_pool_noise_is_recorded_and_the_clear_captions_stay_true(worlds, noisy):
    _, amb = worlds
    clean = read_sidecar(amb / "pool" / "ambiguity.json")
    items = read_sidecar(noisy / "pool" / "ambiguity.json")
    truth, rows = pool_rows(amb), pool_rows(noisy)
    assert set(items) == set(rows) == set(truth) == set(clean)
    assert {it.kind for it in clean.values()} == {"none"}  # pool_noise 0: every caption true
    noise = [k for k, v in items.items() if v.kind == "noise"]
    assert 0.35 < len(noise) / len(items) < 0.65
    assert all(items[k].level == 1.0 for k in noise)
    for path in items:  # the same images at every noise level: only captions change
        assert (noisy / "pool" / path).read_bytes() == (amb / "pool" / path).read_bytes()
    # a clear caption names the colour-shape pairs of its image (as the noise-free pool does, with
    # every object's size and place); a noisy one those of another image
    assert all(pairs(rows[k]) == pairs(truth[k]) for k in items if k not in noise)
    assert all(re.search(r"(large|big|small|little) ", rows[k]) for k in items)
    assert np.mean([pairs(rows[k]) == pairs(truth[k]) for k in noise]) < 0.2


def test_pool_draws_photos_of_every_class_and_unrelated_scenes():
    import random

    concepts = web_concepts()
    imagenet = {(r["colour"], r["shape"]) for r in concepts[:48]}
    assert len(imagenet) == 48 and len(concepts) == 48 + 59  # ImageNet's and the 10 CoOp sets'
    rng = random.Random(0)
    draws = [pool_scene(rng, concepts) for _ in range(8000)]
    picked = [k for _, k in draws if k >= 0]
    assert abs(len(picked) / len(draws) - POOL_CLASS_SHARE) < 0.02
    assert set(picked) == set(range(len(concepts)))  # every class of every set, new draws
    for scene, k in draws:
        if k >= 0:
            assert shows(scene, concepts[k]), (scene, concepts[k])
    # nuisance: a class's photos vary in place, background, style and (when free) fill
    car = concepts.index({"shape": "square", "colour": "red", "size": "large"})
    cars = [s for s, k in draws if k == car]
    assert len({s.background for s in cars}) > 1 and len({s.style for s in cars}) > 1
    assert len({s.objects[0].pos for s in cars}) > 1 and len({s.objects[0].fill for s in cars}) > 1
    unrelated = [s for s, k in draws if k < 0]
    assert {len(s.objects) for s in unrelated} == {1, 2, 3}
    # the same generator state gives the same pool, another one another
    again = [pool_scene(random.Random(0), concepts) for _ in range(3)]
    other = [pool_scene(random.Random(1), concepts) for _ in range(3)]
    assert again[0] == draws[0] and again != other


def test_pool_size_and_new_images(worlds):
    _, amb = worlds
    rows = pool_rows(amb)
    size = SIZES["small"]
    assert len(rows) == max(size.pool, round(107 * size.pool_per_class / POOL_CLASS_SHARE))
    medium = SIZES["medium"]
    assert medium.pool_per_class * 107 / POOL_CLASS_SHARE > medium.pool  # 128 photos per class
    # the pool's photos are new draws: none is a test image of a classification set
    pool = {(amb / "pool" / p).read_bytes() for p in rows}
    tests = [p for p in amb.rglob("*.jpg") if p.parts[len(amb.parts)] not in ("pool", "coco")]
    assert len(tests) > 500 and not any(p.read_bytes() in pool for p in tests)
    # captions say what the image shows, never a class name of the CoOp sets' own style
    from xmodal.data.coop import DATASETS
    from xmodal.data.shapes.coop import _classes

    names = [c for d in DATASETS for c, _, _ in _classes(d)]
    names = {c.lower() for c in names if "_" in c or any(x.isdigit() for x in c)}
    assert "2012 large red square" in names
    assert not any(n in caption.lower() for caption in rows.values() for n in names)


# ---------------------------------------------------------------- the data option


def test_data_option_writes_the_ambiguity_world_to_its_own_folder(xmodal_env):
    from xmodal.config import compose
    from xmodal.data.datamodule import ensure_shapes_world

    default = compose("eval", ["experiment=uclip/shapes_mcd", "data.shapes_world=small"])
    cfg = compose(
        "eval",
        ["experiment=uclip/shapes_mcd", "data.shapes_world=small", "data.shapes_ambiguity=true"],
    )
    assert cfg.data.shapes_dir == default.data.shapes_dir + "-ambiguity"
    assert cfg.data.root == cfg.data.shapes_dir + "/coco"
    assert cfg.run_dir != default.run_dir
    noisy = compose(
        "eval",
        [
            "experiment=xmore/shapes_coop",
            "data.shapes_ambiguity=true",
            "data.shapes_pool_noise=0.25",
        ],
    )
    assert noisy.evaluator.index.collection == default.data.shapes_dir + "-ambiguity-noise0.25/pool"
    assert noisy.evaluator.index.folder.endswith("shapes-ambiguity-noise0.25_pool")
    default_dir = Path(default.data.shapes_dir)

    def snapshot() -> dict:  # the default world (other tests may have written it): left alone
        if not default_dir.exists():
            return {}
        return {p: p.stat().st_mtime_ns for p in default_dir.rglob("*")}

    before = snapshot()
    ensure_shapes_world(cfg.data, cfg.paths.shapes_dir)
    assert load(Path(cfg.data.shapes_dir) / "MANIFEST.json")["ambiguity"]["pool_noise"] == 0.0
    assert (Path(cfg.data.root) / "ambiguity.json").is_file()
    assert snapshot() == before  # nothing written to the default world
    trained = compose(
        "train",
        [
            "experiment=hug/shapes_cirr",
            "data.shapes_ambiguity=true",
            "data.shapes_ambiguity_train=true",
        ],
    )
    assert trained.data.shapes_dir == default.data.shapes_dir + "-ambiguity-train"
    with pytest.raises(Exception, match="shapes_ambiguity=true"):
        compose("eval", ["experiment=xmore/shapes_coop", "data.shapes_pool_noise=0.25"])
    with pytest.raises(Exception, match="shapes_ambiguity=true"):
        compose("train", ["experiment=hug/shapes_cirr", "data.shapes_ambiguity_train=true"])


def test_a_world_this_xmodal_would_rewrite_makes_its_finished_runs_stale(noisy, tmp_path):
    """The "finished, skipping" path reads the world's manifest (no generator import): a world of
    an older generator, or another ambiguity, is rewritten before the run, so the run is redone."""
    from omegaconf import OmegaConf

    from xmodal.data.world_manifest import outdated_world

    data = OmegaConf.create(
        {
            "shapes_world": "small",
            "shapes_dir": str(noisy),
            "shapes_ambiguity": True,
            "shapes_pool_noise": 0.5,
            "shapes_ambiguity_train": False,
        }
    )
    assert outdated_world(data) is None
    assert outdated_world({**data, "shapes_world": None}) is None  # a real dataset: not checked
    assert "not the one this xmodal writes" in outdated_world({**data, "shapes_pool_noise": 0.25})
    assert outdated_world({**data, "shapes_ambiguity_train": True}) is not None
    older = load(noisy / "MANIFEST.json")
    older["ambiguity"]["version"] -= 1  # written before the web-like pool
    (tmp_path / "MANIFEST.json").write_text(json.dumps(older))
    reason = outdated_world({**data, "shapes_dir": str(tmp_path)})
    assert reason is not None and str(tmp_path) in reason
    assert outdated_world({**data, "shapes_dir": str(tmp_path / "missing")}) is not None


def test_shapes_seed_draws_another_world_into_its_own_folder(xmodal_env, tmp_path):
    """data.shapes_seed=k (k != 0) reads and writes the world of seed k in <shapes_dir>-seed<k>
    (after the ambiguity suffixes), with its own run directories and X-MoRe index; its manifest
    records the seed, and a seed-0 world in its folder would be rewritten (the run is stale)."""
    from xmodal.config import compose
    from xmodal.data.datamodule import ensure_shapes_world
    from xmodal.data.world_manifest import outdated_world

    default = compose("eval", ["experiment=xmore/shapes_coop", "data.shapes_world=small"])
    seeded = compose(
        "eval", ["experiment=xmore/shapes_coop", "data.shapes_world=small", "data.shapes_seed=1"]
    )
    assert seeded.data.shapes_dir == default.data.shapes_dir + "-seed1"
    assert seeded.run_dir != default.run_dir
    assert seeded.evaluator.index.folder.endswith("shapes-seed1_pool")
    both = compose(
        "eval",
        [
            "experiment=xmore/shapes_coop",
            "data.shapes_ambiguity=true",
            "data.shapes_pool_noise=0.5",
            "data.shapes_seed=2",
        ],
    )
    assert both.data.shapes_dir == default.data.shapes_dir + "-ambiguity-noise0.5-seed2"
    for bad in ("-1", "one"):
        with pytest.raises(Exception, match="shapes_seed"):
            compose("eval", ["experiment=xmore/shapes_coop", f"data.shapes_seed={bad}"])

    data = seeded.data.copy()
    data.shapes_dir = str(tmp_path / "seed1")
    ensure_shapes_world(data, None)
    assert load(tmp_path / "seed1" / "MANIFEST.json")["seed"] == 1
    assert outdated_world(data) is None
    write_world(tmp_path / "seed0", seed=0, size="small")
    assert outdated_world({**data, "shapes_dir": str(tmp_path / "seed0")}) is not None
    assert digest(tmp_path / "seed1" / "coco") != digest(tmp_path / "seed0" / "coco")
