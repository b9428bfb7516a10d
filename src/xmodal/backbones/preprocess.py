"""Image preprocessing shared by the backbone kinds: CLIP4Cir's padding and BLIP's eval transform.

FashionIQ's product photos are tall and narrow; a centre crop cuts their top and bottom.
CLIP4Cir (Baldrati et al., CVPR-W 2022) pads them first:

- `targetpad`: an image whose aspect ratio (long side / short side) is at least `ratio` (1.25 in
  CLIP4Cir) is padded with black on its short sides to exactly that ratio; others are unchanged.
- `squarepad`: every image is padded with black to a square.

Padding runs before the backbone's own resize/crop, so the rest of its preprocessing is unchanged.
Both appear in the transform's repr, which is part of the embedding-cache key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP; BLIP / BLIP-2 / LAVIS eval too
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class TargetPad:
    """Pad an image whose long/short side ratio is >= `ratio` to that ratio (CLIP4Cir)."""

    def __init__(self, ratio: float = 1.25) -> None:
        self.ratio = ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        image = _rgb(image)
        w, h = image.size
        if max(w, h) / min(w, h) < self.ratio:
            return image
        side = max(w, h) / self.ratio  # the short side after padding
        hp, vp = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
        return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"TargetPad(ratio={self.ratio})"


class SquarePad:
    """Pad an image to a square, centred (CLIP4Cir)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        image = _rgb(image)
        w, h = image.size
        side = max(w, h)
        hp, vp = int((side - w) / 2), int((side - h) / 2)
        return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return "SquarePad()"


def pad_transform(kind: str | None, ratio: float) -> Callable | None:
    """The padding step named by `backbone.image_pad` (None: no padding)."""
    if kind is None:
        return None
    return TargetPad(ratio) if kind == "targetpad" else SquarePad()


def with_pad(preprocess: Callable, cfg: Any) -> Callable:
    """`preprocess` with the configured padding (`cfg.image_pad`) as its first step."""
    pad = pad_transform(cfg.image_pad, cfg.image_pad_ratio)
    if pad is None:
        return preprocess
    steps = preprocess.transforms if isinstance(preprocess, transforms.Compose) else [preprocess]
    return transforms.Compose([pad, *steps])


class ToRGB:
    """PIL image to RGB (a named step, so the transform's repr is stable across processes)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return _rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


def blip_eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float], cfg: Any
) -> transforms.Compose:
    """LAVIS' `blip_image_eval`: RGB, Resize((size, size)) bicubic, ToTensor, Normalize; with the
    configured padding first."""
    steps = [
        ToRGB(),
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ]
    return with_pad(transforms.Compose(steps), cfg)


def augmented_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """HUG's training augmentation (its released code): Resize(size, size) bicubic, horizontal
    flip (p = 0.5), ColorJitter(0.1, 0.1, 0.1), then normalisation; evaluation keeps the
    backbone's own preprocessing."""
    return transforms.Compose(
        [
            transforms.Lambda(_rgb),
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(0.5),
            transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )
