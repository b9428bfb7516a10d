"""Precision-based retrieval metrics of extended-positive protocols: mAP@R and R-Precision.

ECCV Caption (Chun et al., ECCV 2022) and PCME++ report them because Recall@K saturates and
ignores every positive after the first. For a query with R positives, take its top-R items:

- **R-Precision** = (positives among the top R) / R;
- **mAP@R** = (1/R) * sum over i = 1..R of P@i * rel(i), where rel(i) says whether the i-th item is
  a positive and P@i is the precision of the top i.

Queries without a positive are left out, as ``eccv_caption`` does; both return fractions in
[0, 1]. Rankings follow xmodal's tie rule (equal scores go to the lower gallery index), as
:mod:`xmodal.metrics.retrieval` does. The formulas are eccv_caption's (``compute_eccv_metrics``);
tests check them against that package on random rankings.

:func:`ranked_positives_from_embeddings` gives the same per-query values (and the rank of the
first positive, for R@K) for several positive sets at once from one chunked top-R search over
embeddings: no queries x gallery matrix, positives given sparsely as (query, item) pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from xmodal.metrics.retrieval import first_hit_rank
from xmodal.retrieval.search import DEFAULT_CHUNK_SIZE, DEFAULT_GALLERY_CHUNK_SIZE, ScoreFn, topk

#: Ranked (query, item) entries held per query chunk of the top-R search (chunks shrink as R grows).
RANKED_ENTRIES = 1 << 22


def ranked_hits(scores: Tensor, positives: Tensor, depth: int | None = None) -> Tensor:
    """``hits [Q, depth]``: whether each query's i-th ranked item is a positive (best first;
    ties to the lower gallery index). ``depth`` defaults to the largest number of positives."""
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and positives must both be [Q, G], got {tuple(scores.shape)} and "
            f"{tuple(positives.shape)}"
        )
    depth = int(positives.sum(1).max()) if depth is None else depth
    depth = max(1, min(depth, scores.shape[1]))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :depth]
    return positives.bool().gather(1, order)


def precision_at_r(hits: Tensor, num_positives: Tensor) -> tuple[Tensor, Tensor]:
    """Per query: ``(AP@R, R-Precision)`` (float64 [Q]) from ``hits`` [Q, >= R] in rank order
    and each query's number of positives R [Q]; NaN where R = 0 (left out of the means)."""
    num = num_positives.to(torch.float64)
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    within = ranks[None, :] <= num[:, None]
    rel = (hits.bool() & within).to(torch.float64)
    ap = ((rel.cumsum(1) / ranks) * rel).sum(1) / num
    rp = rel.sum(1) / num
    none = num == 0
    return ap.masked_fill(none, float("nan")), rp.masked_fill(none, float("nan"))


def _means(scores: Tensor, positives: Tensor) -> tuple[float, float]:
    ap, rp = precision_at_r(ranked_hits(scores, positives), positives.sum(1))
    keep = ~ap.isnan()
    if not keep.any():
        raise ValueError("no query has a positive: mAP@R and R-Precision are undefined")
    return ap[keep].mean().item(), rp[keep].mean().item()


def map_at_r(scores: Tensor, positives: Tensor) -> float:
    """mAP@R over the queries that have positives; ``scores`` [Q, G] (higher = better),
    ``positives`` bool [Q, G]. A fraction in [0, 1]."""
    return _means(scores, positives)[0]


def r_precision(scores: Tensor, positives: Tensor) -> float:
    """R-Precision over the queries that have positives; arguments as :func:`map_at_r`."""
    return _means(scores, positives)[1]


# ------------------------------------------------------------------ sparse positives, chunked


@dataclass
class RankedQueries:
    """Per-query results of one positive set in one ranking (all [Q]).

    ``rank``: 0-based rank of the first positive, ``depth`` when none is in the searched top
    ``depth`` (so ``rank < k`` is a hit at k for every k <= depth); ``ap`` / ``rp``: AP@R and
    R-Precision (float64, NaN for a query without positives); ``num_positives``: R.
    """

    rank: Tensor
    ap: Tensor
    rp: Tensor
    num_positives: Tensor
    depth: int

    @property
    def has_positives(self) -> Tensor:
        return self.num_positives > 0


def _pair_keys(pairs: Tensor, num_queries: int, num_gallery: int) -> tuple[Tensor, Tensor]:
    """Sorted unique keys ``q * G + g`` of (query, item) pairs [P, 2], and R per query."""
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    if pairs.numel() and (
        pairs[:, 0].min() < 0
        or pairs[:, 0].max() >= num_queries
        or pairs[:, 1].min() < 0
        or pairs[:, 1].max() >= num_gallery
    ):
        raise ValueError(f"positive pairs must index [{num_queries} queries, {num_gallery} items]")
    keys = torch.unique(pairs[:, 0] * num_gallery + pairs[:, 1])  # sorted, duplicates once
    counts = torch.bincount(keys // num_gallery, minlength=num_queries)
    return keys, counts


def _lookup(keys: Tensor, rows: Tensor, items: Tensor, num_gallery: int) -> Tensor:
    """hits[i, j] = (rows[i], items[i, j]) is a positive pair (binary search in ``keys``)."""
    wanted = rows[:, None] * num_gallery + items
    if keys.numel() == 0:
        return torch.zeros_like(wanted, dtype=torch.bool)
    at = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
    return keys[at] == wanted


def ranked_positives_from_embeddings(
    queries: Tensor,
    gallery: Tensor,
    positives: Mapping[str, Tensor],
    depth: int,
    *,
    num_positives: Mapping[str, Tensor] | None = None,
    keep: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gallery_chunk_size: int = DEFAULT_GALLERY_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
) -> dict[str, RankedQueries]:
    """Rank, AP@R and R-Precision of every query for several positive sets, from one top-R pass.

    Args:
        queries, gallery: embeddings (anything ``score_fn`` takes, sliced on dim 0); the ranking
            is by descending score with xmodal's tie rule (:mod:`xmodal.retrieval.search`).
        positives: set name -> long [P, 2] (query index, gallery index) pairs.
        depth: ranks searched for R@K (the largest K); raised to the largest R of any set, so
            AP@R and R-Precision are exact.
        num_positives: set name -> long [Q], R when a query has positives that are not in the
            gallery (a ground truth listing items the split lacks: they count in R, as in
            eccv_caption, and are never retrieved); default: the query's number of pairs.
        keep: bool [G]; items outside it are left out of every ranking (as if absent from the
            gallery) and must not be positives. The search goes ``#left out`` deeper instead.
        chunk_size, gallery_chunk_size, score_fn: as :func:`xmodal.retrieval.search.topk`;
            query chunks shrink so that a chunk holds at most ``RANKED_ENTRIES`` ranked entries.

    Equals :func:`ranked_hits` + :func:`precision_at_r` (and
    :func:`xmodal.metrics.positive_ranks`) on the dense score matrix, which it never builds.
    """
    num_q, num_g = queries.shape[0], gallery.shape[0]
    if keep is None:
        keep = torch.ones(num_g, dtype=torch.bool)
    keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
    if keep.shape != (num_g,):
        raise ValueError(f"keep must be bool [{num_g}], got shape {tuple(keep.shape)}")
    kept = int(keep.sum())
    sets = {name: _pair_keys(p, num_q, num_g) for name, p in positives.items()}
    for name, (keys, counts) in sets.items():
        if keys.numel() and not bool(keep[keys % num_g].all()):
            raise ValueError(f"positive set {name!r} has items outside `keep`")
        if num_positives is not None and name in num_positives:
            given = torch.as_tensor(num_positives[name], dtype=torch.long).cpu()
            if given.shape != (num_q,) or bool((given < counts).any()):
                raise ValueError(
                    f"num_positives[{name!r}] must be long [{num_q}], at least each query's "
                    "number of positive pairs"
                )
            sets[name] = (keys, given)
    most = max([int(c.max()) for _, c in sets.values() if c.numel()] + [int(depth)])
    depth = max(1, min(most, kept))
    search = min(num_g, depth + num_g - kept)  # deep enough to hold `depth` kept items
    chunk = max(1, min(chunk_size, RANKED_ENTRIES // search))
    out = {
        name: RankedQueries(
            torch.empty(num_q, dtype=torch.long),
            torch.empty(num_q, dtype=torch.float64),
            torch.empty(num_q, dtype=torch.float64),
            counts,
            depth,
        )
        for name, (_, counts) in sets.items()
    }
    for q0 in range(0, num_q, chunk):
        q1 = min(q0 + chunk, num_q)
        _, items = topk(
            queries[q0:q1],
            gallery,
            search,
            chunk_size=chunk,
            gallery_chunk_size=gallery_chunk_size,
            score_fn=score_fn,
        )
        items = items.cpu()
        if kept < num_g:  # drop the left-out items, keeping the order of the others
            first = (~keep[items]).to(torch.uint8).argsort(dim=1, stable=True)
            items = items.gather(1, first)
        items = items[:, :depth]
        rows = torch.arange(q0, q1)
        for name, (keys, counts) in sets.items():
            hits = _lookup(keys, rows, items, num_g)
            res = out[name]
            res.rank[q0:q1] = first_hit_rank(hits)
            res.ap[q0:q1], res.rp[q0:q1] = precision_at_r(hits, counts[q0:q1])
    return out
