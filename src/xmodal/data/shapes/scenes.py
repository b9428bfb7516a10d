"""The shapes world's scene model: shapes, colours, backgrounds, fills and styles, objects in a 3x3
grid, and the random scenes every dataset of the world is drawn from."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

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


def jitter(rng: random.Random) -> tuple[float, float]:
    """A small offset of an object inside its cell (not an attribute captions talk about)."""
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
        obj = SceneObject(shape, colour, rng.choice(sizes), pos, rng.choice(fills), jitter(rng))
        objects.append(obj)
    return Scene(tuple(objects), background, style, rng.randrange(2**31))


def class_scene(
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
    objects = [replace(o, offset=jitter(rng)) for o in objects]
    return Scene(tuple(objects), rng.choice(backgrounds), style, rng.randrange(2**31))
