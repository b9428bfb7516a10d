"""FashionIQ: three categories, each its own sub-world (a background and a family of two shapes),
written with the loader's own file names (:mod:`xmodal.data.fashioniq`)."""

from __future__ import annotations

import random
import string

from xmodal.data import fashioniq
from xmodal.data.ambiguity import Item, cir_item
from xmodal.data.shapes.ambiguity import CIR_KINDS, IMAGE_KINDS, Recorder, cir_texts
from xmodal.data.shapes.captions import modify
from xmodal.data.shapes.scenes import Scene, random_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize

ROOT = "fashioniq"
_ALNUM = string.ascii_uppercase + string.digits

# Each FashionIQ category is its own sub-world: a background and a family of two shapes.
FASHIONIQ_CATEGORIES: dict[str, tuple[str, tuple[str, str]]] = {
    "dress": ("beige", ("triangle", "diamond")),
    "shirt": ("sky", ("square", "cross")),
    "toptee": ("mint", ("circle", "star")),
}
assert tuple(FASHIONIQ_CATEGORIES) == fashioniq.CATEGORIES  # the loader's categories, in order
_FIQ_FILLS = ("solid", "striped", "dotted")
#: (ambiguity world) a FashionIQ query's reference may be degraded, or its texts vague/conflicting
KINDS = IMAGE_KINDS + CIR_KINDS


def _asin(rng: random.Random, used: set[str], prefix: str = "B00") -> str:
    while True:
        asin = prefix + "".join(rng.choices(_ALNUM, k=7))
        if asin not in used:
            used.add(asin)
            return asin


def _ambiguous(
    rec: Recorder,
    query: tuple[str, str, Scene, Scene],
    captions: list[str],
    swap: bool,
    copies: dict[str, tuple[Scene, Item]],
    copy_names: set[str],
    training: bool,
) -> tuple[str, list[str]]:
    """(Ambiguity world) draw and record a triplet's ambiguity: its reference becomes a degraded
    copy under a new name ("B01..."), or its texts vague or conflicting. Returns the candidate
    and the captions to write; ``training``: the triplet is in the training split."""
    cand, tgt, reference, target = query
    texts = captions[::-1] if swap else captions  # (instruction, relative caption)
    item, texts = cir_texts(rec, reference, target, texts, image=True, training=training)
    if item.kind in IMAGE_KINDS:
        cand = _asin(rec.rng, copy_names, prefix="B01")
        copies[cand] = (reference, item)
    rec.add(ROOT, cir_item(cand, tgt), item, KINDS)
    return cand, (texts[::-1] if swap else texts)


def write_fashioniq(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    used: set[str] = set()
    counts: Counts = {}
    n_images = 0
    rec = out.recorder("fashioniq")  # the ambiguity world's per-query ambiguity (None: default)
    copy_names: set[str] = set()
    for cat, (background, family) in FASHIONIQ_CATEGORIES.items():
        counts[f"fashioniq/{cat}"] = {}
        for split, n in zip(fashioniq.SPLITS, size.fashioniq):
            scenes: dict[str, Scene] = {}
            copies: dict[str, tuple[Scene, Item]] = {}  # degraded references (ambiguity world)
            triplets = []
            for _ in range(n):
                if scenes and rng.random() < 0.3:  # images recur across triplets, as in FIQ
                    cand = rng.choice(list(scenes))
                else:
                    cand = _asin(rng, used)
                    scenes[cand] = random_scene(
                        rng, shapes=family, fills=_FIQ_FILLS, background=background
                    )
                target_scene, captions = modify(scenes[cand], rng, shapes=family, fills=_FIQ_FILLS)
                tgt = _asin(rng, used)
                scenes[tgt] = target_scene
                swap = rng.random() < 0.5
                if swap:
                    captions = captions[::-1]
                if rec is not None:
                    query = (cand, tgt, scenes[cand], target_scene)
                    training = split == "train"
                    cand, captions = _ambiguous(
                        rec, query, captions, swap, copies, copy_names, training
                    )
                triplets.append({"target": tgt, "candidate": cand, "captions": captions})
            for _ in range(max(2, 2 * len(scenes) // 5)):  # split files hold extra images
                scenes[_asin(rng, used)] = random_scene(
                    rng, shapes=family, fills=_FIQ_FILLS, background=background
                )
            names = list(scenes)
            for asin in names:
                ext = "png" if n_images % 20 == 7 else "jpg"  # real mirrors mix extensions
                out.image(f"{ROOT}/images/{asin}.{ext}", scenes[asin])
                n_images += 1
            rng.shuffle(names)
            for asin, (scene, item) in copies.items():  # (ambiguity world) degraded references
                out.image(f"{ROOT}/images/{asin}.jpg", scene, item)
                names.insert(rec.rng.randrange(len(names) + 1), asin)
            out.json(fashioniq.split_path(ROOT, cat, split), names)
            if split == "test":
                written = [{k: v for k, v in t.items() if k != "target"} for t in triplets]
            else:
                written = triplets
            out.json(fashioniq.caption_path(ROOT, cat, split), written)
            stats = {"triplets": len(triplets), "images": len(names)}
            if split != "test":  # the VAL caption-pair files: a ~90% subset of the triplets
                kept = [t for t in triplets if rng.random() < 0.9]
                if len(kept) == len(triplets):
                    kept = kept[:-1]
                lines = [
                    f"{cat}/{t['candidate']}.jpg;{cat}/{t['target']}.jpg;{c}\n"
                    for t in kept
                    for c in t["captions"]
                ]
                out.text(fashioniq.pairs_path(ROOT, cat, split), "".join(lines))
                stats["pairs"] = len(kept)
            counts[f"fashioniq/{cat}"][split] = stats
    return counts
