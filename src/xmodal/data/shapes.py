"""A deterministic synthetic "shapes world", written to disk in the real dataset formats.

No real dataset can be downloaded in tests, CI or the demo, so this module draws a small world of
coloured shapes and writes it in exactly the on-disk formats of the real datasets (see
``datasets/cir.md``, ``datasets/zeroshot.md`` and ``methods/uclip.md`` §4). The real loaders then
read it unchanged, and a tiny CLIP trained on its captions can learn colour, shape and position.

The world
    A :class:`Scene` is a plain background with 1-3 :class:`SceneObject` s, each with a shape
    (``SHAPES``), a colour (``COLOURS``), a size (small/large), a cell of a 3x3 grid
    (left/centre/right x top/middle/bottom) and a fill pattern. :func:`render` draws it (a pure
    function of the scene), :func:`describe` writes a caption that is true of it, and
    :func:`modify` applies one real change (recolour, reshape, resize, move, refill, add, remove,
    background) and returns two texts that describe that change.

The layout written by :func:`write_world` (paths relative to ``root``)::

    MANIFEST.json                    seed, size, format version, counts per dataset/split
    coco/dataset_coco.json           Karpathy json (train|restval|val|test, 5-7 captions/image)
    coco/{train2014,val2014}/COCO_<folder>_<cocoid:012d>.jpg
    coco/wds/test/{nshards.txt,0.tar,...}   CLIP_benchmark webdataset of the test split
    coco/wds/dataset_type.txt        "retrieval"
    flickr30k/dataset_flickr30k.json Karpathy json (5 captions/image)
    flickr30k/flickr_annotations_30k.csv    nlphuji layout (raw, sentids, split, filename, img_id)
    flickr30k/flickr30k-images/<id>.jpg
    fashioniq/captions/cap.<cat>.<split>.json        test has no "target"
    fashioniq/image_splits/split.<cat>.<split>.json  asins (plus distractors)
    fashioniq/captions_pairs/fashion_iq-<train|val>-cap-<cat>.txt   VAL pairs (~90% subset)
    fashioniq/images/<asin>.jpg|.png                 about 5% are .png
    cirr/cirr/captions/cap.rc2.<train|val|test1>.json
    cirr/cirr/image_splits/split.rc2.<train|val|test1>.json
    cirr/img_raw/{train/<n>,dev,test1}/<name>.png
    imagenet/classnames.txt, imagenet/images/val/<wnid>/*.JPEG    classes = "<colour> <shape>"
    imagenet-adversarial/imagenet-a/<wnid>/      (subset, cluttered "noisy" style)
    imagenet-rendition/imagenet-r/<wnid>/        (another subset, "cartoon" style)
    imagenetv2/imagenetv2-matched-frequency-format-val/<label>/
    imagenet-sketch/images/<wnid>/               ("sketch" style: grey outlines)
    oxford_flowers, dtd, oxford_pets, stanford_cars, ucf101, caltech-101, food-101, sun397,
    fgvc_aircraft, eurosat                       CoOp folders, image dirs and split files
    pool/images/<i>.jpg, pool/metadata.{csv,parquet}   external image-caption pool (X-MoRe)

Everything is drawn with seeded ``random.Random`` generators (one per dataset), so the same seed and
size give byte-identical files. Images are 64x64, JPEG quality 90 (PNG for CIRR).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import random
import re
import shutil
import string
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COOP_DATASETS",
    "FASHIONIQ_CATEGORIES",
    "FILLS",
    "FORMAT_VERSION",
    "IMAGE_SIZE",
    "KINDS",
    "PALE_BACKGROUNDS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "Scene",
    "SceneObject",
    "WorldSize",
    "describe",
    "describe_change",
    "modify",
    "random_scene",
    "render",
    "write_world",
]

FORMAT_VERSION = 1
IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (250, 130, 10),
    "yellow": (238, 204, 22),
    "green": (40, 160, 50),
    "blue": (30, 80, 225),
    "purple": (140, 50, 190),
    "pink": (245, 120, 195),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (228, 228, 228),
    "white": (255, 255, 255),
    "beige": (242, 228, 200),
    "sky": (200, 222, 248),
    "mint": (205, 242, 215),
    "lavender": (228, 215, 245),
    # strong "terrain" backgrounds (EuroSAT-like satellite tiles)
    "water": (40, 95, 170),
    "forest": (35, 100, 45),
    "field": (205, 185, 95),
    "sand": (235, 210, 160),
    "city": (125, 125, 130),
}
PALE_BACKGROUNDS: tuple[str, ...] = ("grey", "white", "beige", "sky", "mint", "lavender")
SIZE_NAMES: tuple[str, ...] = ("small", "large")
FILLS: tuple[str, ...] = ("solid", "outline", "striped", "chequered", "dotted")
STYLES: tuple[str, ...] = ("plain", "sketch", "cartoon", "noisy")
KINDS: tuple[str, ...] = (
    "recolour",
    "reshape",
    "resize",
    "move",
    "refill",
    "add",
    "remove",
    "background",
)
GRID = 3


# --------------------------------------------------------------------------------------------
# Scene model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is (shape, colour, size, fill) and where (grid cell ``pos`` = (col, row)).

    ``offset`` is a small jitter inside the cell in [-1, 1]^2; it is not an attribute the captions
    talk about, so two objects that differ only in offset count as the same object.
    """

    shape: str
    colour: str
    size: str = "large"
    pos: tuple[int, int] = (1, 1)
    fill: str = "solid"
    offset: tuple[float, float] = (0.0, 0.0)

    def key(self) -> tuple[str, str, str, tuple[int, int], str]:
        """The describable attributes (everything but the jitter)."""
        return (self.shape, self.colour, self.size, self.pos, self.fill)


@dataclass(frozen=True)
class Scene:
    """A background with objects in distinct grid cells, drawn in a ``style`` (see ``STYLES``).

    ``seed`` only drives the clutter of the "noisy" style, so rendering stays a pure function.
    """

    objects: tuple[SceneObject, ...]
    background: str = "grey"
    style: str = "plain"
    seed: int = 0


def _jitter(rng: random.Random) -> tuple[float, float]:
    return (round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3))


def random_scene(
    rng: random.Random,
    n_objects: int | None = None,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    sizes: Sequence[str] = SIZE_NAMES,
    fills: Sequence[str] = ("solid",),
    background: str = "grey",
    style: str = "plain",
) -> Scene:
    """Sample a scene of 1-3 objects (or ``n_objects``) in distinct cells.

    No two objects share both colour and shape, so "the red circle" always names one object.
    """
    if n_objects is None:
        n_objects = rng.choices((1, 2, 3), weights=(4, 4, 3))[0]
    cells = rng.sample([(c, r) for r in range(GRID) for c in range(GRID)], n_objects)
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    for pos in cells:
        pairs = [(c, s) for s in shapes for c in colours if (c, s) not in used]
        colour, shape = rng.choice(pairs)
        used.add((colour, shape))
        obj = SceneObject(shape, colour, rng.choice(sizes), pos, rng.choice(fills), _jitter(rng))
        objects.append(obj)
    return Scene(tuple(objects), background, style, rng.randrange(2**31))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_SS = 4  # supersampling factor: draw at 4x and average down for smooth edges
_RADIUS = {"large": 0.42, "small": 0.22}  # object radius as a fraction of the grid cell


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of "radius" ``r`` centred on (cx, cy)."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = (-90, 30, 150)
        return [
            (cx + r * math.cos(math.radians(a)), cy + 0.2 * r + r * math.sin(math.radians(a)))
            for a in angles
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w, h = 0.32 * r, 0.9 * r
        return [
            (cx - w, cy - h),
            (cx + w, cy - h),
            (cx + w, cy - w),
            (cx + h, cy - w),
            (cx + h, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + h),
            (cx - w, cy + h),
            (cx - w, cy + w),
            (cx - h, cy + w),
            (cx - h, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: object = None,
    outline: object = None,
    width: int = 1,
) -> None:
    if shape == "circle":
        e = 0.9 * r
        draw.ellipse((cx - e, cy - e, cx + e, cy + e), fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill, outline=outline, width=width)


@functools.lru_cache(maxsize=16)
def _pattern(fill: str, side: int) -> Image.Image:
    """A full-canvas mask (255 = ink) of the striped / chequered / dotted fill patterns."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    step = 4 * _SS  # pattern period: 4 pixels of the final image
    half = step // 2
    for y in range(0, side, step):
        if fill == "striped":
            draw.rectangle((0, y, side, y + half - 1), fill=255)
            continue
        for x in range(0, side, step):
            if fill == "chequered":
                draw.rectangle((x, y, x + half - 1, y + half - 1), fill=255)
                draw.rectangle((x + half, y + half, x + step - 1, y + step - 1), fill=255)
            elif fill == "dotted":
                draw.ellipse((x + 2, y + 2, x + half + 2, y + half + 2), fill=255)
    return mask


def _noise(scene: Scene, side: int) -> Image.Image:
    """Blocky colour noise plus a few random lines: the cluttered "noisy" background."""
    gen = np.random.default_rng(scene.seed)
    base = np.array(BACKGROUNDS.get(scene.background, BACKGROUNDS["grey"]), dtype=np.int16)
    blocks = np.clip(base + gen.integers(-50, 51, size=(16, 16, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(blocks, "RGB").resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        xy = [float(v) for v in gen.integers(0, side, size=4)]
        colour = tuple(int(v) for v in gen.integers(0, 256, size=3))
        draw.line(xy, fill=colour, width=_SS * 2)
    return img


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (a pure function of the scene)."""
    side = size * _SS
    if scene.style == "noisy":
        img = _noise(scene, side)
    elif scene.style == "sketch":
        img = Image.new("RGB", (side, side), BACKGROUNDS["white"])
    else:
        img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = side / GRID
    for obj in scene.objects:
        frac = _RADIUS[obj.size]
        slack = (0.5 - frac - 0.03) * cell  # jitter that keeps the object inside its cell
        cx = (obj.pos[0] + 0.5) * cell + slack * obj.offset[0]
        cy = (obj.pos[1] + 0.5) * cell + slack * obj.offset[1]
        r = frac * cell
        colour = COLOURS[obj.colour]
        line = max(_SS, round(0.14 * r))
        if scene.style == "sketch":
            _draw_shape(draw, obj.shape, cx, cy, r, outline=(90, 90, 90), width=line)
        elif scene.style == "cartoon":
            _draw_shape(draw, obj.shape, cx, cy, r, fill=colour, outline=(0, 0, 0), width=line)
        elif obj.fill == "solid":
            _draw_shape(draw, obj.shape, cx, cy, r, fill=colour)
        elif obj.fill == "outline":
            _draw_shape(draw, obj.shape, cx, cy, r, outline=colour, width=round(0.28 * r))
        else:
            mask = Image.new("L", (side, side), 0)
            _draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, r, fill=255)
            img.paste(colour, mask=ImageChops.multiply(mask, _pattern(obj.fill, side)))
            _draw_shape(draw, obj.shape, cx, cy, r, outline=colour, width=line)
    return img.resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}
_FILL_WORDS = {
    "solid": "",
    "outline": "outlined",
    "striped": "striped",
    "chequered": "chequered",
    "dotted": "dotted",
}
_POS_AT = {
    (0, 0): ("in the top left corner", "at the top left"),
    (1, 0): ("at the top", "at the top centre"),
    (2, 0): ("in the top right corner", "at the top right"),
    (0, 1): ("on the left", "on the left side"),
    (1, 1): ("in the centre", "in the middle"),
    (2, 1): ("on the right", "on the right side"),
    (0, 2): ("in the bottom left corner", "at the bottom left"),
    (1, 2): ("at the bottom", "at the bottom centre"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}
_POS_TO = {
    (0, 0): "to the top left corner",
    (1, 0): "to the top",
    (2, 0): "to the top right corner",
    (0, 1): "to the left",
    (1, 1): "to the centre",
    (2, 1): "to the right",
    (0, 2): "to the bottom left corner",
    (1, 2): "to the bottom",
    (2, 2): "to the bottom right corner",
}
_PREFIX = {
    "plain": ("", "", "", "a photo of ", "an image of ", "a picture of "),
    "sketch": ("a sketch of ", "a pencil sketch of ", "a grey drawing of "),
    "cartoon": ("a cartoon of ", "a cartoon drawing of ", "a colourful rendition of "),
    "noisy": ("a noisy photo of ", "a cluttered picture of ", "a messy image of "),
}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _noun(obj: SceneObject, style: str, rng: random.Random, size_p: float = 0.5) -> str:
    """'large striped red circle' (no article); sketches show no colour, so name none."""
    words = []
    if rng.random() < size_p:
        words.append(rng.choice(_SIZE_WORDS[obj.size]))
    if style == "plain" and obj.fill != "solid":
        words.append(_FILL_WORDS[obj.fill])
    if style != "sketch":
        words.append(obj.colour)
    words.append(obj.shape)
    return " ".join(words)


def _phrase(obj: SceneObject, style: str, rng: random.Random, pos_p: float = 0.4) -> str:
    text = _article(_noun(obj, style, rng))
    if rng.random() < pos_p:
        text += " " + rng.choice(_POS_AT[obj.pos])
    return text


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` (they are in different cells)."""
    if a.pos[0] != b.pos[0]:
        return "to the left of" if a.pos[0] < b.pos[0] else "to the right of"
    return "above" if a.pos[1] < b.pos[1] else "below"


def describe(scene: Scene, rng: random.Random) -> str:
    """One true caption of ``scene`` in a randomly chosen phrasing.

    Phrasings vary (full list, count, subset, spatial relation, "there is"), and so do optional
    size, position, background, prefix, capitalisation and final period, so that repeated calls give
    several distinct captions of one image, like the 5 human captions of COCO.
    """
    objs = list(scene.objects)
    rng.shuffle(objs)
    n = len(objs)
    style = scene.style
    if n == 0:
        body = "an empty background"
        mode = "list"
    else:
        modes = ["list", "list", "there"] + (["count", "subset", "relation"] if n > 1 else [])
        mode = rng.choice(modes)
        if mode == "list":
            body = _join([_phrase(o, style, rng) for o in objs])
        elif mode == "there":
            body = "there is " + _join([_phrase(o, style, rng) for o in objs])
        elif mode == "count":
            sep = rng.choice((": ", ", "))
            body = f"{_NUMBERS[n]} shapes{sep}" + _join([_phrase(o, style, rng) for o in objs])
        elif mode == "subset":
            k = rng.randint(1, n - 1)
            rest = rng.choice(("", " among other shapes", " with more shapes around"))
            body = _join([_phrase(o, style, rng) for o in objs[:k]]) + rest
        else:
            a, b = objs[0], objs[1]
            body = (
                f"{_article(_noun(a, style, rng))} {_relation(a, b)} "
                f"{_article(_noun(b, style, rng))}"
            )
    if mode != "there":
        body = rng.choice(_PREFIX.get(style, ("",))) + body
    if style != "sketch" and scene.background != "grey" and rng.random() < 0.5:
        body += f" on a {scene.background} background"
    if rng.random() < 0.5:
        body = body[0].upper() + body[1:]
    if rng.random() < 0.3:
        body += "."
    return body


def _distinct_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """``n`` captions of one scene, distinct where the phrasings allow it."""
    out: list[str] = []
    for _ in range(40 * n):
        cap = describe(scene, rng)
        if cap.lower().rstrip(".") not in {c.lower().rstrip(".") for c in out}:
            out.append(cap)
        if len(out) == n:
            return out
    while len(out) < n:
        out.append(describe(scene, rng))
    return out


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# --------------------------------------------------------------------------------------------
# Modifications
# --------------------------------------------------------------------------------------------


def _refer(obj: SceneObject, scene: Scene, rng: random.Random) -> str:
    """The shortest unambiguous name of ``obj`` in ``scene``: 'the circle' or 'the red circle'."""
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1 and rng.random() < 0.5:
        return f"the {obj.shape}"
    same = [o for o in same_shape if o.colour == obj.colour]
    if len(same) == 1:
        return f"the {obj.colour} {obj.shape}"
    return f"the {obj.colour} {obj.shape} {_POS_AT[obj.pos][0]}"


def _change(reference: Scene, target: Scene) -> tuple[str, SceneObject | None, SceneObject | None]:
    """The single change from ``reference`` to ``target``: (kind, old object, new object)."""
    ref_keys = [o.key() for o in reference.objects]
    tgt_keys = [o.key() for o in target.objects]
    gone = [o for o in reference.objects if o.key() not in tgt_keys]
    new = [o for o in target.objects if o.key() not in ref_keys]
    if reference.background != target.background:
        if gone or new:
            raise ValueError("scenes differ in more than one way")
        return "background", None, None
    if not gone and len(new) == 1:
        return "add", None, new[0]
    if len(gone) == 1 and not new:
        return "remove", gone[0], None
    if len(gone) == 1 and len(new) == 1:
        old, now = gone[0], new[0]
        fields = ("colour", "shape", "size", "pos", "fill")
        diff = [f for f in fields if getattr(old, f) != getattr(now, f)]
        if len(diff) == 1:
            kind = {
                "colour": "recolour",
                "shape": "reshape",
                "size": "resize",
                "pos": "move",
                "fill": "refill",
            }[diff[0]]
            return kind, old, now
    raise ValueError("scenes differ in more than one way (or not at all)")


def describe_change(reference: Scene, target: Scene, rng: random.Random) -> list[str]:
    """Two texts describing the single change from ``reference`` to ``target``.

    The first is an instruction (CIRR style: "make the circle green"), the second a relative
    description of the target (FashionIQ style: "has a green circle instead of a red one").
    """
    kind, old, new = _change(reference, target)
    if kind == "background":
        bg, was = target.background, reference.background
        first = rng.choice((f"change the background to {bg}", f"make the background {bg}"))
        second = rng.choice(
            (f"has a {bg} background instead of a {was} one", f"is on a {bg} background")
        )
        return [first, second]
    if kind == "add":
        assert new is not None
        thing = _article(f"{new.colour} {new.shape}")
        full = _article(_noun(new, "plain", rng, size_p=1.0)) + " " + _POS_AT[new.pos][0]
        first = rng.choice((f"add {full}", f"put {full}", f"add {thing}"))
        second = rng.choice((f"has an extra {new.colour} {new.shape}", f"also shows {full}"))
        return [first, second]
    assert old is not None
    ref = _refer(old, reference, rng)
    if kind == "remove":
        first = rng.choice((f"remove {ref}", f"take away {ref}", f"delete {ref}"))
        second = rng.choice(
            (f"without the {old.colour} {old.shape}", f"has no {old.colour} {old.shape}")
        )
        return [first, second]
    assert new is not None
    c, s = old.colour, old.shape
    if kind == "recolour":
        c2 = new.colour
        first = rng.choice((f"make {ref} {c2}", f"change {ref} to {c2}", f"turn {ref} {c2}"))
        second = rng.choice(
            (f"has a {c2} {s} instead of a {c} one", f"the {s} is {c2} instead of {c}")
        )
    elif kind == "reshape":
        s2 = new.shape
        first = rng.choice(
            (f"turn {ref} into a {s2}", f"replace {ref} with a {c} {s2}", f"change {ref} to a {s2}")
        )
        second = rng.choice(
            (f"has a {c} {s2} instead of a {s}", f"shows a {c} {s2} where the {c} {s} was")
        )
    elif kind == "resize":
        if new.size == "large":
            first = rng.choice((f"make {ref} bigger", f"make {ref} larger", f"enlarge {ref}"))
            second = rng.choice((f"the {c} {s} is larger", f"has a bigger {c} {s}"))
        else:
            first = rng.choice((f"make {ref} smaller", f"shrink {ref}"))
            second = rng.choice((f"the {c} {s} is smaller", f"has a smaller {c} {s}"))
    elif kind == "move":
        first = f"move {ref} {_POS_TO[new.pos]}"
        second = rng.choice(
            (
                f"the {c} {s} is {_POS_AT[new.pos][0]} instead of {_POS_AT[old.pos][0]}",
                f"has the {c} {s} {_POS_AT[new.pos][1]}",
            )
        )
    else:  # refill
        w2 = _FILL_WORDS[new.fill] or "solid"
        w1 = _FILL_WORDS[old.fill] or "solid"
        first = rng.choice((f"make {ref} {w2}", f"change {ref} to {w2}"))
        second = f"has a {w2} {c} {s} instead of a {w1} one"
    return [first, second]


def modify(
    scene: Scene,
    rng: random.Random,
    kind: str | None = None,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    fills: Sequence[str] = ("solid",),
    backgrounds: Sequence[str] = (),
    max_objects: int = 3,
) -> tuple[Scene, list[str]]:
    """Apply one real change to ``scene``; return the target and two texts describing the change.

    ``kind`` forces one of ``KINDS``; otherwise a feasible kind is drawn at random. ``shapes``,
    ``colours``, ``fills`` and ``backgrounds`` bound the values a change may introduce (e.g. to keep
    a FashionIQ category inside its shape family); refill and background changes need more than one
    allowed value.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown modification {kind!r}; expected one of {KINDS}")
    objs = list(scene.objects)
    taken = {o.pos for o in objs}
    free = [(c, r) for r in range(GRID) for c in range(GRID) if (c, r) not in taken]
    pairs = {(o.colour, o.shape) for o in objs}

    def options(k: str, o: SceneObject | None) -> list:
        """The values kind ``k`` may give object ``o`` (None: a change of the whole scene)."""
        if o is None:
            if k == "add" and len(objs) < max_objects and free:
                return [(c, s) for s in shapes for c in colours if (c, s) not in pairs]
            if k == "background":
                return [b for b in backgrounds if b != scene.background]
            return []
        if k == "recolour":
            return [c for c in colours if c != o.colour and (c, o.shape) not in pairs]
        if k == "reshape":
            return [s for s in shapes if s != o.shape and (o.colour, s) not in pairs]
        if k == "resize":
            return [z for z in SIZE_NAMES if z != o.size]
        if k == "move":
            return free
        if k == "refill":
            return [f for f in fills if f != o.fill]
        if k == "remove" and len(objs) > 1:
            return [None]
        return []

    feasible: dict[str, list[int | None]] = {}
    for k in KINDS if kind is None else (kind,):
        targets = [None] if k in ("add", "background") else list(range(len(objs)))
        ok = [i for i in targets if options(k, None if i is None else objs[i])]
        if ok:
            feasible[k] = ok
    if not feasible:
        raise ValueError(f"no feasible modification {kind or ''} for this scene")
    k = rng.choice(sorted(feasible, key=KINDS.index))
    i = rng.choice(feasible[k])
    o = None if i is None else objs[i]
    value = rng.choice(options(k, o))
    if k == "background":
        target = replace(scene, background=value)
    elif k == "add":
        colour, shape = value
        pos = rng.choice(free)
        objs.append(
            SceneObject(shape, colour, rng.choice(SIZE_NAMES), pos, rng.choice(fills), _jitter(rng))
        )
        target = replace(scene, objects=tuple(objs))
    elif k == "remove":
        del objs[i]
        target = replace(scene, objects=tuple(objs))
    else:
        attr = {
            "recolour": "colour",
            "reshape": "shape",
            "resize": "size",
            "move": "pos",
            "refill": "fill",
        }[k]
        objs[i] = replace(o, **{attr: value})
        target = replace(scene, objects=tuple(objs))
    return target, describe_change(scene, target, rng)


# --------------------------------------------------------------------------------------------
# Writing the world
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldSize:
    """How much of each dataset a world holds (images, triplets or image sets per split)."""

    coco: tuple[int, int, int, int]  # images: train, restval, val, test
    flickr30k: tuple[int, int, int]  # images: train, val, test
    fashioniq: tuple[int, int, int]  # triplets per category: train, val, test
    cirr: tuple[int, int, int]  # image sets of 6 images: train, val, test1
    imagenet: tuple[int, int]  # images per class: val, each variant
    coop: tuple[int, int, int]  # images per class: train, val, test
    pool: int  # external image-caption pairs
    wds_shards: int = 2


SIZES: dict[str, WorldSize] = {
    "small": WorldSize(
        coco=(40, 10, 20, 30),
        flickr30k=(30, 10, 20),
        fashioniq=(12, 10, 8),
        cirr=(4, 4, 3),
        imagenet=(2, 1),
        coop=(1, 1, 3),
        pool=150,
    ),
    "medium": WorldSize(
        coco=(3600, 400, 250, 250),
        flickr30k=(500, 100, 100),
        fashioniq=(150, 120, 80),
        cirr=(60, 50, 40),
        imagenet=(5, 2),
        coop=(4, 2, 8),
        pool=2000,
        wds_shards=4,
    ),
}

_ALNUM = string.ascii_uppercase + string.digits
_Counts = dict[str, dict[str, dict[str, int]]]


class _Out:
    """Writes files under the (temporary) world root, creating folders on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: set[Path] = set()

    def path(self, rel: str) -> Path:
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        return path

    def image(self, rel: str, scene: Scene) -> bytes:
        """Render ``scene`` to ``rel`` (PNG if it ends in .png, else JPEG quality 90)."""
        buf = io.BytesIO()
        img = render(scene)
        if rel.lower().endswith(".png"):
            img.save(buf, format="PNG")
        else:
            img.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        self.path(rel).write_bytes(data)
        return data

    def json(self, rel: str, obj: object) -> None:
        self.path(rel).write_text(json.dumps(obj), encoding="utf-8")

    def text(self, rel: str, text: str) -> None:
        self.path(rel).write_text(text, encoding="utf-8")


def _shuffled_splits(names: Sequence[str], counts: Sequence[int], rng: random.Random) -> list[str]:
    """One split label per image, interleaved like the real Karpathy files."""
    labels = [name for name, n in zip(names, counts) for _ in range(n)]
    rng.shuffle(labels)
    return labels


def _n_captions(k: int) -> int:
    """COCO-like caption counts: mostly 5, about 10% 6 or 7 (both present in any split >= 30)."""
    return 7 if k % 25 == 7 else 6 if k % 12 == 5 else 5


def _karpathy_entry(imgid: int, first_sentid: int, captions: list[str]) -> dict:
    sentences = [
        {"tokens": _tokens(c), "raw": c, "imgid": imgid, "sentid": first_sentid + j}
        for j, c in enumerate(captions)
    ]
    return {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences}


def _write_wds(out: _Out, rel: str, samples: list[tuple[bytes, list[str]]], shards: int) -> int:
    """A CLIP_benchmark retrieval webdataset split: nshards.txt + <i>.tar of (jpg, txt) samples."""
    shards = max(2, min(shards, len(samples)))
    for s in range(shards):
        lo, hi = s * len(samples) // shards, (s + 1) * len(samples) // shards
        with tarfile.open(out.path(f"{rel}/{s}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(lo, hi):
                data, captions = samples[i]
                for name, payload in (
                    (f"s{i:07d}.jpg", data),
                    (f"s{i:07d}.txt", "\n".join(captions).encode()),
                ):
                    info = tarfile.TarInfo(name)  # mtime 0, uid 0, mode 0644: reproducible
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out.text(f"{rel}/nshards.txt", f"{shards}\n")
    return shards


def _write_coco(out: _Out, rng: random.Random, size: WorldSize) -> _Counts:
    splits = ("train", "restval", "val", "test")
    labels = _shuffled_splits(splits, size.coco, rng)
    cocoids = rng.sample(range(1, 600_000), len(labels))
    seen = dict.fromkeys(splits, 0)
    counts = {s: {"images": 0, "captions": 0} for s in splits}
    images, test = [], []
    sentid = 0
    for imgid, (split, cocoid) in enumerate(zip(labels, cocoids)):
        scene = random_scene(rng, background=rng.choice(PALE_BACKGROUNDS))
        captions = _distinct_captions(scene, rng, _n_captions(seen[split]))
        seen[split] += 1
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        data = out.image(f"coco/{folder}/{filename}", scene)
        entry = {"filepath": folder, "filename": filename, "split": split, "cocoid": cocoid}
        entry.update(_karpathy_entry(imgid, sentid, captions))
        images.append(entry)
        sentid += len(captions)
        counts[split]["images"] += 1
        counts[split]["captions"] += len(captions)
        if split == "test":
            test.append((data, captions))
    out.json("coco/dataset_coco.json", {"images": images, "dataset": "coco"})
    shards = _write_wds(out, "coco/wds/test", test, size.wds_shards)
    out.text("coco/wds/dataset_type.txt", "retrieval\n")
    wds = {"images": len(test), "captions": counts["test"]["captions"], "shards": shards}
    return {"coco": counts, "coco_wds": {"test": wds}}


def _write_flickr30k(out: _Out, rng: random.Random, size: WorldSize) -> _Counts:
    splits = ("train", "val", "test")
    labels = _shuffled_splits(splits, size.flickr30k, rng)
    ids = rng.sample(range(10_000_000, 9_999_999_999), len(labels))
    counts = {s: {"images": 0, "captions": 0} for s in splits}
    images, rows = [], []
    for imgid, (split, fid) in enumerate(zip(labels, ids)):
        scene = random_scene(rng, background=rng.choice(PALE_BACKGROUNDS))
        captions = _distinct_captions(scene, rng, 5)
        filename = f"{fid}.jpg"
        out.image(f"flickr30k/flickr30k-images/{filename}", scene)
        entry = _karpathy_entry(imgid, 5 * imgid, captions)
        entry.update({"split": split, "filename": filename})
        images.append(entry)
        rows.append([json.dumps(captions), json.dumps(entry["sentids"]), split, filename, imgid])
        counts[split]["images"] += 1
        counts[split]["captions"] += 5
    out.json("flickr30k/dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    with out.path("flickr30k/flickr_annotations_30k.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        writer.writerows(rows)
    return {"flickr30k": counts}


# Each FashionIQ category is its own sub-world: a background and a family of two shapes.
FASHIONIQ_CATEGORIES: dict[str, tuple[str, tuple[str, str]]] = {
    "dress": ("beige", ("triangle", "diamond")),
    "shirt": ("sky", ("square", "cross")),
    "toptee": ("mint", ("circle", "star")),
}
_FIQ_FILLS = ("solid", "striped", "dotted")


def _asin(rng: random.Random, used: set[str]) -> str:
    while True:
        asin = "B00" + "".join(rng.choices(_ALNUM, k=7))
        if asin not in used:
            used.add(asin)
            return asin


def _write_fashioniq(out: _Out, rng: random.Random, size: WorldSize) -> _Counts:
    used: set[str] = set()
    counts: _Counts = {}
    n_images = 0
    for cat, (background, family) in FASHIONIQ_CATEGORIES.items():
        counts[f"fashioniq/{cat}"] = {}
        for split, n in zip(("train", "val", "test"), size.fashioniq):
            scenes: dict[str, Scene] = {}
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
                if rng.random() < 0.5:
                    captions = captions[::-1]
                triplets.append({"target": tgt, "candidate": cand, "captions": captions})
            for _ in range(max(2, 2 * len(scenes) // 5)):  # split files hold extra images
                scenes[_asin(rng, used)] = random_scene(
                    rng, shapes=family, fills=_FIQ_FILLS, background=background
                )
            names = list(scenes)
            for asin in names:
                ext = "png" if n_images % 20 == 7 else "jpg"  # real mirrors mix extensions
                out.image(f"fashioniq/images/{asin}.{ext}", scenes[asin])
                n_images += 1
            rng.shuffle(names)
            out.json(f"fashioniq/image_splits/split.{cat}.{split}.json", names)
            if split == "test":
                written = [{k: v for k, v in t.items() if k != "target"} for t in triplets]
            else:
                written = triplets
            out.json(f"fashioniq/captions/cap.{cat}.{split}.json", written)
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
                out.text(
                    f"fashioniq/captions_pairs/fashion_iq-{split}-cap-{cat}.txt", "".join(lines)
                )
                stats["pairs"] = len(kept)
            counts[f"fashioniq/{cat}"][split] = stats
    return counts


def _scene_key(scene: Scene) -> tuple:
    return (scene.background, tuple(sorted(o.key() for o in scene.objects)))


def _write_cirr(out: _Out, rng: random.Random, size: WorldSize) -> _Counts:
    counts: dict[str, dict[str, int]] = {}
    pairid = 0
    set_id = rng.randrange(100)
    layout = (("train", "train", 3), ("val", "dev", 2), ("test1", "test1", 2))
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
                out.image(f"cirr/img_raw/{rel}", scene)
                split_map[name[m]] = f"./{rel}"
            pairs = [(0, k) for k in range(1, 6)] + [(k, 0) for k in range(1, 6)]
            for a, b in rng.sample(pairs, per_set):
                caption = describe_change(scenes[a], scenes[b], rng)[0]
                ref, tgt = name[a], name[b]
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
        out.json(f"cirr/cirr/captions/cap.rc2.{split}.json", entries)
        out.json(f"cirr/cirr/image_splits/split.rc2.{split}.json", split_map)
        counts[split] = {"triplets": len(entries), "images": len(split_map), "sets": n_sets}
    return {"cirr": counts}


def _class_scene(
    rng: random.Random,
    *,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    fill: str = "solid",
    pos: tuple[int, int] | None = None,
    count: tuple[int, int] = (1, 1),
    backgrounds: Sequence[str] = PALE_BACKGROUNDS,
    style: str = "plain",
    distractors: tuple[int, int] = (0, 1),
    colours: Sequence[str] = tuple(COLOURS),
) -> Scene:
    """A scene of a classification dataset: ``count`` main objects carry the class attributes
    given (the others are random); the small distractors never share the class shape or colour,
    so the label stays true."""
    cells = [(c, r) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    if pos is not None:
        cells.remove(pos)
        cells.insert(0, pos)
    n = rng.randint(*count)
    main_colours = rng.sample(list(colours), n) if colour is None else [colour] * n
    objects = []
    for i in range(n):
        obj_shape = shape or rng.choice(SHAPES)
        obj_size = size or rng.choice(SIZE_NAMES)
        objects.append(SceneObject(obj_shape, main_colours[i], obj_size, cells[i], fill))
    for i in range(rng.randint(*distractors)):
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        other_colour = rng.choice([c for c in colours if c != colour])
        objects.append(SceneObject(other_shape, other_colour, "small", cells[n + i]))
    objects = [replace(o, offset=_jitter(rng)) for o in objects]
    return Scene(tuple(objects), rng.choice(backgrounds), style, rng.randrange(2**31))


def _write_imagenet(out: _Out, rng: random.Random, size: WorldSize) -> _Counts:
    classes = [(c, s) for s in SHAPES for c in COLOURS]  # "red circle", ... (48 classes)
    rng.shuffle(classes)
    n = len(classes)
    wnids = sorted(f"n{v:08d}" for v in rng.sample(range(1_000_000, 15_000_000), n))
    names = [f"{c} {s}" for c, s in classes]
    out.text("imagenet/classnames.txt", "".join(f"{w} {m}\n" for w, m in zip(wnids, names)))
    per_val, per_variant = size.imagenet

    def scene(label: int, style: str = "plain", distractors: tuple[int, int] = (0, 1)) -> Scene:
        colour, shape = classes[label]
        return _class_scene(rng, shape=shape, colour=colour, style=style, distractors=distractors)

    idx = 0
    for label, wnid in enumerate(wnids):
        for _ in range(per_val):
            idx += 1
            out.image(f"imagenet/images/val/{wnid}/ILSVRC2012_val_{idx:08d}.JPEG", scene(label))
    # ImageNet-A and -R: two different, overlapping strict subsets (like the 200 of 1000)
    perm = rng.sample(range(n), n)
    subset_a = sorted(perm[: n // 3])
    subset_r = sorted(perm[n // 3 - n // 8 : 2 * n // 3 - n // 8])
    for label in subset_a:
        for k in range(per_variant):
            rel = f"imagenet-adversarial/imagenet-a/{wnids[label]}/{label:03d}_{k:04d}.jpg"
            out.image(rel, scene(label, "noisy", (1, 2)))
    out.text("imagenet-adversarial/imagenet-a/README.txt", "Synthetic ImageNet-A (shapes world).\n")
    for label in subset_r:
        for k in range(per_variant):
            rel = f"imagenet-rendition/imagenet-r/{wnids[label]}/cartoon_{k}.jpg"
            out.image(rel, scene(label, "cartoon", (0, 0)))
    v2 = "imagenetv2/imagenetv2-matched-frequency-format-val"
    for label in range(n):  # V2 folders are the integer labels in sorted-wnid order
        for k in range(per_variant):
            out.image(f"{v2}/{label}/{rng.getrandbits(160):040x}.jpeg", scene(label))
            rel = f"imagenet-sketch/images/{wnids[label]}/sketch_{k}.JPEG"
            out.image(rel, scene(label, "sketch"))
    every = {"classes": n, "images": n * per_variant}
    return {
        "imagenet": {"test": {"classes": n, "images": n * per_val}},
        "imagenet-a": {"test": {"classes": len(subset_a), "images": len(subset_a) * per_variant}},
        "imagenet-r": {"test": {"classes": len(subset_r), "images": len(subset_r) * per_variant}},
        "imagenetv2": {"test": dict(every)},
        "imagenet-sketch": {"test": dict(every)},
    }


# The 10 CoOp datasets: folder -> (image dir, split file), as in datasets/zeroshot.md §2.
# The image dir is joined with the split relpaths ("" = the dataset root, as for Stanford Cars);
# FGVC-Aircraft has no split json but variants.txt and images_variant_<split>.txt.
COOP_DATASETS: dict[str, tuple[str, str | None]] = {
    "oxford_flowers": ("jpg", "split_zhou_OxfordFlowers.json"),
    "dtd": ("images", "split_zhou_DescribableTextures.json"),
    "oxford_pets": ("images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("", "split_zhou_StanfordCars.json"),
    "ucf101": ("UCF-101-midframes", "split_zhou_UCF101.json"),
    "caltech-101": ("101_ObjectCategories", "split_zhou_Caltech101.json"),
    "food-101": ("images", "split_zhou_Food101.json"),
    "sun397": ("SUN397", "split_zhou_SUN397.json"),
    "fgvc_aircraft": ("images", None),
    "eurosat": ("2750", "split_zhou_EuroSAT.json"),
}
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


def _coop_classes(folder: str) -> list[tuple[str, str, dict]]:
    """(classname, name used in the image paths, ``_class_scene`` arguments) per class, in label
    order; each dataset draws its classes from one scene attribute, named in its own style."""
    if folder == "oxford_flowers":
        return [(f"{c} star", "", dict(shape="star", colour=c, count=(1, 2))) for c in _FLOWERS]
    if folder == "dtd":
        return [
            (name, name, dict(fill=fill, size="large", count=(2, 3), **_ONLY))
            for name, fill in _TEXTURES.items()
        ]
    if folder == "oxford_pets":  # file names capitalise some breeds, classnames never do
        return [
            (
                f"{c}_{s}",
                f"{c}_{s}".capitalize() if i % 2 == 0 else f"{c}_{s}",
                dict(colour=c, shape=s, size="large"),
            )
            for i, (c, s) in enumerate(_PETS)
        ]
    if folder == "stanford_cars":
        return [
            (
                f"{year} {z.capitalize()} {c.capitalize()} Square",
                "",
                dict(shape="square", colour=c, size=z),
            )
            for year, c, z in _CARS
        ]
    if folder == "ucf101":
        return [(name, name, dict(pos=pos, **_ONLY)) for name, pos in _ACTIONS]
    if folder == "caltech-101":  # one plural folder, like Caltech's airplanes -> airplane
        return [
            (s, "stars" if s == "star" else s, dict(shape=s, size="large")) for s in sorted(SHAPES)
        ]
    if folder == "food-101":
        return [(name, name, dict(shape=s, count=(n, n), **_ONLY)) for name, n, s in _FOODS]
    if folder == "sun397":  # path x/name[/sub] -> classname "sub name"
        return [
            (
                f"{sub} {name}".strip(),
                f"{name[0]}/{name}" + (f"/{sub}" if sub else ""),
                dict(backgrounds=(name.split("_")[0],), count=(1, 3), **_ONLY),
            )
            for name, sub in _SUN
        ]
    if folder == "fgvc_aircraft":
        return [
            (
                f"{z} {s.capitalize()}",
                "",
                dict(shape=s, size=z.lower(), backgrounds=("sky",), **_ONLY),
            )
            for z, s in _AIRCRAFT
        ]
    if folder == "eurosat":  # satellite tiles: a terrain colour with small scattered shapes
        return [
            (
                name,
                path,
                dict(
                    backgrounds=(bg,),
                    size="small",
                    count=(2, 5),
                    **_ONLY,
                    colours=[c for c in COLOURS if c not in hidden],
                ),
            )
            for path, name, bg, hidden in _LANDS
        ]
    raise ValueError(f"unknown CoOp dataset {folder!r}")


def _coop_relpath(folder: str, path: str, k: int, n: int, part: str, rng: random.Random) -> str:
    """The relpath of the ``k``-th image of a class (the ``n``-th of its dataset), named as in
    the real dataset."""
    if folder == "oxford_flowers":
        return f"image_{n:05d}.jpg"
    if folder == "oxford_pets":
        return f"{path}_{k}.jpg"
    if folder == "stanford_cars":
        return f"cars_{'test' if part == 'test' else 'train'}/{n:05d}.jpg"
    if folder == "ucf101":
        clip = f"g{(k - 1) // 3 + 1:02d}_c{(k - 1) % 3 + 1:02d}"
        return f"{path}/v_{path.replace('_', '')}_{clip}.jpg"
    if folder in ("dtd", "caltech-101"):
        return f"{path}/{path if folder == 'dtd' else 'image'}_{k:04d}.jpg"
    if folder == "food-101":
        return f"{path}/{n * 1000 + rng.randrange(1000)}.jpg"
    if folder == "sun397":
        return f"{path}/sun_{''.join(rng.choices(string.ascii_lowercase, k=16))}.jpg"
    if folder == "fgvc_aircraft":
        return f"{1_000_000 + n * 1000 + rng.randrange(1000)}.jpg"
    return f"{path}/{path}_{k}.jpg"  # eurosat


def _write_coop(out: _Out, rng: random.Random, size: WorldSize) -> _Counts:
    counts: _Counts = {}
    for folder, (image_dir, split_file) in COOP_DATASETS.items():
        classes = _coop_classes(folder)
        base = f"{folder}/{image_dir}/" if image_dir else f"{folder}/"
        split: dict[str, list] = {"train": [], "val": [], "test": []}
        n = 0
        for label, (classname, path, recipe) in enumerate(classes):
            k = 0
            for part, per_class in zip(split, size.coop):
                for _ in range(per_class):
                    k, n = k + 1, n + 1
                    rel = _coop_relpath(folder, path, k, n, part, rng)
                    out.image(base + rel, _class_scene(rng, **recipe))
                    split[part].append([rel, label, classname])
        if split_file is None:  # FGVC-Aircraft
            out.text(f"{folder}/variants.txt", "".join(f"{c}\n" for c, _, _ in classes))
            for part, items in split.items():
                lines = "".join(f"{Path(rel).stem} {name}\n" for rel, _, name in items)
                out.text(f"{folder}/images_variant_{part}.txt", lines)
        else:
            out.json(f"{folder}/{split_file}", split)
        if folder == "oxford_flowers":
            names = {str(label + 1): c for label, (c, _, _) in enumerate(classes)}
            out.json(f"{folder}/cat_to_name.json", names)
        if folder == "caltech-101":  # an unlabelled folder that no split lists
            for k in range(2):
                scene = random_scene(rng, style="noisy")
                out.image(f"{base}BACKGROUND_Google/image_{k + 1:04d}.jpg", scene)
        counts[folder] = {p: {"classes": len(classes), "images": len(v)} for p, v in split.items()}
    return counts


def _write_pool(out: _Out, rng: random.Random, size: WorldSize) -> _Counts:
    rows: list[tuple[str, str]] = []
    seen: list[tuple[Scene, str]] = []
    for i in range(size.pool):
        if i % 20 == 11:  # web data repeats captions: the same caption on a near-copy image
            scene, caption = rng.choice(seen)
            objects = tuple(replace(o, offset=_jitter(rng)) for o in scene.objects)
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


_WRITERS: dict[str, Callable[[_Out, random.Random, WorldSize], _Counts]] = {
    "coco": _write_coco,
    "flickr30k": _write_flickr30k,
    "fashioniq": _write_fashioniq,
    "cirr": _write_cirr,
    "imagenet": _write_imagenet,
    "coop": _write_coop,
    "pool": _write_pool,
}


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _matches(manifest: dict | None, seed: int, size: str) -> bool:
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("seed") == seed
        and manifest.get("size") == size
    )


def write_world(root: str | Path, seed: int = 0, size: str = "small") -> dict:
    """Write the shapes world under ``root`` in every real dataset format; return its manifest.

    Deterministic: the same ``seed`` and ``size`` give byte-identical files. If ``root`` already
    holds this world (same seed, size and format version) it is returned without rewriting. The
    world is written to a temporary sibling folder and renamed into place, so an interrupted write
    never leaves half a world. An existing world of another seed/size is replaced; any other
    non-empty folder is refused.
    """
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; expected one of {sorted(SIZES)}")
    root = Path(root)
    manifest_path = root / "MANIFEST.json"
    old = _read_manifest(manifest_path)
    if _matches(old, seed, size):
        return old  # type: ignore[return-value]
    if root.exists() and old is None and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no shapes world; refusing to write")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        out = _Out(tmp)
        counts: dict = {}
        for name, writer in _WRITERS.items():
            # one generator per dataset: changing one dataset leaves the others' bytes alone
            counts.update(writer(out, random.Random(f"shapes:{seed}:{name}"), SIZES[size]))
        manifest = {
            "name": "xmodal shapes world",
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "size": size,
            "image_size": IMAGE_SIZE,
            "counts": counts,
        }
        out.text("MANIFEST.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _move_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = _read_manifest(manifest_path)
    if not _matches(done, seed, size):  # another process won a race with another world
        raise RuntimeError(f"{root} was replaced concurrently by a different world")
    return done  # type: ignore[return-value]


def _move_into_place(tmp: Path, root: Path) -> None:
    """Rename ``tmp`` to ``root``, replacing an older world (or an empty folder) there."""
    trash = None
    if root.exists():
        if not any(root.iterdir()):
            root.rmdir()
        else:
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, trash / "world")
    try:
        os.replace(tmp, root)
    except OSError:
        if not root.exists():  # not a lost race: nothing to fall back on
            raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
