"""Calibration of a retrieval confidence: R@1 per confidence bin, S / R² / −S·R², rejection curves,
and AUROC / AURC / ECE of the confidence as a predictor of a correct top-1.

Conventions (shared with :mod:`xmodal.evaluators.uclip`):

- A **confidence** is one float per query, higher = surer; uncertainty is its reverse order.
- **hits** is one bool per query: its first positive is in the top k (``rank < k``, ranks from
  :func:`xmodal.metrics.positive_ranks`). Recalls are fractions in [0, 1].
- **Bins** follow uCLIP's ``get_metrics_by_confidence_intervals`` (uclip.md §5): ``num_bins``
  equal-width bins over [min, max] of the confidence (float32 ``linspace``), ``[lo, hi)`` except
  the last, ``[lo, hi]``; empty bins are dropped. A bin is ``(lo, hi, mean confidence, recall)``.
  Infinite confidences (uCLIP's oracle gives +inf to a correct top-1) keep their order: the
  equal-width bins span the finite values, and -inf / +inf each form one more bin below / above
  them (the official ``linspace`` over an infinite range gives NaN edges and no bin at all, so S
  and R² were NaN; merging +inf into the top finite bin would mix the oracle's certain queries
  with its rank-1 misses, and lose the order entirely when the finite values are all equal).
- **S / R² / −S·R²** (ProbVLM's metrics as uCLIP computes them): x = 0..n−1 indexes the surviving
  bins by increasing confidence, y = their recall; S = −Spearman(x, y) (Spearman between
  uncertainty level and recall, ideal −1), R² of the least-squares line, and −S·R² (ideal +1).
- **Rejection curves** (``get_metrics_with_selective_removal``): remove the n least confident
  queries, n = 0, step, 2·step, ... < #queries, and report the recall of the rest; the area is the
  trapezoid rule over n / max(n) (uCLIP's ``plot_rejection.py`` legend; higher is better).
- **Ties.** Where an order of the queries is needed (rejection curves, AURC), ``ties="average"``
  (the default) gives the expected value over every order of the tied queries: a cut through a
  group of g tied queries holding h hits takes h/g of a hit per query it takes. The result then
  depends on the confidences only, never on how the queries happen to be stored (COCO's captions
  are image by image, so a tie-break by index favours some images). ``ties="index"`` breaks ties
  by query index (a stable sort): the released uCLIP code sorts with a plain ``torch.argsort``,
  whose order among ties is unspecified and depends on the device and size; query-index order is
  its deterministic restatement (``tests/uclip_reference.py``). AUROC counts a tie one half, the
  same expectation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from xmodal.metrics.retrieval import positive_ranks

Bin = tuple[float, float, float, float]  # (lo, hi, mean confidence, recall)
TIES = ("average", "index")


def _check(confidence: Tensor, hits: Tensor) -> tuple[Tensor, Tensor]:
    confidence = torch.as_tensor(confidence).detach().flatten().cpu()
    hits = torch.as_tensor(hits).detach().flatten().cpu().bool()
    if confidence.shape != hits.shape:
        raise ValueError(
            f"confidence has {confidence.numel()} values but hits has {hits.numel()}: "
            "give one confidence and one hit per query"
        )
    if confidence.numel() == 0:
        raise ValueError("no queries: confidence and hits are empty")
    if bool(torch.isnan(confidence).any()):
        raise ValueError("confidence contains NaN; every query needs a comparable confidence")
    return confidence, hits


def confidence_bins(confidence: Tensor, hits: Tensor, num_bins: int = 10) -> list[Bin]:
    """Recall per equal-width confidence bin, empty bins dropped (uCLIP's calibration bins).

    ``confidence`` float [Q], ``hits`` bool [Q]. Returns ``(lo, hi, mean confidence, recall)`` per
    non-empty bin in order of increasing confidence. Confidences are compared in float32, as the
    official code does, except float16 ones, compared in float16 against edges rounded to float16
    (the official comparison of a float16 confidence tensor with a Python float edge, e.g. under
    uCLIP's ``arithmetic=fp16_official``). The ``num_bins`` bins span the finite confidences;
    -inf and +inf each get
    a bin of their own below / above them, ``(-inf, -inf, -inf, recall)`` and
    ``(inf, inf, inf, recall)``. Float ``hits`` are a score per query (e.g. its ECCV Caption
    R-Precision): a bin's "recall" is then their mean.
    """
    scores = torch.as_tensor(hits).detach().flatten().cpu()
    confidence, hits = _check(confidence, hits)
    if scores.is_floating_point():  # a score per query, not a hit
        hits = scores.double()
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    conf = confidence if confidence.dtype == torch.float16 else confidence.float()
    finite = torch.isfinite(conf)

    def infinite_bin(value: float) -> list[Bin]:
        inside = conf == value
        return [(value, value, value, hits[inside].float().mean().item())] if inside.any() else []

    bins = infinite_bin(-math.inf)
    if bool(finite.any()):
        low, high = conf[finite].min().item(), conf[finite].max().item()
        edges = torch.linspace(low, high, steps=num_bins + 1)
        for i in range(num_bins):
            lo, hi = edges[i].item(), edges[i + 1].item()
            # a Python float edge: torch compares it in conf's dtype (float16 rounds it)
            upper = conf < hi if i < num_bins - 1 else conf <= hi
            inside = (conf >= lo) & upper  # never an infinite value: one side compares False
            if bool(inside.any()):
                recall = hits[inside].float().mean().item()
                bins.append((lo, hi, conf[inside].mean().item(), recall))
    return bins + infinite_bin(math.inf)


def equal_count_bins(
    confidence: Tensor, values: Tensor, num_bins: int = 10, ties: str = "average"
) -> list[Bin]:
    """PCME++'s calibration bins: ``num_bins`` bins of equally many queries (the PCME++ protocol).

    Source: naver-ai/pcmepp @8829c0d, ``pcmepp/evaluation.py`` ``eval_uncertainty``: the queries
    are sorted by increasing uncertainty (``np.argsort``), cut into ``num_bins`` consecutive bins
    of ``n // num_bins`` queries each, the remainder (the most uncertain queries) dropped, and a
    score is computed per bin over its queries. Here uncertainty is the reverse order of
    ``confidence``: the most confident ``n // num_bins`` queries form the last bin, and the
    ``n % num_bins`` least confident are dropped.

    ``values`` [Q]: bool hits (bin value = its recall) or a float score per query (e.g. ECCV
    Caption mAP@R or R-Precision), NaN for a query the protocol does not list; a bin's value is
    the mean over its listed queries (PCME++ restricts the ECCV / CxC ground truth to the bin's
    queries), NaN when it has none. A bin boundary through tied confidences takes, with
    ``ties="average"``, the expected share of the tied group (sums and listed counts both, as
    :func:`rejection_curve`); ``ties="index"`` breaks ties by query index (PCME++'s unstable
    ``np.argsort`` leaves the order unspecified). Returns ``(lo, hi, mean confidence, value)``
    per bin in order of *increasing confidence* like :func:`confidence_bins`; empty bins cannot
    occur, and fewer than ``num_bins`` queries give no bin.
    """
    scores = torch.as_tensor(values).detach().flatten().cpu()
    confidence, _ = _check(confidence, torch.zeros_like(scores, dtype=torch.bool))
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    scores = scores.double()
    listed = ~torch.isnan(scores)
    size = len(confidence) // num_bins
    if size == 0:
        return []
    # most confident first = increasing uncertainty, PCME++'s order
    sums = _ordered_cumsum(confidence, torch.where(listed, scores, 0.0), True, ties)
    counts = _ordered_cumsum(confidence, listed.double(), True, ties)
    ordered = confidence.double()[torch.argsort(confidence, descending=True, stable=True)]
    bins = []
    for b in range(num_bins):
        lo, hi = b * size, (b + 1) * size
        count = float(counts[hi] - counts[lo])
        value = float(sums[hi] - sums[lo]) / count if count > 0 else math.nan
        inside = ordered[lo:hi]
        bins.append((inside.min().item(), inside.max().item(), inside.mean().item(), value))
    return bins[::-1]


def pearson_calibration(bin_values: Sequence[Bin] | Sequence[float]) -> dict[str, float]:
    """``{"pearson"}``: PCME++'s calibration score, the Pearson correlation between the
    uncertainty level of a bin (0 = most confident) and its value (``np.corrcoef``, as
    naver-ai/pcmepp ``eval_coco_uncertainty`` reports ``unc_linear/<metric>_<mod>``); ideal -1,
    the sign of uCLIP's ``S``. ``bin_values``: bins of :func:`equal_count_bins` (or of
    :func:`confidence_bins`) or plain values, ordered by increasing confidence. Fewer than two
    bins, a constant value or a NaN bin value give NaN.
    """
    y = np.array([b[-1] if isinstance(b, (tuple, list)) else b for b in bin_values], dtype=float)
    if len(y) < 2 or np.isnan(y).any() or np.all(y == y[0]):
        return {"pearson": math.nan}
    level = np.arange(len(y))[::-1]  # uncertainty level: the most confident bin (last) is 0
    return {"pearson": float(np.corrcoef(level, y)[0, 1])}


def binned_recall(
    scores: Tensor, positives: Tensor, confidence: Tensor, num_bins: int = 10, k: int = 1
) -> list[Bin]:
    """R@k per confidence bin on a dense problem: ``scores`` float [Q, G] (higher = better),
    ``positives`` bool [Q, G], ``confidence`` float [Q]; see :func:`confidence_bins`."""
    hits = positive_ranks(scores, positives, k) < k
    return confidence_bins(confidence, hits, num_bins)


def calibration_scores(bin_recalls: Sequence[Bin] | Sequence[float]) -> dict[str, float]:
    """``{"S", "R2", "-SR2"}`` from per-bin recalls ordered by increasing confidence.

    Accepts the bins of :func:`confidence_bins` / :func:`binned_recall` or plain recall values.
    Fewer than two bins, or the same recall in every bin, give NaN (the correlations are
    undefined), as in the official code.
    """
    from scipy.stats import linregress, spearmanr

    y = np.array([b[-1] if isinstance(b, (tuple, list)) else b for b in bin_recalls], dtype=float)
    if len(y) < 2:
        return {"S": math.nan, "R2": math.nan, "-SR2": math.nan}
    x = np.arange(len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant recall: scipy warns and returns NaN
        rho = float(spearmanr(x, y)[0])
        r2 = float(linregress(x, y).rvalue ** 2)
    s = -rho
    return {"S": s, "R2": r2, "-SR2": -s * r2}


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES} (see xmodal.metrics.calibration)")


def _ordered_cumsum(
    confidence: Tensor, values: Tensor, descending: bool = False, ties: str = "average"
) -> Tensor:
    """``out[j]`` = the sum of ``values`` over the first j queries in confidence order, j = 0..Q.

    Ascending confidence (least confident first) unless ``descending``. ``ties="average"``: the
    expected sum over every order of the tied queries, i.e. a cut that takes m of a tie group's g
    queries takes m/g of the group's sum; ``"index"``: tied queries in index order. float64 [Q+1].
    """
    _check_ties(ties)
    order = torch.argsort(confidence, descending=descending, stable=True)
    conf, vals = confidence[order], values[order].double()
    total = torch.cat([torch.zeros(1, dtype=torch.double), vals.cumsum(0)])
    if ties == "index" or len(conf) < 2:
        return total
    starts = torch.ones(len(conf), dtype=torch.bool)
    starts[1:] = conf[1:] != conf[:-1]
    group = starts.long().cumsum(0) - 1  # group of each sorted position
    first = torch.nonzero(starts).flatten()  # position where each group starts
    last = torch.cat([first[1:], torch.tensor([len(conf)])])  # one past its end
    taken = torch.arange(1, len(conf) + 1)  # j queries taken: the j-th is in group[j - 1]
    g = group[taken - 1]
    lo, hi = first[g], last[g]
    share = (total[hi] - total[lo]) / (hi - lo).double()
    expected = total[lo] + (taken - lo).double() * share
    return torch.cat([total[:1], expected])


def rejection_curve(
    confidence: Tensor, hits: Tensor, step: int, ties: str = "average"
) -> tuple[Tensor, Tensor]:
    """Recall after removing the least confident queries: ``(removed [n], recall [n])``.

    ``removed`` = 0, step, 2·step, ... up to (excluding) the number of queries; ``recall`` is the
    float32 hit rate of the remaining queries. A cut through tied confidences removes their
    expected share of hits (``ties="average"``) or the lowest query indices first
    (``ties="index"``, the released uCLIP code's sort made deterministic); see the module doc.
    """
    confidence, hits = _check(confidence, hits)
    if step < 1:
        raise ValueError(f"rejection step must be >= 1, got {step}")
    removed_hits = _ordered_cumsum(confidence, hits, ties=ties)  # least confident first
    removed = torch.arange(0, len(hits), step)
    remaining_hits = hits.double().sum() - removed_hits[removed]
    # float32 like the official hit rate; exact counts under "index" (integers below 2**24)
    recall = remaining_hits.float() / (len(hits) - removed).float()
    return removed, recall


def rejection_area(removed: Tensor, recall: Tensor) -> float:
    """Trapezoid area under ``recall`` against ``removed / max(removed)``; NaN for < 2 points."""
    x = torch.as_tensor(removed).double().cpu().numpy()
    y = torch.as_tensor(recall).double().cpu().numpy()
    if len(x) < 2 or x.max() <= 0:
        return math.nan
    x = x / x.max()
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())


def _both_classes(hits: Tensor) -> bool:
    return bool(hits.any()) and bool((~hits).any())


def confidence_auroc(confidence: Tensor, correct: Tensor) -> float:
    """AUROC of the confidence for telling correct from wrong queries (torchmetrics); ties count
    one half. NaN when every query is correct or every one is wrong."""
    from torchmetrics.functional.classification import binary_auroc

    confidence, correct = _check(confidence, correct)
    if not _both_classes(correct):
        return math.nan
    # dense ranks in [0, 1]: the same AUROC, keeps ties, and torchmetrics never applies a sigmoid
    _, dense = torch.unique(confidence.double(), return_inverse=True)
    preds = dense.double() / max(1, int(dense.max()))
    return float(binary_auroc(preds, correct.long()))


def confidence_aurc(confidence: Tensor, correct: Tensor, ties: str = "average") -> float:
    """Area under the risk-coverage curve (Geifman & El-Yaniv), lower is better.

    Accepting the most confident queries first, the risk at each coverage is the error rate of the
    accepted ones; AURC is its mean over the Q coverages i/Q. Tied confidences: the expected risk
    over every order of the tied queries (``ties="average"``), or index order (``"index"``).
    """
    confidence, correct = _check(confidence, correct)
    errors = _ordered_cumsum(confidence, ~correct, descending=True, ties=ties)[1:]
    accepted = torch.arange(1, len(correct) + 1, dtype=torch.double)
    return float((errors / accepted).mean())


def confidence_ece(confidence: Tensor, correct: Tensor, num_bins: int = 15) -> float:
    """Expected calibration error (L1, ``num_bins`` equal-width bins; torchmetrics) of the
    confidence read as the probability of a correct query. NaN unless it lies in [0, 1].

    Only meaningful for a confidence that estimates that probability (e.g. the fraction of
    posterior samples agreeing on the top-1); a cosine or tanh(distance) in [0, 1] is not one,
    so callers decide (the uCLIP evaluator reports it for ``top1_consistency`` only)."""
    from torchmetrics.functional.classification import binary_calibration_error

    confidence, correct = _check(confidence, correct)
    if bool((confidence < 0).any()) or bool((confidence > 1).any()):
        return math.nan
    ece = binary_calibration_error(confidence.float(), correct.long(), n_bins=num_bins, norm="l1")
    return float(ece)


# ----------------------------------------------------------------------------------------------
# The whole protocol of one run: uCLIP's metric keys, shared by every retrieval uncertainty
# ----------------------------------------------------------------------------------------------

#: Retrieval directions: ``t2i`` (caption queries, image gallery), ``i2t`` (image queries).
DIRECTIONS = ("t2i", "i2t")


def rejection_areas(
    confidence: Tensor, ranks: Tensor, ks: Sequence[int], step: int, ties: str = "average"
) -> tuple[dict[str, float], dict[str, list]]:
    """Rejection curves of one direction for every k: ``({"R@k": area in percent},
    {"R@k": [removed, recall]})``; ``ranks`` = rank of each query's first positive."""
    areas, curves = {}, {}
    for k in ks:
        removed, recall = rejection_curve(confidence, ranks < k, step, ties=ties)
        areas[f"R@{k}"] = 100.0 * rejection_area(removed, recall)
        curves[f"R@{k}"] = [removed.tolist(), recall.tolist()]
    return areas, curves


def direction_calibration(
    confidence: Tensor,
    ranks: Tensor,
    *,
    step: int,
    ks: Sequence[int] = (1, 5, 10),
    num_bins: int = 10,
    ties: str = "average",
    ece_bins: int | None = None,
    pcmepp: bool = False,
) -> tuple[dict[str, float], dict[str, list]]:
    """Calibration and rejection metrics of one direction: ``(scalars, curves for the plots)``.

    ``confidence`` float [Q] (higher = surer), ``ranks`` long [Q] (rank of the first positive,
    capped at max(ks)). Scalars: ``S``, ``R2``, ``-SR2`` over the R@1 of ``num_bins`` confidence
    bins, ``AUROC`` and ``AURC`` of the confidence for a correct top-1, ``ECE`` only when
    ``ece_bins`` is given (a confidence that estimates P(correct top-1)), ``num_bins`` (bins that
    survived) and ``rejection/R@k`` (percent). ``pcmepp``: PCME++'s protocol too,
    ``pcmepp/pearson`` over the R@1 of ``num_bins`` :func:`equal_count_bins`. Curves: ``bins`` and
    ``rejection``.
    """
    confidence = torch.as_tensor(confidence).detach().cpu()
    ranks = torch.as_tensor(ranks).detach().cpu()
    correct = ranks < 1
    bins = confidence_bins(confidence, correct, num_bins)
    scalars: dict[str, float] = dict(calibration_scores(bins))
    scalars["AUROC"] = confidence_auroc(confidence, correct)
    scalars["AURC"] = confidence_aurc(confidence, correct, ties=ties)
    if ece_bins is not None:
        scalars["ECE"] = confidence_ece(confidence, correct, ece_bins)
    scalars["num_bins"] = len(bins)
    if pcmepp:
        equal = equal_count_bins(confidence, correct, num_bins, ties)
        scalars["pcmepp/pearson"] = pearson_calibration(equal)["pearson"]
    areas, rejection = rejection_areas(confidence, ranks, ks, step, ties)
    scalars.update({f"rejection/{key}": area for key, area in areas.items()})
    return scalars, {"bins": [list(b) for b in bins], "rejection": rejection}


def calibration_report(
    confidences: Mapping[str, tuple[Tensor, Tensor]],
    ranks: Mapping[str, Tensor],
    *,
    steps: Mapping[str, int],
    ks: Sequence[int] = (1, 5, 10),
    num_bins: int = 10,
    ties: str = "average",
    oracle: tuple[Tensor, Tensor] | None = None,
    probability: Sequence[str] = (),
    ece_bins: int = 15,
    pcmepp: bool = False,
) -> tuple[dict[str, float], dict[str, dict]]:
    """Every calibration metric of a retrieval run under uCLIP's keys: ``(metrics, curves)``.

    ``confidences``: method name -> (caption confidence [T] for t2i, image confidence [I] for i2t);
    ``ranks``: ``{"t2i", "i2t"}`` -> rank of each query's first positive (capped at max(ks));
    ``steps``: queries removed per rejection-curve point, per direction; ``oracle``: the
    (caption, image) oracle confidences of the rejection upper bound; ``probability``: methods
    whose confidence estimates P(correct top-1), the only ones given an ``ECE``; ``pcmepp``: add
    PCME++'s ``pcmepp/pearson`` (:func:`direction_calibration`).

    Keys: ``test/<d>/R@k`` (percent), ``test/<d>/oracle_rejection/R@k``, then the first method's
    :func:`direction_calibration` scalars under ``test/<d>/...`` and every other method's under
    ``test/<method>/<d>/...``. Curves (``curves.json``, the plots): ``{"methods": {method: {d:
    {"bins", "rejection"}}}, "oracle": {d: rejection curves}}``.
    """
    ranks = {d: torch.as_tensor(r).detach().cpu() for d, r in ranks.items()}
    metrics: dict[str, float] = {
        f"test/{d}/R@{k}": 100.0 * (ranks[d] < k).double().mean().item()
        for d in DIRECTIONS
        for k in ks
    }
    curves: dict[str, dict] = {"methods": {}, "oracle": {}}
    if oracle is not None:
        for d, conf in zip(DIRECTIONS, oracle):
            areas, curves["oracle"][d] = rejection_areas(conf.cpu(), ranks[d], ks, steps[d], ties)
            metrics.update({f"test/{d}/oracle_rejection/{k}": v for k, v in areas.items()})
    for index, (method, pair) in enumerate(confidences.items()):
        prefix = "test" if index == 0 else f"test/{method}"
        curves["methods"][method] = {}
        for d, conf in zip(DIRECTIONS, pair):
            scalars, curve = direction_calibration(
                conf,
                ranks[d],
                step=steps[d],
                ks=ks,
                num_bins=num_bins,
                ties=ties,
                ece_bins=ece_bins if method in probability else None,
                pcmepp=pcmepp,
            )
            metrics.update({f"{prefix}/{d}/{key}": v for key, v in scalars.items()})
            curves["methods"][method][d] = curve
    return metrics, curves


def uncertainty_calibration(
    uncertainty: Tensor, ranks: Tensor, ks: Sequence[int] = (1, 10), num_bins: int = 10
) -> dict[str, float]:
    """How well a per-query uncertainty predicts retrieval failure (confidence = -uncertainty).

    ``ranks`` are the 0-based ranks of each query's target, so a hit at k is ``rank < k``. For
    each k: ``k<k>/S``, ``k<k>/R2``, ``k<k>/-SR2`` over ``num_bins`` equal-width confidence bins
    (:func:`calibration_scores`), ``k<k>/AUROC`` (higher is better) and ``k<k>/AURC`` (lower is
    better) of the confidence for a hit; plus ``mean``, the mean uncertainty.
    """
    uncertainty = torch.as_tensor(uncertainty).detach().flatten().cpu()
    ranks = torch.as_tensor(ranks).detach().flatten().cpu()
    confidence = -uncertainty.double()
    out = {"mean": float(uncertainty.mean())}
    for k in ks:
        hits = ranks < k
        scores = calibration_scores(confidence_bins(confidence, hits, num_bins=num_bins))
        scores["AUROC"] = confidence_auroc(confidence, hits)
        scores["AURC"] = confidence_aurc(confidence, hits)
        out.update({f"k{k}/{name}": value for name, value in scores.items()})
    return out
