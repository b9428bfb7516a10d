"""Prompt templates for zero-shot classification, selectable by name or given as a list.

``evaluator.templates`` is a list of format strings (``"a photo of a {}."``) or one of:

- ``single``: CLIP's single ImageNet prompt, ``a photo of a {}.`` (the TPT / X-MoRe protocol);
- ``clip80``: the 80 ImageNet templates of CLIP's prompt ensembling (taken from open_clip's
  ``zero_shot_metadata``, the copy the field evaluates with);
- ``coop``: CoOp's hand-written prompt for the dataset (``data.dataset``), e.g. ``a photo of a {},
  a type of pet.`` for Oxford Pets (CoOp's ``CUSTOM_TEMPLATES``; ImageNet and its variants use
  ``a photo of a {}.``).

With several templates, a class's embedding is the mean of its normalised prompt embeddings,
normalised again (CLIP's ensembling; ``xmodal.evaluators.zeroshot.build_classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xmodal.errors import ConfigError

SINGLE = ("a photo of a {}.",)
NAMES = ("single", "clip80", "coop")

#: CoOp's per-dataset prompt, keyed by xmodal's ``data.dataset`` names.
COOP = {
    "imagenet": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}


def clip80() -> list[str]:
    """CLIP's 80 ImageNet templates as format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def resolve_templates(spec: str | Sequence[str], dataset: str | None = None) -> list[str]:
    """The format strings of ``spec`` (a name of :data:`NAMES` or a list) for ``dataset``."""
    if isinstance(spec, str):
        if spec == "single":
            return list(SINGLE)
        if spec == "clip80":
            return clip80()
        if spec == "coop":
            if dataset not in COOP:
                raise ConfigError(
                    f"evaluator.templates=coop has no CoOp prompt for data.dataset={dataset!r}; "
                    f"known: {', '.join(sorted(COOP))}. Give a list of templates instead."
                )
            return [COOP[dataset]]
        raise ConfigError(
            f"evaluator.templates={spec!r} is not one of {NAMES} nor a list of format strings "
            "such as ['a photo of a {}.']"
        )
    return [str(t) for t in spec]


def check_templates(spec: Any) -> None:
    """Refuse a bad ``evaluator.templates`` when the evaluator is built: an unknown name, or a
    list whose templates have no place for the class name."""
    if isinstance(spec, str):
        if spec not in NAMES:
            resolve_templates(spec)  # raises with the list of names
        return
    from xmodal.evaluators.zeroshot import class_prompts

    class_prompts(["x"], [str(t) for t in spec])
