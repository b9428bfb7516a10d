"""CIRR: image sets of six (a base scene and five single changes of it), triplets within a set,
written with the loader's own file names (:mod:`xmodal.data.cirr`); test1 withholds the labels."""

from __future__ import annotations

import random

from xmodal.data import cirr
from xmodal.data.ambiguity import cir_item
from xmodal.data.shapes.ambiguity import CIR_KINDS, cir_texts
from xmodal.data.shapes.captions import describe_change, modify
from xmodal.data.shapes.scenes import PALE_BACKGROUNDS, Scene, random_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize

ROOT = "cirr"


def _scene_key(scene: Scene) -> tuple:
    return (scene.background, tuple(sorted(o.key() for o in scene.objects)))


def write_cirr(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    counts: dict[str, dict[str, int]] = {}
    pairid = 0
    rec = out.recorder("cirr")
    set_id = rng.randrange(100)
    layout = zip(cirr.SPLITS, ("train", "dev", "test1"), (3, 2, 2))  # name prefix, pairs/set
    for (split, prefix, per_set), n_sets in zip(layout, size.cirr):
        entries, split_map = [], {}
        for s in range(n_sets):
            set_id += 1 + rng.randrange(3)
            base = random_scene(rng, background=rng.choice(PALE_BACKGROUNDS))
            scenes, keys = [base], {_scene_key(base)}
            while len(scenes) < 6:  # members: the base scene and 5 single changes of it
                variant, _ = modify(base, rng, backgrounds=PALE_BACKGROUNDS)
                if _scene_key(variant) not in keys:
                    keys.add(_scene_key(variant))
                    scenes.append(variant)
            members = [f"{prefix}-{set_id}-{j // 2}-img{j % 2}" for j in range(6)]
            perm = rng.sample(range(6), 6)
            name = [members[perm[m]] for m in range(6)]
            for m, scene in enumerate(scenes):
                rel = f"{split if split != 'val' else 'dev'}/{name[m]}.png"
                if split == "train":
                    rel = f"train/{s % 10}/{name[m]}.png"
                out.image(f"{ROOT}/img_raw/{rel}", scene)
                split_map[name[m]] = f"./{rel}"
            pairs = [(0, k) for k in range(1, 6)] + [(k, 0) for k in range(1, 6)]
            for a, b in rng.sample(pairs, per_set):
                caption = describe_change(scenes[a], scenes[b], rng)[0]
                ref, tgt = name[a], name[b]
                if rec is not None:  # (ambiguity world) a vague or conflicting instruction
                    item, texts = cir_texts(
                        rec, scenes[a], scenes[b], [caption], training=split == "train"
                    )
                    caption = texts[0]
                    rec.add(ROOT, cir_item(ref, tgt), item, CIR_KINDS)
                entry = {
                    "pairid": pairid,
                    "reference": ref,
                    "target_hard": tgt,
                    "target_soft": {tgt: 1.0},
                    "caption": caption,
                    "img_set": {
                        "id": set_id,
                        "members": members,
                        "reference_rank": members.index(ref),
                        "target_rank": members.index(tgt),
                    },
                }
                if split == "test1":  # labels withheld
                    del entry["target_hard"], entry["target_soft"], entry["img_set"]["target_rank"]
                entries.append(entry)
                pairid += 1
        out.json(cirr.caption_path(ROOT, split), entries)
        out.json(cirr.split_path(ROOT, split), split_map)
        counts[split] = {"triplets": len(entries), "images": len(split_map), "sets": n_sets}
    return {"cirr": counts}
