"""Zero-shot image<->text retrieval as CLIP_benchmark evaluates it (COCO, Flickr30k), shared by
``evaluator=retrieval`` and ``method=clip_pretrain``'s validation."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from xmodal.metrics.retrieval import image_text_recall
from xmodal.retrieval.search import DEFAULT_CHUNK_SIZE


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
