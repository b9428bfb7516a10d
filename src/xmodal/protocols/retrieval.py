"""Zero-shot image<->text retrieval as CLIP_benchmark evaluates it (COCO, Flickr30k), shared by
``evaluator=retrieval`` and ``method=clip_pretrain``'s validation; the embedding-cache key of a
split's frozen embeddings and the removal of undecodable images, shared by every evaluator and by
``method=probvlm`` (which trains on the same cache entries)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.inputs import content_digest, digest
from xmodal.metrics.retrieval import image_text_recall
from xmodal.retrieval.search import DEFAULT_CHUNK_SIZE

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from xmodal.data.base import RetrievalSplit


def image_text_retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    caption_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Cosine Recall@K of both directions from raw embeddings, in percent: ``t2i/R@k`` (text
    queries, CLIP_benchmark's ``image_retrieval_recall@k``), ``i2t/R@k`` (image queries, a hit
    when any of its captions is in the top k) and ``mean/R@1`` of the two. ``caption_image[t]``
    is the image of caption t; nothing of size texts x images is built."""
    fractions = image_text_recall(
        F.normalize(image_emb.float(), dim=-1),
        F.normalize(text_emb.float(), dim=-1),
        caption_image,
        ks,
        chunk_size=chunk_size,
    )
    out = {key: 100.0 * value for key, value in fractions.items()}
    if 1 in ks:
        out["mean/R@1"] = (out["t2i/R@1"] + out["i2t/R@1"]) / 2
    return out


def embedding_key(
    data: DictConfig,
    backbone: Any,
    preprocess: Callable,
    kind: str,
    items: list[Any],
    /,
    **extra: Any,
) -> dict[str, Any]:
    """Cache key of the embeddings of ``items`` (image refs or texts) of dataset ``data`` under
    ``backbone`` (a config) with its image transform ``preprocess``; ``extra`` entries are added
    and win (an ensemble member's own ``backbone`` identity, an MC-dropout pass).

    Images are keyed by their files' fingerprints too (a replaced image is re-encoded) and by
    ``data.on_corrupt`` (which decides whether an unreadable one is dropped or fails); the
    backbone by :func:`xmodal.backbones.identity` (weights by content, random ones by seed). The
    split is identified by its items, so every consumer of the same items (an evaluator's test
    split, a method's training split) shares one entry.
    """
    from xmodal.backbones import identity

    key = {
        "backbone": identity(backbone),
        "dataset": data.name,
        "root": str(Path(data.root).resolve()),
        "kind": kind,
        "items": digest(items),
        "count": len(items),
        "transform": repr(preprocess) if kind == "image" else None,
        **extra,
    }
    if kind == "image":
        key["content"] = content_digest(items)
        key["on_corrupt"] = str(data.on_corrupt)
    return key


def drop_invalid_images(
    split: RetrievalSplit, image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Remove undecodable images and their captions; returns embeddings, caption_image, #skipped."""
    caption_image = torch.tensor(split.caption_image, dtype=torch.long)
    if bool(valid.all()):
        return image_emb, text_emb, caption_image, 0
    new_index = torch.cumsum(valid.long(), 0) - 1
    keep_text = valid[caption_image]
    return (
        image_emb[valid],
        text_emb[keep_text],
        new_index[caption_image[keep_text]],
        int((~valid).sum()),
    )
