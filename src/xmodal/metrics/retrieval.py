"""Retrieval metrics: Recall@K (CLIP_benchmark style), CIRR R@K / Recall_subset@K, FashionIQ.

Conventions:

- **Fractions.** Every function returns recalls as fractions in [0, 1]; tables multiply by 100
  (cir.md §3 reports percent). ``fashioniq_average`` also works on fractions.
- **Ranks.** Everything is computed from 0-based ranks: a query is a hit at k iff the rank of its
  (first) positive is ``< k``. Ranks follow the tie rule of :mod:`xmodal.retrieval.search`: equal
  scores go to the lower gallery index (``torch.sort(..., stable=True)`` order), which equals
  ``torch.topk`` / CLIP_benchmark whenever no tie straddles the k-th place.
- **No positive.** A query without any positive is a miss at every k (its reported rank is the
  search depth) and still counts in the denominator, as in CLIP_benchmark.
- **Direction.** ``largest=True`` ranks by descending similarity; distance-based methods (HUG)
  pass distances with ``largest=False``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from xmodal.retrieval.search import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_GALLERY_CHUNK_SIZE,
    ScoreFn,
    gather_scores,
    rank_of,
    topk,
    topk_scores,
)


def recall_from_ranks(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k = fraction of queries whose positive has 0-based rank ``< k``, for each k."""
    if ranks.numel() == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): (ranks < k).double().mean().item() for k in ks}


def first_hit_rank(hits: Tensor) -> Tensor:
    """Position of the first True in each row of ``hits`` [Q, n]; ``n`` when the row has none."""
    n = hits.shape[1]
    first = hits.int().argmax(dim=1)  # argmax returns the first maximal index
    return torch.where(hits.any(dim=1), first, torch.full_like(first, n))


def positive_ranks(scores: Tensor, positives: Tensor, max_rank: int) -> Tensor:
    """Rank of the first positive in each row of ``scores`` [Q, G], looked up in the top
    ``max_rank`` (clipped to G); ranks ``>= max_rank`` are reported as ``max_rank`` (a miss)."""
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)}")
    depth = min(max_rank, scores.shape[1])
    _, indices = topk_scores(scores, depth)
    rank = first_hit_rank(positives.bool().gather(1, indices))
    return torch.where(rank >= depth, torch.full_like(rank, max_rank), rank)


def positive_ranks_from_embeddings(
    queries: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    max_rank: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gallery_chunk_size: int = DEFAULT_GALLERY_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
    largest: bool = True,
) -> Tensor:
    """Chunked :func:`positive_ranks`: positives given compactly by labels.

    Gallery item j is a positive of query i iff ``gallery_labels[j] == query_labels[i]``. For
    COCO/Flickr with ``caption_image`` (long [T]): t2i uses text queries with
    ``query_labels=caption_image`` and ``gallery_labels=arange(I)``; i2t uses image queries with
    ``query_labels=arange(I)`` and ``gallery_labels=caption_image`` (several positives per query).
    """
    depth = min(max_rank, gallery.shape[0])
    _, indices = topk(
        queries,
        gallery,
        depth,
        chunk_size=chunk_size,
        gallery_chunk_size=gallery_chunk_size,
        score_fn=score_fn,
        largest=largest,
    )
    hits = gallery_labels.to(indices.device)[indices] == query_labels.to(indices.device)[:, None]
    rank = first_hit_rank(hits)
    return torch.where(rank >= depth, torch.full_like(rank, max_rank), rank)


def recall_from_embeddings(
    queries: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gallery_chunk_size: int = DEFAULT_GALLERY_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
    largest: bool = True,
) -> dict[int, float]:
    """Recall@k from embeddings without a Q x G matrix; equals CLIP_benchmark's dense Recall@k on
    ``score_fn(queries, gallery)`` with ``positives = query_labels[:, None] == gallery_labels``
    (``tests/retrieval_reference.py``)."""
    ranks = positive_ranks_from_embeddings(
        queries,
        gallery,
        query_labels,
        gallery_labels,
        max(ks),
        chunk_size=chunk_size,
        gallery_chunk_size=gallery_chunk_size,
        score_fn=score_fn,
        largest=largest,
    )
    return recall_from_ranks(ranks, ks)


def image_text_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    caption_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Both directions of COCO/Flickr retrieval by dot product (normalise beforehand for cosine).

    ``caption_image[t]`` is the image of caption t. Keys ``"t2i/R@k"`` (text queries, image
    gallery) and ``"i2t/R@k"`` (image queries, a hit if any of its captions is in the top k).
    """
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    images = torch.arange(image_emb.shape[0], device=caption_image.device)
    t2i = recall_from_embeddings(
        text_emb, image_emb, caption_image, images, ks, chunk_size=chunk_size
    )
    i2t = recall_from_embeddings(
        image_emb, text_emb, images, caption_image, ks, chunk_size=chunk_size
    )
    out = {f"t2i/R@{k}": v for k, v in t2i.items()}
    out.update({f"i2t/R@{k}": v for k, v in i2t.items()})
    return out


# ----------------------------------------------------------------------------- composed retrieval


def _check_reference(target: Tensor, reference: Tensor | None) -> None:
    if reference is not None and bool((torch.as_tensor(reference) == target).any()):
        raise ValueError("a query's reference equals its target; it cannot be excluded")


def _subset_ranks(
    target_score: Tensor,
    member_scores: Tensor,
    target: Tensor,
    reference: Tensor,
    members: Tensor,
    largest: bool,
) -> Tensor:
    """Rank of the target among the group members other than the reference (CIRR Rs@K).

    Uses only the ``[Q, M]`` member scores. Duplicate members count once; ties follow the global
    tie rule (lower gallery index first), so the order is the full ranking restricted to the group.
    """
    if not bool((members == target[:, None]).any(dim=1).all()):
        raise ValueError("every query's target must be one of its group members")
    better = (
        member_scores > target_score[:, None] if largest else member_scores < target_score[:, None]
    )
    tie_before = (member_scores == target_score[:, None]) & (members < target[:, None])
    sorted_members, order = members.sort(dim=1, stable=True)
    first_copy = torch.ones_like(members, dtype=torch.bool)
    first_copy[:, 1:] = sorted_members[:, 1:] != sorted_members[:, :-1]
    unique = torch.empty_like(first_copy).scatter_(1, order, first_copy)
    counted = (better | tie_before) & unique & (members != reference[:, None])
    return counted.sum(dim=1)


def _cirr_result(
    rank: Tensor, subset_rank: Tensor, ks: Sequence[int], subset_ks: Sequence[int]
) -> dict[str, float]:
    out = {f"R@{k}": v for k, v in recall_from_ranks(rank, ks).items()}
    out.update({f"Rs@{k}": v for k, v in recall_from_ranks(subset_rank, subset_ks).items()})
    return out


def cirr_recall_from_embeddings(
    queries: Tensor,
    gallery: Tensor,
    target: Tensor,
    reference: Tensor,
    members: Tensor,
    ks: Sequence[int] = (1, 5, 10, 50),
    subset_ks: Sequence[int] = (1, 2, 3),
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
    largest: bool = True,
) -> dict[str, float]:
    """CIRR validation metrics (CLIP4Cir ``compute_cirr_val_metrics``) from embeddings, as
    fractions, chunked (no Q x G matrix).

    ``target``, ``reference`` long [Q]; ``members`` long [Q, M], the gallery indices of each
    query's image set (CIRR: 6, reference and target included). The reference is always removed
    from the ranking. ``R@k`` ranks the whole gallery; ``Rs@k`` ranks only the members other
    than the reference, from their scores (no sort). Keys ``"R@1"`` ... ``"Rs@3"``.
    """
    target, reference, members = (
        torch.as_tensor(x, dtype=torch.long) for x in (target, reference, members)
    )
    _check_reference(target, reference)
    rank = rank_of(
        queries,
        gallery,
        target,
        chunk_size=chunk_size,
        score_fn=score_fn,
        exclude=reference,
        largest=largest,
    )
    scores = gather_scores(
        queries,
        gallery,
        torch.cat([target[:, None], members], dim=1),
        chunk_size=chunk_size,
        score_fn=score_fn,
    )
    subset_rank = _subset_ranks(scores[:, 0], scores[:, 1:], target, reference, members, largest)
    return _cirr_result(rank, subset_rank, ks, subset_ks)


def fashioniq_average(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Aggregate per-category FashionIQ recalls (cir.md §1.3), keeping the input's unit.

    Returns ``"<cat>/R@10"``, ``"<cat>/R@50"`` for each category, the unweighted means
    ``"avg/R@10"``, ``"avg/R@50"``, and ``"avg"`` = (avg R@10 + avg R@50) / 2, the leaderboard's
    "(R@10+R@50)/2".
    """
    if not per_category:
        raise ValueError("fashioniq_average needs at least one category")
    out: dict[str, float] = {}
    for cat, metrics in per_category.items():
        for key in ("R@10", "R@50"):
            out[f"{cat}/{key}"] = float(metrics[key])
    for key in ("R@10", "R@50"):
        out[f"avg/{key}"] = sum(float(m[key]) for m in per_category.values()) / len(per_category)
    out["avg"] = (out["avg/R@10"] + out["avg/R@50"]) / 2
    return out
