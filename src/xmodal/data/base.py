"""What every dataset loader returns, and the one error type for a bad dataset layout.

Loaders (one module per family: coco, flickr30k, fashioniq, cirr, imagenet, coop) read the real
on-disk formats and return one of the plain containers below; encoding, evaluators and methods only
ever see these containers, never a format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xmodal.errors import DatasetLayoutError

__all__ = [
    "CIRSplit",
    "ClassificationSplit",
    "DatasetLayoutError",
    "RetrievalSplit",
    "layout_error",
]


def layout_error(dataset: str, problem: str, root: Path | str, layout: str) -> DatasetLayoutError:
    """Build the standard one-paragraph error for a bad dataset layout."""
    return DatasetLayoutError(
        f"{dataset}: {problem}\n"
        f"  dataset root: {root}\n"
        f"  expected layout:\n{layout.rstrip()}\n"
        f"  fix: download the official files and run `python scripts/prepare_{dataset}.py --help`, "
        f"or point `data.root` (env XMODAL_DATA) at the prepared folder; "
        f"`python -c 'from xmodal.data.shapes import write_world; write_world(\"data/shapes\")'` "
        f"writes a small synthetic copy in the same format."
    )


@dataclass
class RetrievalSplit:
    """Image-text retrieval data (COCO, Flickr30k): images and captions in image-major order.

    ``caption_image[t]`` is the index into ``image_paths`` of the image caption ``t`` belongs to;
    images may have any number of captions (real COCO has 5-7). ``image_ids`` / ``caption_ids``
    are the dataset's own ids (COCO image ids and caption annotation ids) when the loader was
    asked for them: the extended-positive ground truth (ECCV Caption, CxC) is keyed by them.
    """

    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: list[int]
    image_ids: list[int] | None = None
    caption_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.caption_image):
            raise ValueError("captions and caption_image must have the same length")
        for what, ids, n in (
            ("image_ids", self.image_ids, len(self.image_paths)),
            ("caption_ids", self.caption_ids, len(self.captions)),
        ):
            if ids is not None and len(ids) != n:
                raise ValueError(f"{what} must give one id per item ({n}), got {len(ids)}")


@dataclass
class CIRSplit:
    """Composed image retrieval queries (FashionIQ category or CIRR split) with their gallery.

    Query ``i`` is (``reference[i]``, ``text[i]``) -> ``target[i]``; names index ``gallery`` (the
    ranked candidate set of the chosen protocol) through ``name_to_path``. ``target`` is None for
    splits whose labels are withheld (CIRR test1). ``members[i]`` is CIRR's ``img_set.members`` (6
    names, reference included). ``remove_reference`` says whether the protocol drops the reference
    from the ranking. ``captions[i]`` keeps the raw caption list for training-time text handling.
    """

    name: str
    protocol: str
    reference: list[str]
    text: list[str]
    target: list[str] | None
    gallery: list[str]
    name_to_path: dict[str, Path]
    remove_reference: bool
    captions: list[list[str]] = field(default_factory=list)
    pair_ids: list[int] = field(default_factory=list)
    members: list[list[str]] | None = None


@dataclass
class ClassificationSplit:
    """Image classification test set (ImageNet + variants, CoOp datasets) with its label space."""

    name: str
    image_paths: list[Path]
    labels: list[int]
    classnames: list[str]
