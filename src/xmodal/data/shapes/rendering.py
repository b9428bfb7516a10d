"""Rendering a scene: a pure function of the scene, drawn at 4x and averaged down."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from xmodal.data.shapes.scenes import BACKGROUNDS, COLOURS, GRID, SHAPES, Scene, SceneObject

IMAGE_SIZE = 64
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


def _place(obj: SceneObject, cell: float) -> tuple[float, float, float]:
    """Centre (x, y) and radius of ``obj`` on a canvas whose grid cells are ``cell`` wide."""
    frac = _RADIUS[obj.size]
    slack = (0.5 - frac - 0.03) * cell  # jitter that keeps the object inside its cell
    cx = (obj.pos[0] + 0.5) * cell + slack * obj.offset[0]
    cy = (obj.pos[1] + 0.5) * cell + slack * obj.offset[1]
    return cx, cy, frac * cell


def object_box(obj: SceneObject, size: int = IMAGE_SIZE) -> tuple[float, float, float]:
    """Centre (x, y) and radius in pixels of ``obj`` in a ``size`` x ``size`` rendering."""
    return _place(obj, size / GRID)


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
        cx, cy, r = _place(obj, cell)
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
