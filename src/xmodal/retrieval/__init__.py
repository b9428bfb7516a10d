"""Retrieval search: exact chunked top-k, target ranks, optional faiss index."""

from xmodal.retrieval.search import (
    FaissIndex,
    dot_score,
    gather_scores,
    order_candidates,
    rank_of,
    rank_of_scores,
    topk,
    topk_scores,
)

__all__ = [
    "FaissIndex",
    "dot_score",
    "gather_scores",
    "order_candidates",
    "rank_of",
    "rank_of_scores",
    "topk",
    "topk_scores",
]
