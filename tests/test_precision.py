"""mAP@R and R-Precision against the reference implementation (the eccv_caption package)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eccv_caption._metrics import compute_eccv_metrics, compute_rprecision

from xmodal.metrics import map_at_r, precision_at_r, r_precision, ranked_hits


def _reference(scores: torch.Tensor, positives: torch.Tensor) -> dict[str, float]:
    """eccv_caption's metrics on the same rankings (item ids in xmodal's tie order)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    retrieved = {q: order[q].tolist() for q in range(len(scores))}
    gts = {q: positives[q].nonzero().flatten().tolist() for q in range(len(scores))}
    gts = {q: ids for q, ids in gts.items() if ids}  # queries without positives are left out
    out = compute_eccv_metrics(retrieved, gts)
    out["rprecision_alone"] = compute_rprecision(retrieved, gts)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_eccv_caption_on_random_rankings(seed):
    g = torch.Generator().manual_seed(seed)
    q, n = 40, 60
    # coarse scores: many ties, broken by xmodal's rule (lower gallery index first)
    scores = torch.randint(0, 12, (q, n), generator=g).float()
    positives = torch.rand(q, n, generator=g) < torch.rand(q, 1, generator=g) * 0.3
    positives[0] = False  # a query without positives is left out
    ref = _reference(scores, positives)
    assert map_at_r(scores, positives) == pytest.approx(ref["eccv_map_at_r"], abs=1e-12)
    assert r_precision(scores, positives) == pytest.approx(ref["eccv_rprecision"], abs=1e-12)
    assert r_precision(scores, positives) == pytest.approx(ref["rprecision_alone"], abs=1e-12)


def test_hand_computed_case():
    # one query, 3 positives (items 0, 2, 4); ranking 0, 1, 2, 3, 4 (scores decreasing)
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    positives = torch.tensor([[True, False, True, False, True]])
    # top R=3: 0 (hit, P@1=1), 1 (miss), 2 (hit, P@3=2/3) -> AP@R = (1 + 2/3)/3, RP = 2/3
    assert map_at_r(scores, positives) == pytest.approx((1 + 2 / 3) / 3)
    assert r_precision(scores, positives) == pytest.approx(2 / 3)
    # a tie between items 1 and 2 goes to the lower index: same ranking
    tied = torch.tensor([[5.0, 3.0, 3.0, 2.0, 1.0]])
    assert map_at_r(tied, positives) == pytest.approx((1 + 2 / 3) / 3)


def test_per_query_values_and_no_positives():
    hits = torch.tensor([[True, True, False], [False, False, False]])
    ap, rp = precision_at_r(hits, torch.tensor([2, 0]))
    assert ap[0].item() == 1.0 and rp[0].item() == 1.0
    assert np.isnan(ap[1].item()) and np.isnan(rp[1].item())
    assert ranked_hits(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)).shape == (2, 3)
    with pytest.raises(ValueError, match="no query has a positive"):
        map_at_r(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
