"""COCO's extended-positive evaluation (ECCV Caption, CxC, PMRP) as ``eccv_caption`` computes it.

PCME, PCME++ and the probabilistic retrieval work after them report, on the COCO 5k test, beside
COCO's own Recall@K: CxC Recall@K (Crisscrossed Captions' extra positives), ECCV Caption Recall@K,
mAP@R and R-Precision (machine-and-human verified positives of a subset of the queries), and
PMRP, the R-Precision of PCME's plausible matches. The ground truth is read by
:mod:`xmodal.data.extended`; :func:`coco_extended_metrics` computes every number from **one
chunked top-R search per direction** (R = the largest number of positives of any query, at least
the largest K), never a queries x gallery matrix, plus five small searches for COCO 1k.

Definitions (those of ``eccv_caption.Metrics``, checked against it in ``tests/test_extended.py``):

- The evaluated items are the protocol's own: the images of the original ground truth and its
  caption ids (``coco_test_ids.npy``: 5 per image). The Karpathy test's other captions (25,010 -
  25,000: a few images have 6 or 7) take no part in these numbers; the CLIP_benchmark keys
  ``test/<dir>/R@k`` keep them.
- A query counts when the ground truth lists it with at least one positive (eccv_caption
  evaluates the queries its files list; ECCV Caption lists 1,332 captions and 1,261 images); R@K
  is the fraction whose first positive ranks < K; R for mAP@R and R-Precision is the query's
  number of listed positives, including any the evaluated items lack (ECCV Caption lists 2
  captions outside the 25,000 for 2 image queries: they lower those queries' precision, as in
  eccv_caption).
- COCO 1k: the caption ids in fold order cut in 5 blocks; fold f ranks its captions and their
  images only, queries are its items, and R@K is averaged over the 5 folds.
- Rankings use xmodal's tie rule (equal scores to the lower index of the loaded split).

Keys (percent): ``coco1k/<d>/R@k``, ``coco5k/<d>/R@k``, ``cxc/<d>/R@k``, ``eccv/<d>/R@k``,
``eccv/<d>/mAP@R``, ``eccv/<d>/R-P``, ``eccv/<d>/num_queries`` (a count) and, with plausible
matches, ``pm/<d>/R-P`` (PMRP); ``<d>`` is ``i2t`` (image queries) or ``t2i`` (caption queries).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from xmodal.data.extended import ExtendedPositives
from xmodal.metrics.precision import RankedQueries, ranked_positives_from_embeddings
from xmodal.retrieval.search import DEFAULT_CHUNK_SIZE, DEFAULT_GALLERY_CHUNK_SIZE, ScoreFn

log = logging.getLogger("xmodal")

DIRECTIONS = ("i2t", "t2i")
#: direction -> (query modality, gallery modality)
MODALITY = {"i2t": ("image", "caption"), "t2i": ("caption", "image")}
FOLDS = 5
#: ground-truth set -> key prefix; every set gives R@K except pm (R-Precision only)
PREFIX = {"coco": "coco5k", "cxc": "cxc", "eccv": "eccv", "pm": "pm"}


@dataclass
class ExtendedResult:
    """``metrics`` (keys of the module doc, percent) and each query's ECCV Caption R-Precision
    (``eccv_rprecision[d]``, a fraction, float64 over all loaded queries of direction d: NaN for
    a query ECCV Caption does not list), the target of uCLIP's ECCV calibration."""

    metrics: dict[str, float]
    eccv_rprecision: dict[str, Tensor] = field(default_factory=dict)


class _Index:
    """Positions of ids in the loaded split, looked up in bulk."""

    def __init__(self, ids: Sequence[int], what: str) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError(f"the loaded split lists a {what} id twice")
        self.order = np.argsort(self.ids, kind="stable")
        self.sorted = self.ids[self.order]

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Position of each id, -1 where it is not loaded."""
        if not len(self.sorted) or not len(ids):
            return np.full(len(ids), -1, dtype=np.int64)
        at = np.searchsorted(self.sorted, ids).clip(max=len(self.sorted) - 1)
        return np.where(self.sorted[at] == ids, self.order[at], -1)


def _pairs(
    gts: dict[int, list[int]], queries: _Index, gallery: _Index, q_ok: Tensor, g_ok: Tensor
) -> tuple[Tensor, Tensor]:
    """(query position, gallery position) pairs of a ground truth among the evaluated items, and
    R per loaded query: the number of distinct positives the ground truth lists for it (those
    not evaluated count too, as in eccv_caption), 0 for a query it does not list."""
    gts = {q: sorted(set(ids)) for q, ids in gts.items()}
    lengths = np.fromiter(map(len, gts.values()), dtype=np.int64, count=len(gts))
    listed = np.fromiter(gts.keys(), dtype=np.int64, count=len(gts))
    q_ids = np.repeat(listed, lengths)
    g_ids = np.fromiter(itertools.chain.from_iterable(gts.values()), np.int64, int(lengths.sum()))
    pairs = torch.from_numpy(np.stack([queries.positions(q_ids), gallery.positions(g_ids)], 1))
    ok = (pairs >= 0).all(1)
    ok[ok.clone()] = q_ok[pairs[ok, 0]] & g_ok[pairs[ok, 1]]
    num = torch.zeros(len(q_ok), dtype=torch.long)
    at = torch.from_numpy(queries.positions(listed))
    found = at >= 0
    num[at[found]] = torch.from_numpy(lengths)[found]
    return pairs[ok], num * q_ok


def _mean(values: Tensor) -> float:
    return 100.0 * values.double().mean().item() if values.numel() else float("nan")


def _recalls(res: RankedQueries, counted: Tensor, ks: Sequence[int]) -> dict[int, float]:
    return {k: _mean(res.rank[counted] < k) for k in ks}


def coco_extended_metrics(
    images: Tensor,
    texts: Tensor,
    image_ids: Sequence[int],
    caption_ids: Sequence[int],
    gt: ExtendedPositives,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gallery_chunk_size: int = DEFAULT_GALLERY_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
) -> ExtendedResult:
    """Every extended-positive metric of a COCO test split (module doc) in both directions.

    ``images`` [I, ...] and ``texts`` [T, ...] are what ``score_fn`` scores (default: the dot
    product of normalised embeddings); ``image_ids`` / ``caption_ids`` are the loaded items' COCO
    ids, in the same order.
    """
    ks = sorted({int(k) for k in ks})
    if len(image_ids) != images.shape[0] or len(caption_ids) != texts.shape[0]:
        raise ValueError("image_ids and caption_ids must give the id of every image and caption")
    index = {"image": _Index(image_ids, "image"), "caption": _Index(caption_ids, "caption")}
    keep_image = torch.zeros(len(image_ids), dtype=torch.bool)
    found = index["image"].positions(np.fromiter(gt.image_ids, np.int64))
    keep_image[torch.from_numpy(found[found >= 0])] = True
    keep_caption = torch.zeros(len(caption_ids), dtype=torch.bool)
    order = index["caption"].positions(np.asarray(gt.caption_order, dtype=np.int64))
    keep_caption[torch.from_numpy(order[order >= 0])] = True
    if not keep_image.any() or not keep_caption.any():
        raise ValueError(
            f"none of the split's {'images' if not keep_image.any() else 'captions'} is in the "
            f"extended-positive ground truth {gt.source} (is it the COCO 5k test?); set "
            "data.extended_positives=null to evaluate without it"
        )
    keep = {"image": keep_image, "caption": keep_caption}
    items = {"image": images, "caption": texts}
    metrics: dict[str, float] = {}
    result = ExtendedResult(metrics)
    counted_5k: dict[str, Tensor] = {}
    for d in DIRECTIONS:
        q, g = MODALITY[d]
        found = {
            name: _pairs(sets[d], index[q], index[g], keep[q], keep[g])
            for name, sets in gt.sets.items()
        }
        ranked = ranked_positives_from_embeddings(
            items[q],
            items[g],
            {name: pairs for name, (pairs, _) in found.items()},
            max(ks),
            num_positives={name: num for name, (_, num) in found.items()},
            keep=keep[g],
            chunk_size=chunk_size,
            gallery_chunk_size=gallery_chunk_size,
            score_fn=score_fn,
        )
        for name, res in ranked.items():
            counted = res.has_positives
            prefix = f"{PREFIX[name]}/{d}"
            if name == "pm":
                metrics[f"{prefix}/R-P"] = _mean(res.rp[counted])
                continue
            metrics.update({f"{prefix}/R@{k}": v for k, v in _recalls(res, counted, ks).items()})
            if name == "eccv":
                metrics[f"{prefix}/mAP@R"] = _mean(res.ap[counted])
                metrics[f"{prefix}/R-P"] = _mean(res.rp[counted])
                metrics[f"{prefix}/num_queries"] = int(counted.sum())
                result.eccv_rprecision[d] = res.rp.clone()
        counted_5k[d] = ranked["coco"].has_positives
        log.info("extended positives %s: top-%d search of %d queries", d, res.depth, len(res.rank))
    metrics.update(_coco_1k(items, index, gt, counted_5k, ks, chunk_size, score_fn))
    return result


def _coco_1k(
    items: dict[str, Tensor],
    index: dict[str, _Index],
    gt: ExtendedPositives,
    counted_5k: dict[str, Tensor],
    ks: Sequence[int],
    chunk_size: int,
    score_fn: ScoreFn | None,
) -> dict[str, float]:
    """COCO 1k R@K: eccv_caption's 5 folds of the caption ids (``coco_1k_recalls``), averaged."""
    size = len(gt.caption_order) // FOLDS
    if size == 0:
        log.warning("COCO 1k skipped: fewer than %d captions in the ground truth", FOLDS)
        return {}
    t2i = gt.sets["coco"]["t2i"]
    recalls: dict[str, list[dict[int, float]]] = {d: [] for d in DIRECTIONS}
    for f in range(FOLDS):
        fold_captions = np.asarray(gt.caption_order[f * size : (f + 1) * size], dtype=np.int64)
        fold_images = np.unique([i for c in fold_captions for i in t2i[int(c)]]).astype(np.int64)
        pos = {
            "caption": index["caption"].positions(fold_captions),
            "image": index["image"].positions(fold_images),
        }
        # loaded order within the fold, so that ties still go to the lower index of the split
        pos = {m: torch.from_numpy(np.sort(p[p >= 0])) for m, p in pos.items()}
        sub = {m: _Index(index[m].ids[pos[m].numpy()], m) for m in pos}
        for d, (q, g) in MODALITY.items():
            if not len(pos[q]) or not len(pos[g]):
                continue
            every = torch.ones(len(pos[q]), dtype=torch.bool)
            pairs, _ = _pairs(
                gt.sets["coco"][d], sub[q], sub[g], every, torch.ones(len(pos[g]), dtype=bool)
            )
            res = ranked_positives_from_embeddings(
                items[q][pos[q]],
                items[g][pos[g]],
                {"coco": pairs},
                max(ks),
                chunk_size=chunk_size,
                score_fn=score_fn,
            )["coco"]
            # the fold's queries that have a positive at all (a positive outside the fold: a miss);
            # counted_5k is already False for a query outside the evaluated items
            counted = counted_5k[d][pos[q]]
            recalls[d].append(_recalls(res, counted, ks))
    out = {}
    for d, folds in recalls.items():
        for k in ks:
            values = [r[k] for r in folds if not np.isnan(r[k])]
            out[f"coco1k/{d}/R@{k}"] = float(np.mean(values)) if values else float("nan")
    return out
