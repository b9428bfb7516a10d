"""How well a per-query uncertainty tracks known ambiguity: Spearman's rho and AUROC, per kind.

Each query has an uncertainty (higher = less sure) and a recorded ambiguity: a ``level`` in [0, 1]
and a ``kind`` (``"none"`` for a clear item, level 0), as the shapes world's ``ambiguity.json``
records them (:mod:`xmodal.data.ambiguity`). For a kind k the items compared are those of kind k
together with the clear items (level 0: the baseline every kind is measured against); ``all``
compares every item.

- ``spearman``: Spearman's rank correlation between uncertainty and level over those items (tied
  values get their average rank, as in ``scipy.stats.spearmanr``); NaN if either is constant.
- ``auroc``: the probability that an ambiguous item (level >= ``threshold``) is more uncertain
  than a clear one (level 0), ties counting one half; items with 0 < level < threshold take no
  part. NaN without both. 0.5 is chance, 1 a perfect separation.
- ``count``: the number of ambiguous items (level >= threshold) of the kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from xmodal.metrics.calibration import confidence_auroc

CLEAR = "none"
ALL = "all"
DEFAULT_THRESHOLD = 0.5


def spearman(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Spearman's rho of two equally long sequences (``scipy.stats.spearmanr``: average ranks for
    ties); NaN when fewer than two values or when either sequence is constant."""
    from scipy.stats import spearmanr

    a = np.asarray(torch.as_tensor(x, dtype=torch.float64).flatten())
    b = np.asarray(torch.as_tensor(y, dtype=torch.float64).flatten())
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equally long inputs, got {a.size} and {b.size}")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan  # undefined (scipy would warn and return NaN)
    return float(spearmanr(a, b)[0])


def ambiguity_auroc(uncertainty: Tensor, ambiguous: Tensor) -> float:
    """AUROC of ``uncertainty`` for telling ambiguous (True) from clear (False) items."""
    return confidence_auroc(torch.as_tensor(uncertainty, dtype=torch.float64), ambiguous)


def ambiguity_scores(
    uncertainty: Sequence[float] | Tensor,
    level: Sequence[float] | Tensor,
    kind: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """``<kind>/spearman``, ``<kind>/auroc`` and ``<kind>/count`` for every kind present (and
    ``all``), of one uncertainty per item against the items' recorded levels and kinds. Items
    whose uncertainty is NaN are left out."""
    u = torch.as_tensor(uncertainty, dtype=torch.float64).flatten()
    lv = torch.as_tensor(level, dtype=torch.float64).flatten()
    kinds = list(kind)
    if not len(u) == len(lv) == len(kinds):
        raise ValueError(
            f"one uncertainty, level and kind per item: got {len(u)}, {len(lv)}, {len(kinds)}"
        )
    if bool(((lv < 0) | (lv > 1)).any()):
        raise ValueError("ambiguity levels must lie in [0, 1]")
    keep = ~torch.isnan(u)
    u, lv = u[keep], lv[keep]
    kinds = [k for k, ok in zip(kinds, keep.tolist()) if ok]
    clear = lv == 0
    out: dict[str, float] = {}
    for name in [ALL, *sorted({k for k in kinds if k != CLEAR})]:
        if name == ALL:
            members = torch.ones(len(kinds), dtype=torch.bool)
        else:
            members = clear | torch.tensor([k == name for k in kinds], dtype=torch.bool)
        ambiguous = members & (lv >= threshold) & ~clear
        contrast = ambiguous | (members & clear)
        out[f"{name}/spearman"] = spearman(u[members], lv[members])
        out[f"{name}/auroc"] = (
            ambiguity_auroc(u[contrast], ambiguous[contrast]) if bool(contrast.any()) else math.nan
        )
        out[f"{name}/count"] = int(ambiguous.sum())
    return out
