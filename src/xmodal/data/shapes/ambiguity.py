"""Controlled ambiguity for the shapes world, drawn per item and recorded in ``ambiguity.json``.

``write_world(root, seed, size, ambiguity=True)`` writes the scenes, triplets and classes of the
default world (every draw made here comes from a second generator per dataset, so the writers'
own random streams are untouched), then makes a ``fraction`` of the items ambiguous and records,
for every item, its level in [0, 1] and its kind (:mod:`xmodal.data.ambiguity` lists the item
ids). Clear items (level 0, kind ``none``) are described fully, so the level orders how much of
the item's content can still be read from it:

images: COCO/Flickr30k images, FashionIQ references (a degraded copy of the reference image is
written under a new name and the query points at it), ImageNet and CoOp test images
    blur       Gaussian blur of radius 3 px x level
    occlusion  a grey square over the centre of every object, its side level x the object's width
    contrast   contrast scaled by 1 - 0.9 x level towards the mean grey
    clutter    round(24 x level) random strokes drawn over the image
captions (COCO, Flickr30k): clear ones name every object with size, fill, colour, shape and place
    vague      0.25: colour and shape of every object; 0.5: one of the two per object;
               0.75: the number of objects ("two shapes"); 1: nothing ("some shapes")
composed-retrieval texts (FashionIQ: both texts of a triplet; CIRR: the instruction)
    vague      1/3: the object and the kind of change, not the new value ("change the colour of
               the red circle"); 2/3: only that one shape changes; 1: "change something"
    conflict   the text contradicts the reference (HUG's multi-modal coordination): 0.5 it names
               the changed object with a colour the reference does not give it; 1 it names an
               object the reference does not hold (another colour and shape). Changes without an
               object in the reference (add, background) are made vague instead.
X-MoRe pool (``pool/``): a web index's analogue (:func:`pool_scene`): half of it new photos of
every class of the classification sets (ImageNet's and the CoOp sets' recipes, with the nuisance of
web photos: place, background, distractors, style, fill), half unrelated scenes, each captioned
with every object's size, fill, colour, shape and place (never a class name); with probability
``pool_noise`` a caption is replaced by the caption of a random other pool image
    noise      level 1: the caption belongs to another image
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from xmodal.data.ambiguity import CLEAR, FILE, FORMAT, Item, caption_item
from xmodal.data.shapes.captions import (
    _NUMBERS,
    _PREFIX,
    Claim,
    Mention,
    _article,
    _change,
    _join,
    _named,
    _refer,
    describe_change,
)
from xmodal.data.shapes.rendering import object_box
from xmodal.data.shapes.scenes import (
    COLOURS,
    FILLS,
    PALE_BACKGROUNDS,
    SHAPES,
    STYLES,
    Scene,
    SceneObject,
    class_scene,
    random_scene,
)
from xmodal.data.world_manifest import AMBIGUITY_FRACTION, ambiguity_record

IMAGE_KINDS: tuple[str, ...] = ("blur", "occlusion", "contrast", "clutter")
CAPTION_KINDS: tuple[str, ...] = ("vague",)
CIR_KINDS: tuple[str, ...] = ("vague", "conflict")
POOL_KINDS: tuple[str, ...] = ("noise",)
#: the levels a kind takes: a grid for the discrete kinds, (low, high) for the image degradations
CAPTION_LEVELS = (0.25, 0.5, 0.75, 1.0)
TEXT_LEVELS = (round(1 / 3, 4), round(2 / 3, 4), 1.0)
CONFLICT_LEVELS = (0.5, 1.0)
IMAGE_LEVELS = (0.1, 1.0)
_GREY = (128, 128, 128)


@dataclass(frozen=True)
class Ambiguity:
    """What the ambiguity world injects: ``fraction`` of the items of every dataset get a kind and a
    level > 0; ``pool_noise`` of the X-MoRe pool captions belong to another image. ``train``: the
    training splits get ambiguity too; by default they stay clear, so a model is trained on clean
    data and its uncertainty is asked to flag the ambiguous evaluation queries (trained on
    conflicting pairs labelled as matches, HUG learns to call them coordinated: docs/ambiguity.md).
    """

    fraction: float = AMBIGUITY_FRACTION
    pool_noise: float = 0.0
    train: bool = False

    def __post_init__(self) -> None:
        for name in ("fraction", "pool_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ambiguity {name} must be in [0, 1], got {value}")

    def record(self) -> dict[str, float | bool | int]:
        return ambiguity_record(self.fraction, self.pool_noise, self.train)


def draw_level(rng: random.Random, kind: str) -> float:
    """A level > 0 for an item of ``kind``."""
    if kind in IMAGE_KINDS:
        return round(rng.uniform(*IMAGE_LEVELS), 2)
    if kind == "conflict":
        return rng.choice(CONFLICT_LEVELS)
    if kind == "vague":
        raise ValueError("vague levels depend on what is vague: draw from CAPTION/TEXT_LEVELS")
    return 1.0


class Recorder:
    """Draws the ambiguity of one dataset's items (from its own generator) and records it per
    sidecar folder; :meth:`sidecars` gives the ``ambiguity.json`` files to write."""

    def __init__(self, spec: Ambiguity, rng: random.Random) -> None:
        self.spec, self.rng = spec, rng
        self._items: dict[str, dict[str, dict[str, object]]] = {}
        self._kinds: dict[str, set[str]] = {}

    def clear(self, training: bool) -> bool:
        """Whether the next item is clear: always for a training item (unless ``spec.train``),
        else with probability 1 - fraction."""
        if training and not self.spec.train:
            return True
        return self.rng.random() >= self.spec.fraction

    def draw(
        self, kinds: Sequence[str], levels: Sequence[float] | None = None, training: bool = False
    ) -> Item:
        """Clear (:meth:`clear`), else a kind of ``kinds`` and its level (from ``levels`` when
        given); ``training``: the item belongs to a training split."""
        if self.clear(training):
            return Item(0.0)
        kind = self.rng.choice(list(kinds))
        level = self.rng.choice(list(levels)) if levels else draw_level(self.rng, kind)
        return Item(level, kind)

    def add(self, folder: str, item_id: str, item: Item, kinds: Sequence[str]) -> None:
        """Record ``item`` under ``item_id`` in the sidecar of ``folder`` (world-relative)."""
        items = self._items.setdefault(folder, {})
        if item_id in items:
            raise ValueError(f"duplicate ambiguity item {item_id!r} in {folder}")
        items[item_id] = {"level": item.level, "kind": item.kind}
        self._kinds.setdefault(folder, set()).update(kinds)

    def sidecars(self) -> dict[str, dict]:
        """``world-relative path -> content`` of every ``ambiguity.json`` of this dataset."""
        return {
            f"{folder}/{FILE}": {
                "format": FORMAT,
                "fraction": self.spec.fraction,
                "pool_noise": self.spec.pool_noise,
                "kinds": sorted(self._kinds[folder]),
                "items": items,
            }
            for folder, items in self._items.items()
        }


# -- images --------------------------------------------------------------------------------------


def degrade(img: Image.Image, scene: Scene, item: Item) -> Image.Image:
    """``img`` (the rendering of ``scene``) degraded by ``item.kind`` at ``item.level``; a pure
    function of its arguments (clutter strokes are seeded by the scene's seed)."""
    kind, level = item.kind, item.level
    if kind == CLEAR or level <= 0:
        return img
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=3.0 * level))
    if kind == "contrast":
        return ImageEnhance.Contrast(img).enhance(1.0 - 0.9 * level)
    out = img.copy()
    draw = ImageDraw.Draw(out)
    if kind == "occlusion":
        for obj in scene.objects:
            cx, cy, r = object_box(obj, img.width)
            h = level * r  # half the side: level 1 hides the whole object
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=_GREY)
        return out
    if kind == "clutter":
        rng = random.Random(f"clutter:{scene.seed}")
        side = img.width
        for _ in range(round(24 * level)):
            xy = [rng.uniform(0, side) for _ in range(4)]
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.line(xy, fill=colour, width=rng.choice((1, 2, 3)))
        return out
    raise ValueError(f"unknown image ambiguity {kind!r}; expected one of {IMAGE_KINDS}")


# -- captions ------------------------------------------------------------------------------------


def specific_caption(scene: Scene, rng: random.Random) -> tuple[str, Claim]:
    """A caption naming every object with size, fill, colour, shape and place (and the
    background), and its claim: what a clear caption of the ambiguity world says."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    style = scene.style
    named = [_named(o, style, rng, size_p=1.0, pos_p=1.0) for o in objs]
    body = _join([text for text, _ in named]) if named else "an empty scene"
    body = rng.choice(_PREFIX.get(style, ("",))) + body
    background = None
    if style != "sketch" and scene.background != "grey":
        body += f" on a {scene.background} background"
        background = scene.background
    mentions = tuple(m for _, m in named)
    return body, Claim(style, mentions, None if named else 0, background=background)


def _colour_shape(obj: SceneObject, style: str) -> tuple[str, Mention]:
    if style == "sketch":
        return _article(obj.shape), Mention(obj.shape)
    return _article(f"{obj.colour} {obj.shape}"), Mention(obj.shape, obj.colour)


def _one_attribute(obj: SceneObject, style: str, rng: random.Random) -> tuple[str, Mention]:
    if style != "sketch" and rng.random() < 0.5:
        return f"a {obj.colour} shape", Mention(None, obj.colour)
    return _article(obj.shape), Mention(obj.shape)


def vague_caption(scene: Scene, level: float, rng: random.Random) -> tuple[str, Claim]:
    """A caption that says less the higher ``level`` is (one of :data:`CAPTION_LEVELS`): colour
    and shape of every object (0.25), one of the two per object (0.5), the number of objects
    (0.75), nothing (1); and its claim."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    style = scene.style
    if level <= 0.5 and objs:
        named = [
            _colour_shape(o, style) if level <= 0.25 else _one_attribute(o, style, rng)
            for o in objs
        ]
        return _join([t for t, _ in named]), Claim(style, tuple(m for _, m in named))
    if level <= 0.75:
        n = len(objs)
        return f"{_NUMBERS[n]} shape{'s' if n != 1 else ''}", Claim(style, count=n)
    text = rng.choice(("some shapes", "a picture of shapes", "shapes", "a few shapes"))
    return text, Claim(style)


def retrieval_item(
    rec: Recorder,
    folder: str,
    image_id: str,
    scene: Scene,
    n_captions: int,
    training: bool = False,
) -> tuple[Item, list[tuple[str, Claim]]]:
    """Draw and record the ambiguity of an image-text item (COCO, Flickr30k): the image's
    degradation and its ``n_captions`` captions with their claims (clear ones fully specific,
    others vague); ``training``: the item is in a training split."""
    image = rec.draw(IMAGE_KINDS, training=training)
    rec.add(folder, image_id, image, IMAGE_KINDS)
    captions = []
    for j in range(n_captions):
        item = rec.draw(CAPTION_KINDS, CAPTION_LEVELS, training=training)
        rec.add(folder, caption_item(image_id, j), item, CAPTION_KINDS)
        if item.kind == CLEAR:
            captions.append(specific_caption(scene, rec.rng))
        else:
            captions.append(vague_caption(scene, item.level, rec.rng))
    return image, captions


def classification_image(rec: Recorder, folder: str, image_id: str, training: bool = False) -> Item:
    """Draw and record the degradation of one classification image (``training``: of a training
    split)."""
    item = rec.draw(IMAGE_KINDS, training=training)
    rec.add(folder, image_id, item, IMAGE_KINDS)
    return item


# -- composed-retrieval texts ----------------------------------------------------------------------

_VAGUE_OBJECT = {  # kind -> (instruction, relative caption) about the object, value left out
    "recolour": ("change the colour of {ref}", "the {c} {s} has another colour"),
    "reshape": ("change the shape of {ref}", "has another shape instead of the {c} {s}"),
    "resize": ("change the size of {ref}", "the {c} {s} has another size"),
    "move": ("move {ref} somewhere else", "the {c} {s} is somewhere else"),
    "refill": ("change the pattern of {ref}", "the {c} {s} has another pattern"),
    "remove": ("remove a shape", "has one shape less"),
    "add": ("add a {s2}", "has an extra {s2}"),
    "background": ("change the background", "has another background"),
}


def vague_change(reference: Scene, target: Scene, level: float, rng: random.Random) -> list[str]:
    """Two texts (instruction, relative caption) of the change from ``reference`` to ``target``
    that say less the higher ``level`` is (one of :data:`TEXT_LEVELS`)."""
    kind, old, new = _change(reference, target)
    if level < 0.5:
        first, second = _VAGUE_OBJECT[kind]
        values = {"s2": new.shape if new is not None else "shape"}
        if old is not None:
            values.update(ref=_refer(old, reference, rng), c=old.colour, s=old.shape)
        return [first.format(**values), second.format(**values)]
    if level < 1.0:
        if kind in ("add", "remove"):
            return ["change the number of shapes", "has a different number of shapes"]
        if kind == "background":
            return ["change the colours", "looks different"]
        return [
            rng.choice(("change one of the shapes", "change a shape")),
            rng.choice(("one shape is different", "has one shape changed")),
        ]
    return [
        rng.choice(("change something", "make it different", "change it")),
        rng.choice(("is different", "is not the same", "looks different")),
    ]


def conflict_change(
    reference: Scene, target: Scene, level: float, rng: random.Random
) -> list[str] | None:
    """Two texts of the change from ``reference`` to ``target`` that name the changed object
    wrongly: with another colour (``level`` 0.5) or as an object the reference does not hold
    (1.0). None when the change has no object in the reference (add, background)."""
    kind, old, new = _change(reference, target)
    if old is None:
        return None
    pairs = {(o.colour, o.shape) for o in reference.objects + target.objects}
    shapes_in = {o.shape for o in reference.objects}
    if level >= 1.0:
        absent = [s for s in SHAPES if s not in shapes_in and (new is None or s != new.shape)]
        shapes = absent or [s for s in SHAPES if s != old.shape and (new is None or s != new.shape)]
    else:
        shapes = [old.shape]
    options = [
        (c, s)
        for s in shapes
        for c in COLOURS
        if c != old.colour and (c, s) not in pairs and (new is None or c != new.colour)
    ]
    if not options:
        return None
    colour, shape = rng.choice(options)
    fake_old = replace(old, colour=colour, shape=shape)
    fake_ref = replace(
        reference, objects=tuple(fake_old if o == old else o for o in reference.objects)
    )
    fake_tgt = target
    if new is not None:  # the change itself stays the same: only the object's name is wrong
        fake_new = new if kind == "recolour" else replace(new, colour=colour)
        if kind != "reshape":
            fake_new = replace(fake_new, shape=shape)
        fake_tgt = replace(
            target, objects=tuple(fake_new if o == new else o for o in target.objects)
        )
    for _ in range(20):  # "the circle" names no colour: draw until the wrong name is said
        texts = describe_change(fake_ref, fake_tgt, rng)
        if colour in texts[0].split() and (level < 1.0 or shape in texts[0]):
            return texts
    return texts


def cir_texts(
    rec: Recorder,
    reference: Scene,
    target: Scene,
    texts: list[str],
    image: bool = False,
    training: bool = False,
) -> tuple[Item, list[str]]:
    """Draw the ambiguity of a composed-retrieval query: vague or conflicting texts, or (with
    ``image``) a degraded reference, one third each. Returns it as realised (a conflict that
    cannot be made becomes vague) and the query's texts (``texts`` unless they changed);
    ``training``: the query is in a training split."""
    if rec.clear(training):
        return Item(0.0), texts
    kind = rec.rng.choice(("image", *CIR_KINDS) if image else CIR_KINDS)
    if kind == "image":
        kind = rec.rng.choice(IMAGE_KINDS)
        return Item(draw_level(rec.rng, kind), kind), texts
    if kind == "conflict":
        level = rec.rng.choice(CONFLICT_LEVELS)
        made = conflict_change(reference, target, level, rec.rng)
        if made is not None:
            return Item(level, kind), made
    level = rec.rng.choice(TEXT_LEVELS)
    return Item(level, "vague"), vague_change(reference, target, level, rec.rng)


# -- the X-MoRe pool -------------------------------------------------------------------------------


#: the share of the pool drawn from the classification sets' classes (the rest: unrelated scenes)
POOL_CLASS_SHARE = 0.5


def pool_scene(rng: random.Random, concepts: Sequence[Mapping[str, Any]]) -> tuple[Scene, int]:
    """A scene of the ambiguity world's pool, like a web index's photos, and the concept it shows
    (-1: none). With probability :data:`POOL_CLASS_SHARE` it is a new draw of one of ``concepts``
    (the class recipes of the classification sets, :func:`class_scene` arguments), picked
    uniformly, with the nuisance of web photos on top of what its recipe leaves free: place,
    background and small distractors as the recipe allows, a drawing style (mostly plain) and, when
    the recipe does not fix it, a fill pattern (mostly solid). Otherwise it is an unrelated random
    scene of 1-3 objects (random fills, pale background, any style)."""
    style = rng.choices(STYLES, weights=(14, 2, 2, 2))[0]
    fill = "solid" if rng.random() < 0.7 else rng.choice(FILLS[1:])
    if rng.random() < POOL_CLASS_SHARE:
        k = rng.randrange(len(concepts))
        recipe = {"fill": fill, **concepts[k]}
        return class_scene(rng, style=style, **recipe), k
    fills = FILLS if fill != "solid" else ("solid",)
    background = rng.choice(PALE_BACKGROUNDS)
    return random_scene(rng, fills=fills, background=background, style=style), -1


def write_pool(
    out: Any, rec: Recorder, count: int, concepts: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str]]:
    """The ambiguity world's X-MoRe pool: ``count`` web-like scenes (:func:`pool_scene`: half of
    them new draws of the classification sets' ``concepts``) with informative captions (every
    object's size, fill, colour, shape and place, never a class name), except that with
    probability ``pool_noise`` a caption is that of another pool image (kind ``noise``, level 1).
    Writes the images; returns the (image path, caption) rows; records every row by image path."""
    scenes = [pool_scene(rec.rng, concepts)[0] for _ in range(count)]
    rows = []
    for i, scene in enumerate(scenes):
        path = f"images/{i:06d}.jpg"
        out.image(f"pool/{path}", scene)
        noisy = rec.rng.random() < rec.spec.pool_noise
        source = scene
        if noisy and count > 1:  # another image, uniformly: index j != i without a list of
            j = rec.rng.randrange(count - 1)  # them (the same draw as choice() over that list)
            source = scenes[j + (j >= i)]
        rec.add("pool", path, Item(1.0, "noise") if noisy else Item(0.0), POOL_KINDS)
        rows.append((path, specific_caption(source, rec.rng)[0]))
    return rows
