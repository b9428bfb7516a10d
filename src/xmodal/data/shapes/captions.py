"""Captions of a scene, and modifications: one real change of a scene with two texts that
describe it (a CIRR-style instruction and a FashionIQ-style relative caption)."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from xmodal.data.shapes.scenes import (
    COLOURS,
    GRID,
    KINDS,
    SHAPES,
    SIZE_NAMES,
    Scene,
    SceneObject,
    jitter,
)

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


_RELATIONS = {  # relation word -> (grid axis, sign): a is left of b when a.col < b.col
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}


@dataclass(frozen=True)
class Mention:
    """One object a caption names, with the attributes the caption states (None: not stated;
    the ambiguity world's vague captions may name only a colour, "a red shape")."""

    shape: str | None
    colour: str | None = None
    size: str | None = None
    fill: str | None = None
    pos: tuple[int, int] | None = None

    def fits(self, obj: SceneObject) -> bool:
        """Whether ``obj`` has every attribute this mention states."""
        return (
            self.shape in (None, obj.shape)
            and self.colour in (None, obj.colour)
            and self.size in (None, obj.size)
            and self.fill in (None, obj.fill)
            and self.pos in (None, obj.pos)
        )


@dataclass(frozen=True)
class Claim:
    """What one caption states about a scene, recorded when :func:`describe` writes it.

    ``mentions``: the objects it names (distinct objects of the scene); ``count``: the exact
    number of objects ("two shapes: ..."); ``more``: more objects than it names ("... among
    other shapes"); ``relation``: where ``mentions[0]`` is relative to ``mentions[1]`` (a key of
    the relation words, read geometrically: "above" = a higher row); ``background``: the
    background it names; ``style``: the rendering style the caption was written for (a sketch's
    captions name no colour). A list of objects states that they are there, not that nothing
    else is.
    """

    style: str
    mentions: tuple[Mention, ...] = ()
    count: int | None = None
    more: bool = False
    relation: str | None = None
    background: str | None = None

    def holds(self, scene: Scene) -> bool:
        """Whether the caption truly describes ``scene`` (the shapes world's ground truth)."""
        objs = scene.objects
        if scene.style != self.style or self.background not in (None, scene.background):
            return False
        if self.count is not None and len(objs) != self.count:
            return False
        if self.more and len(objs) <= len(self.mentions):
            return False
        options = [[o for o in objs if m.fits(o)] for m in self.mentions]
        if not all(options):
            return False
        for chosen in itertools.product(*options):  # distinct objects, related as stated
            if len(set(map(id, chosen))) == len(chosen) and self._related(chosen):
                return True
        return False

    def _related(self, chosen: Sequence[SceneObject]) -> bool:
        if self.relation is None:
            return True
        axis, sign = _RELATIONS[self.relation]
        return sign * (chosen[0].pos[axis] - chosen[1].pos[axis]) > 0


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _named(
    obj: SceneObject, style: str, rng: random.Random, size_p: float = 0.5, pos_p: float = 0.0
) -> tuple[str, Mention]:
    """'large striped red circle' (no article; with ``pos_p`` sometimes 'a ... on the left')
    and what it states; sketches show no colour, so name none."""
    words = []
    size = fill = colour = pos = None
    if rng.random() < size_p:
        words.append(rng.choice(_SIZE_WORDS[obj.size]))
        size = obj.size
    if style == "plain" and obj.fill != "solid":
        words.append(_FILL_WORDS[obj.fill])
        fill = obj.fill
    if style != "sketch":
        words.append(obj.colour)
        colour = obj.colour
    words.append(obj.shape)
    text = " ".join(words)
    if pos_p:
        text = _article(text)
        if rng.random() < pos_p:
            text += " " + rng.choice(_POS_AT[obj.pos])
            pos = obj.pos
    return text, Mention(obj.shape, colour, size, fill, pos)


def _noun(obj: SceneObject, style: str, rng: random.Random, size_p: float = 0.5) -> str:
    return _named(obj, style, rng, size_p)[0]


def _phrases(
    objs: Sequence[SceneObject], style: str, rng: random.Random, pos_p: float = 0.4
) -> tuple[str, tuple[Mention, ...]]:
    """'a red circle on the left and a blue star' and the mentions it states."""
    named = [_named(obj, style, rng, pos_p=pos_p) for obj in objs]
    return _join([text for text, _ in named]), tuple(mention for _, mention in named)


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` (they are in different cells)."""
    if a.pos[0] != b.pos[0]:
        return "to the left of" if a.pos[0] < b.pos[0] else "to the right of"
    return "above" if a.pos[1] < b.pos[1] else "below"


def describe_with_claim(scene: Scene, rng: random.Random) -> tuple[str, Claim]:
    """:func:`describe`'s caption and the :class:`Claim` it makes (the same random draws)."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    n = len(objs)
    style = scene.style
    mentions: tuple[Mention, ...] = ()
    count = relation = background = None
    more = False
    if n == 0:
        body = "an empty background"
        mode = "list"
        count = 0
    else:
        modes = ["list", "list", "there"] + (["count", "subset", "relation"] if n > 1 else [])
        mode = rng.choice(modes)
        if mode == "list":
            body, mentions = _phrases(objs, style, rng)
        elif mode == "there":
            body, mentions = _phrases(objs, style, rng)
            body = "there is " + body
        elif mode == "count":
            sep = rng.choice((": ", ", "))
            body, mentions = _phrases(objs, style, rng)
            body = f"{_NUMBERS[n]} shapes{sep}" + body
            count = n
        elif mode == "subset":
            k = rng.randint(1, n - 1)
            rest = rng.choice(("", " among other shapes", " with more shapes around"))
            body, mentions = _phrases(objs[:k], style, rng)
            body += rest
            more = bool(rest)
        else:
            a, b = objs[0], objs[1]
            noun_a, mention_a = _named(a, style, rng)
            relation = _relation(a, b)
            noun_b, mention_b = _named(b, style, rng)
            body = f"{_article(noun_a)} {relation} {_article(noun_b)}"
            mentions = (mention_a, mention_b)
    if mode != "there":
        body = rng.choice(_PREFIX.get(style, ("",))) + body
    if style != "sketch" and scene.background != "grey" and rng.random() < 0.5:
        body += f" on a {scene.background} background"
        background = scene.background
    if rng.random() < 0.5:
        body = body[0].upper() + body[1:]
    if rng.random() < 0.3:
        body += "."
    return body, Claim(style, mentions, count, more, relation, background)


def describe(scene: Scene, rng: random.Random) -> str:
    """One true caption of ``scene`` in a randomly chosen phrasing.

    Phrasings vary (full list, count, subset, spatial relation, "there is"), and so do optional
    size, position, background, prefix, capitalisation and final period, so that repeated calls give
    several distinct captions of one image, like the 5 human captions of COCO.
    """
    return describe_with_claim(scene, rng)[0]


def described_captions(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, Claim]]:
    """``n`` captions of one scene with their claims, distinct where the phrasings allow it."""
    out: list[tuple[str, Claim]] = []
    for _ in range(40 * n):
        cap, claim = describe_with_claim(scene, rng)
        if cap.lower().rstrip(".") not in {c.lower().rstrip(".") for c, _ in out}:
            out.append((cap, claim))
        if len(out) == n:
            return out
    while len(out) < n:
        out.append(describe_with_claim(scene, rng))
    return out


def distinct_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """``n`` captions of one scene, distinct where the phrasings allow it."""
    return [caption for caption, _ in described_captions(scene, rng, n)]


def tokens(text: str) -> list[str]:
    """Karpathy's caption tokens: lowercase alphanumeric words."""
    return re.findall(r"[a-z0-9]+", text.lower())


# -- Modifications -----------------------------------------------------------------------------


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
            SceneObject(shape, colour, rng.choice(SIZE_NAMES), pos, rng.choice(fills), jitter(rng))
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
