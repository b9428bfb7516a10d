"""The external image-caption pool (X-MoRe's index collection): images and a metadata table."""

from __future__ import annotations

import csv
import random
from dataclasses import replace

from xmodal.data.coop import DATASETS
from xmodal.data.shapes import ambiguity, coop, imagenet
from xmodal.data.shapes.ambiguity import POOL_CLASS_SHARE
from xmodal.data.shapes.captions import describe
from xmodal.data.shapes.scenes import FILLS, PALE_BACKGROUNDS, STYLES, Scene, jitter, random_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize


def write_pool(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    rows: list[tuple[str, str]] = []
    seen: list[tuple[Scene, str]] = []
    rec = out.recorder("pool")
    if rec is not None:  # the ambiguity world: the sets' classes among unrelated scenes
        concepts = web_concepts()
        count = max(size.pool, round(len(concepts) * size.pool_per_class / POOL_CLASS_SHARE))
        return _write_metadata(out, ambiguity.write_pool(out, rec, count, concepts))
    for i in range(size.pool):
        if i % 20 == 11:  # web data repeats captions: the same caption on a near-copy image
            scene, caption = rng.choice(seen)
            objects = tuple(replace(o, offset=jitter(rng)) for o in scene.objects)
            scene = replace(scene, objects=objects, seed=rng.randrange(2**31))
        else:
            style = rng.choices(STYLES, weights=(14, 2, 2, 2))[0]
            fills = FILLS if rng.random() < 0.3 else ("solid",)
            scene = random_scene(
                rng, fills=fills, background=rng.choice(PALE_BACKGROUNDS), style=style
            )
            caption = describe(scene, rng)
        seen.append((scene, caption))
        rel = f"images/{i:06d}.jpg"
        out.image(f"pool/{rel}", scene)
        rows.append((rel, caption))
    return _write_metadata(out, rows)


def web_concepts() -> list[dict]:
    """The class recipes (:func:`class_scene` arguments) of every classification set of the world,
    ImageNet's and the CoOp sets': what the ambiguity world's pool holds photos of, as a web-scale
    index (LAION, CC) holds photos of every ImageNet and CoOp class."""
    concepts = [dict(shape=s, colour=c) for c, s in imagenet.CLASSES]
    for name in DATASETS:
        concepts += [dict(recipe) for _, _, recipe in coop._classes(name)]
    return concepts


def shows(scene: Scene, recipe: dict) -> bool:
    """Whether ``scene`` is a photo of the class ``recipe`` (:func:`class_scene` arguments): its
    background is one the recipe allows, and enough objects hold every attribute the recipe fixes
    (all of them, in place of the count, when the recipe allows no distractor)."""
    if scene.background not in recipe.get("backgrounds", (scene.background,)):
        return False
    fixed = [k for k in ("shape", "colour", "size", "fill", "pos") if k in recipe]
    main = [o for o in scene.objects if all(getattr(o, k) == recipe[k] for k in fixed)]
    low, high = recipe.get("count", (1, 1))
    if recipe.get("distractors") == (0, 0):
        return len(main) == len(scene.objects) and low <= len(main) <= high
    return low <= len(main) <= high


def _write_metadata(out: Out, rows: list[tuple[str, str]]) -> Counts:
    """``pool/metadata.{csv,parquet}`` (columns image_path, caption) and the pool's counts."""
    with out.path("pool/metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_path", "caption"])
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image_path": [r[0] for r in rows], "caption": [r[1] for r in rows]})
    pq.write_table(table, out.path("pool/metadata.parquet"))
    unique = len({c for _, c in rows})
    return {"pool": {"all": {"images": len(rows), "unique_captions": unique}}}
