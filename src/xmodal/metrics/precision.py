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
"""

from __future__ import annotations

import torch
from torch import Tensor


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
