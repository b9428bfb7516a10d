"""The external image-caption pool (X-MoRe's index collection): images and a metadata table."""

from __future__ import annotations

import csv
import random
from dataclasses import replace

from xmodal.data.shapes.captions import describe
from xmodal.data.shapes.scenes import FILLS, PALE_BACKGROUNDS, STYLES, Scene, jitter, random_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize


def write_pool(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    rows: list[tuple[str, str]] = []
    seen: list[tuple[Scene, str]] = []
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
