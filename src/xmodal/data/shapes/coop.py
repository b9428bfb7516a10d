"""The 10 CoOp datasets (split_zhou json, or FGVC-Aircraft's text files), each drawing its classes
from one scene attribute named in its own style, written where the loader's table says
(:data:`xmodal.data.coop.DATASETS`: folder, image dir, split file)."""

from __future__ import annotations

import random
import string
from pathlib import Path

from xmodal.data.coop import DATASETS
from xmodal.data.shapes.ambiguity import classification_image
from xmodal.data.shapes.scenes import COLOURS, SHAPES, class_scene, random_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize

_FLOWERS = ("red", "yellow", "purple", "pink", "orange", "blue")
_TEXTURES = {  # DTD classname -> fill
    "chequered": "chequered",
    "dotted": "dotted",
    "outlined": "outline",
    "plain": "solid",
    "striped": "striped",
}
_PETS = (
    ("red", "circle"),
    ("blue", "circle"),
    ("green", "square"),
    ("yellow", "triangle"),
    ("purple", "star"),
    ("orange", "diamond"),
    ("black", "cross"),
    ("pink", "square"),
)
_CARS = (
    (2012, "red", "large"),
    (2009, "red", "small"),
    (2011, "blue", "large"),
    (2007, "blue", "small"),
    (2010, "black", "large"),
    (2012, "black", "small"),
)
_ACTIONS = (
    ("Shape_At_Bottom", (1, 2)),
    ("Shape_At_Top", (1, 0)),
    ("Shape_In_Centre", (1, 1)),
    ("Shape_On_Left", (0, 1)),
    ("Shape_On_Right", (2, 1)),
)
_FOODS = (
    ("single_circle", 1, "circle"),
    ("single_square", 1, "square"),
    ("three_circles", 3, "circle"),
    ("three_squares", 3, "square"),
    ("two_circles", 2, "circle"),
    ("two_squares", 2, "square"),
)
_SUN = (
    ("beige_background", ""),
    ("grey_background", "indoor"),
    ("lavender_background", ""),
    ("mint_background", ""),
    ("sky_background", "outdoor"),
    ("white_background", ""),
)
_AIRCRAFT = (
    ("Large", "cross"),
    ("Large", "diamond"),
    ("Large", "triangle"),
    ("Small", "cross"),
    ("Small", "diamond"),
    ("Small", "triangle"),
)
_LANDS = (
    ("Desert", "Sand Desert", "sand", ("yellow", "orange", "pink")),
    ("Farmland", "Farm Land", "field", ("yellow", "orange")),
    ("Forest", "Forest", "forest", ("green", "black")),
    ("Industrial", "Industrial Buildings", "city", ("black", "purple")),
    ("SeaLake", "Sea or Lake", "water", ("blue", "purple", "black")),
)
_ONLY = {"distractors": (0, 0)}


def _classes(name: str) -> list[tuple[str, str, dict]]:
    """(classname, name used in the image paths, ``_class_scene`` arguments) per class, in label
    order; each dataset draws its classes from one scene attribute, named in its own style."""
    if name == "oxford_flowers":
        return [(f"{c} star", "", dict(shape="star", colour=c, count=(1, 2))) for c in _FLOWERS]
    if name == "dtd":
        return [
            (cls, cls, dict(fill=fill, size="large", count=(2, 3), **_ONLY))
            for cls, fill in _TEXTURES.items()
        ]
    if name == "oxford_pets":  # file names capitalise some breeds, classnames never do
        return [
            (
                f"{c}_{s}",
                f"{c}_{s}".capitalize() if i % 2 == 0 else f"{c}_{s}",
                dict(colour=c, shape=s, size="large"),
            )
            for i, (c, s) in enumerate(_PETS)
        ]
    if name == "stanford_cars":
        return [
            (
                f"{year} {z.capitalize()} {c.capitalize()} Square",
                "",
                dict(shape="square", colour=c, size=z),
            )
            for year, c, z in _CARS
        ]
    if name == "ucf101":
        return [(cls, cls, dict(pos=pos, **_ONLY)) for cls, pos in _ACTIONS]
    if name == "caltech101":  # one plural folder, like Caltech's airplanes -> airplane
        return [
            (s, "stars" if s == "star" else s, dict(shape=s, size="large")) for s in sorted(SHAPES)
        ]
    if name == "food101":
        return [(cls, cls, dict(shape=s, count=(n, n), **_ONLY)) for cls, n, s in _FOODS]
    if name == "sun397":  # path x/name[/sub] -> classname "sub name"
        return [
            (
                f"{sub} {cls}".strip(),
                f"{cls[0]}/{cls}" + (f"/{sub}" if sub else ""),
                dict(backgrounds=(cls.split("_")[0],), count=(1, 3), **_ONLY),
            )
            for cls, sub in _SUN
        ]
    if name == "fgvc_aircraft":
        return [
            (
                f"{z} {s.capitalize()}",
                "",
                dict(shape=s, size=z.lower(), backgrounds=("sky",), **_ONLY),
            )
            for z, s in _AIRCRAFT
        ]
    if name == "eurosat":  # satellite tiles: a terrain colour with small scattered shapes
        return [
            (
                cls,
                path,
                dict(
                    backgrounds=(bg,),
                    size="small",
                    count=(2, 5),
                    **_ONLY,
                    colours=[c for c in COLOURS if c not in hidden],
                ),
            )
            for path, cls, bg, hidden in _LANDS
        ]
    raise ValueError(f"unknown CoOp dataset {name!r}")


def _relpath(name: str, path: str, k: int, n: int, part: str, rng: random.Random) -> str:
    """The relpath of the ``k``-th image of a class (the ``n``-th of its dataset), named as in
    the real dataset."""
    if name == "oxford_flowers":
        return f"image_{n:05d}.jpg"
    if name == "oxford_pets":
        return f"{path}_{k}.jpg"
    if name == "stanford_cars":
        return f"cars_{'test' if part == 'test' else 'train'}/{n:05d}.jpg"
    if name == "ucf101":
        clip = f"g{(k - 1) // 3 + 1:02d}_c{(k - 1) % 3 + 1:02d}"
        return f"{path}/v_{path.replace('_', '')}_{clip}.jpg"
    if name in ("dtd", "caltech101"):
        return f"{path}/{path if name == 'dtd' else 'image'}_{k:04d}.jpg"
    if name == "food101":
        return f"{path}/{n * 1000 + rng.randrange(1000)}.jpg"
    if name == "sun397":
        return f"{path}/sun_{''.join(rng.choices(string.ascii_lowercase, k=16))}.jpg"
    if name == "fgvc_aircraft":
        return f"{1_000_000 + n * 1000 + rng.randrange(1000)}.jpg"
    return f"{path}/{path}_{k}.jpg"  # eurosat


def write_coop(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    counts: Counts = {}
    rec = out.recorder("coop")
    for name, spec in DATASETS.items():
        folder, classes = spec.folder, _classes(name)
        base = f"{folder}/{spec.image_dir}/" if spec.image_dir else f"{folder}/"
        split: dict[str, list] = {"train": [], "val": [], "test": []}
        n = 0
        for label, (classname, path, recipe) in enumerate(classes):
            k = 0
            for part, per_class in zip(split, size.coop):
                for _ in range(per_class):
                    k, n = k + 1, n + 1
                    rel = _relpath(name, path, k, n, part, rng)
                    scene = class_scene(rng, **recipe)
                    item = None
                    if rec is not None:  # (ambiguity world) a degraded image
                        rel_id = (base + rel)[len(folder) + 1 :]
                        item = classification_image(rec, folder, rel_id, part == "train")
                    out.image(base + rel, scene, item)
                    split[part].append([rel, label, classname])
        if name == "fgvc_aircraft":  # variants.txt + images_variant_<part>.txt, no json
            out.text(f"{folder}/variants.txt", "".join(f"{c}\n" for c, _, _ in classes))
            for part, items in split.items():
                lines = "".join(f"{Path(rel).stem} {cls}\n" for rel, _, cls in items)
                out.text(f"{folder}/{spec.split_file.replace('_test.', f'_{part}.')}", lines)
        else:
            out.json(f"{folder}/{spec.split_file}", split)
        if name == "oxford_flowers":
            names = {str(label + 1): c for label, (c, _, _) in enumerate(classes)}
            out.json(f"{folder}/cat_to_name.json", names)
        if name == "caltech101":  # an unlabelled folder that no split lists
            for k in range(2):
                scene = random_scene(rng, style="noisy")
                out.image(f"{base}BACKGROUND_Google/image_{k + 1:04d}.jpg", scene)
        counts[folder] = {p: {"classes": len(classes), "images": len(v)} for p, v in split.items()}
    return counts
