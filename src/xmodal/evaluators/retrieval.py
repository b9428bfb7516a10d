"""``evaluator=retrieval``: zero-shot image<->text Recall@K (CLIP_benchmark protocol).

Texts query images (t2i, CLIP_benchmark's ``image_retrieval_recall@k``) and images query texts (i2t,
``text_retrieval_recall@k``); a query is a hit at k when any positive is in its top k of the cosine
ranking. Recalls are reported in percent. Images that fail to decode are dropped with their
captions when ``data.on_corrupt=skip`` and counted in ``skipped_images``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xmodal.data.base import RetrievalSplit
from xmodal.evaluators.base import EvalContext
from xmodal.protocols.retrieval import drop_invalid_images, image_text_retrieval_metrics


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
        out.update(
            {
                "test/num_images": len(image_emb),
                "test/num_texts": len(text_emb),
                "test/skipped_images": skipped,
            }
        )
        return out
