"""Dense reference implementations of the retrieval metrics, for tests only: Recall@K on a
[Q, G] score matrix as CLIP_benchmark computes it, CIRR and FashionIQ recalls from a score matrix.
xmodal itself never builds a Q x G matrix; its chunked metrics (``xmodal.metrics.retrieval``) are
checked against these, and these against brute-force sorts (tests/test_metrics_retrieval.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xmodal.metrics.retrieval import (
    _check_reference,
    _cirr_result,
    _subset_ranks,
    positive_ranks,
    recall_from_ranks,
)
from xmodal.retrieval.search import rank_of_scores


def recall_at_k(
    scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Recall@k on a dense problem, as CLIP_benchmark computes it: take the top ``max(ks)``
    of each row and check whether any positive is among the first k.

    ``scores`` float [Q, G] (higher = better), ``positives`` bool [Q, G]. Queries without a
    positive count as misses. A k larger than G means "the whole gallery".
    """
    return recall_from_ranks(positive_ranks(scores, positives, max(ks)), ks)


def cirr_recall(
    scores: Tensor,
    target: Tensor,
    reference: Tensor,
    members: Tensor,
    ks: Sequence[int] = (1, 5, 10, 50),
    subset_ks: Sequence[int] = (1, 2, 3),
    *,
    largest: bool = True,
) -> dict[str, float]:
    """CIRR validation metrics (CLIP4Cir ``compute_cirr_val_metrics``), as fractions.

    ``scores`` [Q, G]; ``target``, ``reference`` long [Q]; ``members`` long [Q, M], the gallery
    indices of each query's image set (CIRR: 6, reference and target included). The reference is
    always removed from the ranking. ``R@k`` ranks the whole gallery; ``Rs@k`` ranks only the
    members other than the reference, from their gathered scores (no sort). Keys ``"R@1"`` ...
    ``"Rs@3"``.
    """
    target, reference, members = (
        torch.as_tensor(x, dtype=torch.long) for x in (target, reference, members)
    )
    _check_reference(target, reference)
    rank = rank_of_scores(scores, target, exclude=reference, largest=largest)
    subset_rank = _subset_ranks(
        scores.gather(1, target[:, None]).squeeze(1),
        scores.gather(1, members),
        target,
        reference,
        members,
        largest,
    )
    return _cirr_result(rank, subset_rank, ks, subset_ks)


def fashioniq_recall(
    scores: Tensor,
    target: Tensor,
    reference: Tensor | None = None,
    ks: Sequence[int] = (10, 50),
    *,
    largest: bool = True,
) -> dict[str, float]:
    """FashionIQ Recall@k for one category, as fractions: keys ``"R@10"``, ``"R@50"``.

    ``scores`` [Q, G] over the category's gallery, ``target`` long [Q]. The reference is removed
    from the ranking only when ``reference`` is given (protocols A', B, C; protocol A keeps it).
    """
    target = torch.as_tensor(target, dtype=torch.long)
    _check_reference(target, reference)
    rank = rank_of_scores(scores, target, exclude=reference, largest=largest)
    return {f"R@{k}": v for k, v in recall_from_ranks(rank, ks).items()}
