"""ImageNet and its variants (A, R, V2, Sketch) as class folders: 48 classes "<colour> <shape>",
written where the loader looks (:data:`xmodal.data.imagenet.VARIANTS`, ``CLASSNAMES``)."""

from __future__ import annotations

import random

from xmodal.data.imagenet import CLASSNAMES, VARIANTS
from xmodal.data.shapes.ambiguity import classification_image
from xmodal.data.shapes.scenes import COLOURS, SHAPES, Scene, class_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize

#: (colour, shape) of every class ("red circle", ... 48 classes), before the labels are shuffled
CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for s in SHAPES for c in COLOURS)


def write_imagenet(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    classes = list(CLASSES)
    rng.shuffle(classes)
    n = len(classes)
    wnids = sorted(f"n{v:08d}" for v in rng.sample(range(1_000_000, 15_000_000), n))
    names = [f"{c} {s}" for c, s in classes]
    out.text(CLASSNAMES, "".join(f"{w} {m}\n" for w, m in zip(wnids, names)))
    per_val, per_variant = size.imagenet
    folder = {name: variant.folder for name, variant in VARIANTS.items()}

    def scene(label: int, style: str = "plain", distractors: tuple[int, int] = (0, 1)) -> Scene:
        colour, shape = classes[label]
        return class_scene(rng, shape=shape, colour=colour, style=style, distractors=distractors)

    rec = out.recorder("imagenet")  # (ambiguity world) degraded test images, per variant folder

    def image(rel: str, scene: Scene) -> None:
        variant = next(f for f in folder.values() if rel.startswith(f + "/"))
        item = None if rec is None else classification_image(rec, variant, rel[len(variant) + 1 :])
        out.image(rel, scene, item)

    idx = 0
    for label, wnid in enumerate(wnids):
        for _ in range(per_val):
            idx += 1
            image(f"{folder['imagenet']}/{wnid}/ILSVRC2012_val_{idx:08d}.JPEG", scene(label))
    # ImageNet-A and -R: two different, overlapping strict subsets (like the 200 of 1000)
    perm = rng.sample(range(n), n)
    subset_a = sorted(perm[: n // 3])
    subset_r = sorted(perm[n // 3 - n // 8 : 2 * n // 3 - n // 8])
    for label in subset_a:
        for k in range(per_variant):
            rel = f"{folder['imagenet_a']}/{wnids[label]}/{label:03d}_{k:04d}.jpg"
            image(rel, scene(label, "noisy", (1, 2)))
    out.text(f"{folder['imagenet_a']}/README.txt", "Synthetic ImageNet-A (shapes world).\n")
    for label in subset_r:
        for k in range(per_variant):
            rel = f"{folder['imagenet_r']}/{wnids[label]}/cartoon_{k}.jpg"
            image(rel, scene(label, "cartoon", (0, 0)))
    v2 = folder["imagenet_v2"]
    for label in range(n):  # V2 folders are the integer labels in sorted-wnid order
        for k in range(per_variant):
            image(f"{v2}/{label}/{rng.getrandbits(160):040x}.jpeg", scene(label))
            rel = f"{folder['imagenet_sketch']}/{wnids[label]}/sketch_{k}.JPEG"
            image(rel, scene(label, "sketch"))
    every = {"classes": n, "images": n * per_variant}
    return {
        "imagenet": {"test": {"classes": n, "images": n * per_val}},
        "imagenet-a": {"test": {"classes": len(subset_a), "images": len(subset_a) * per_variant}},
        "imagenet-r": {"test": {"classes": len(subset_r), "images": len(subset_r) * per_variant}},
        "imagenetv2": {"test": dict(every)},
        "imagenet-sketch": {"test": dict(every)},
    }
