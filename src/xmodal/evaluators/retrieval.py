"""``evaluator=retrieval``: zero-shot image<->text Recall@K (CLIP_benchmark protocol).

Texts query images (t2i, CLIP_benchmark's ``image_retrieval_recall@k``) and images query texts (i2t,
``text_retrieval_recall@k``); a query is a hit at k when any positive is in its top k of the cosine
ranking. Recalls are reported in percent. Images that fail to decode are dropped with their
captions when ``data.on_corrupt=skip`` and counted in ``skipped_images``.

On the COCO 5k test with ``data.extended_positives`` set, the same cosine ranking also gives the
extended-positive protocols of :mod:`xmodal.protocols.extended` (COCO 1k/5k, CxC, ECCV Caption,
PMRP) under ``test/<protocol>/<dir>/...``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from xmodal.data.base import RetrievalSplit
from xmodal.evaluators.base import EvalContext
from xmodal.protocols.retrieval import drop_invalid_images, image_text_retrieval_metrics

if TYPE_CHECKING:
    from xmodal.data.extended import ExtendedPositives

log = logging.getLogger("xmodal")


def extended_positives(data_cfg: Any, split: RetrievalSplit) -> ExtendedPositives | None:
    """The split's extended-positive ground truth (``data.extended_positives``), or None when
    it is off or the split carries no COCO ids (only the test split is given them)."""
    folder = data_cfg.get("extended_positives")
    if not folder:
        return None
    if split.caption_ids is None or split.image_ids is None:
        log.info("extended positives skipped: only the COCO test split carries COCO ids")
        return None
    from xmodal.data import extended

    return extended.load(folder, data_cfg.get("plausible_matches"))


def kept_ids(split: RetrievalSplit, valid: torch.Tensor) -> tuple[list[int], list[int]]:
    """The COCO ids of the images and captions :func:`drop_invalid_images` keeps."""
    assert split.image_ids is not None and split.caption_ids is not None
    keep = valid.tolist()
    image_ids = [i for i, ok in zip(split.image_ids, keep) if ok]
    caption_ids = [c for c, i in zip(split.caption_ids, split.caption_image) if keep[i]]
    return image_ids, caption_ids


class RetrievalEvaluator:
    """Encode the split's images and captions (cached), then R@K both ways."""

    def __init__(
        self, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, cache: bool = True
    ) -> None:
        self.ks = tuple(int(k) for k in ks)
        self.chunk_size = chunk_size
        self.use_cache = cache

    def evaluate(self, ctx: EvalContext) -> dict[str, Any]:
        from xmodal.data.images import ImageDataset
        from xmodal.evaluators.base import dataset_split
        from xmodal.retrieval.encode import TextDataset, encode_cached, text_collate

        what = "an image-text dataset (coco, flickr30k)"
        split = dataset_split(ctx, RetrievalSplit, "retrieval", what)
        gt = extended_positives(ctx.cfg.data, split)  # before encoding: a bad folder stops early
        ctx.cache.enabled = ctx.cache.enabled and self.use_cache
        images = ImageDataset(split.image_paths, ctx.preprocess, on_corrupt=ctx.cfg.data.on_corrupt)
        image_emb, valid = encode_cached(
            ctx.cache,
            ctx.embedding_key("image", split.image_paths),
            ctx.trainer,
            ctx.model,
            images,
            "image",
            **ctx.loader_kwargs(),
        )
        text_emb, _ = encode_cached(
            ctx.cache,
            ctx.embedding_key("text", split.captions),
            ctx.trainer,
            ctx.model,
            TextDataset(split.captions),
            "text",
            collate_fn=text_collate(ctx.tokenizer),
            **ctx.loader_kwargs(),
        )
        image_emb, text_emb, caption_image, skipped = drop_invalid_images(
            split, image_emb, text_emb, valid
        )
        metrics = image_text_retrieval_metrics(
            image_emb, text_emb, caption_image, self.ks, self.chunk_size
        )
        out: dict[str, Any] = {f"test/{k}": v for k, v in metrics.items()}
        if gt is not None:
            from xmodal.protocols.extended import coco_extended_metrics

            extended = coco_extended_metrics(
                F.normalize(image_emb.float(), dim=-1),
                F.normalize(text_emb.float(), dim=-1),
                *kept_ids(split, valid),
                gt,
                self.ks,
                chunk_size=self.chunk_size,
            )
            out.update({f"test/{k}": v for k, v in extended.metrics.items()})
        out.update(
            {
                "test/num_images": len(image_emb),
                "test/num_texts": len(text_emb),
                "test/skipped_images": skipped,
            }
        )
        return out
