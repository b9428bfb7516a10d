"""The composed image retrieval evaluation every CIR method shares (FashionIQ, CIRR).

A CIR method (RUIR, HUG, any later one) subclasses :class:`CIRModule` and supplies only what is its
own: its encoders (:meth:`CIRModule.encode_gallery`, :meth:`CIRModule.encode_queries`,
:meth:`CIRModule.embed`), its score function (:attr:`CIRModule.scoring`, larger- or
smaller-is-better) and its per-query uncertainty (:attr:`Embedded.uncertainty`). Everything else is
done here, the same way for every method:

1. per evaluated subset (a FashionIQ category, a CIRR split) the datamodule
   (:class:`xmodal.data.cir.CIRDataModule`) gives two loaders, 2s the gallery images and 2s+1 the
   queries; each gallery image is encoded once per evaluation, the queries in batches;
2. the outputs of every rank are gathered in dataset order (the duplicates DistributedSampler pads
   with are harmless); what ``limit_*_batches`` left out is dropped from the protocol, with a
   warning;
3. ranking is chunked (no queries x gallery matrix): FashionIQ R@{1,5,10,50} per category and their
   averages, CIRR R@K and Recall_subset@K (:func:`subset_metrics`, :func:`fashioniq_summary`);
4. a split without labels (CIRR test1) gets the two test-server files (:func:`cirr_submission`);
5. at test time each subset's per-query uncertainty, with its target's rank, goes to
   ``<run_dir>/uncertainty/test_<subset>.csv`` (:data:`UNCERTAINTY_COLUMNS`) and its calibration
   to metrics.json.

The metric keys and the CSV layout are documented once, in ``docs/cir.md``.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from xmodal.data.cir import EvalSubset
from xmodal.distributed import gather_by_index
from xmodal.metrics.calibration import uncertainty_calibration
from xmodal.metrics.retrieval import (
    cirr_recall_from_embeddings,
    fashioniq_average,
    recall_from_ranks,
)
from xmodal.retrieval.search import (
    DEFAULT_CHUNK_SIZE,
    ScoreFn,
    gather_scores,
    order_candidates,
    rank_of,
    topk,
)
from xmodal.runs import atomic_write_text

log = logging.getLogger("xmodal")

FIQ_KS = (1, 5, 10, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
#: The hits the per-query uncertainty is calibrated against: R@1 and R@10.
CALIBRATION_KS = (1, 10)
#: The leading columns of every ``uncertainty/<stage>_<subset>.csv``; a method's extra per-query
#: columns (:attr:`Embedded.extras`, e.g. HUG's sigma_r2) follow them.
UNCERTAINTY_COLUMNS = (
    "query",
    "pair_id",
    "reference",
    "target",
    "text",
    "target_rank",
    "uncertainty",
)


@dataclass(frozen=True)
class Scoring:
    """How a method ranks: ``score_fn(query_chunk, gallery_chunk) -> [q, g]`` (None: the dot
    product, cosine on normalised embeddings), ``largest`` (similarities) or not (distances), and
    the queries per ranking chunk."""

    score_fn: ScoreFn | None = None
    largest: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def kwargs(self) -> dict[str, Any]:
        return {"score_fn": self.score_fn, "largest": self.largest, "chunk_size": self.chunk_size}


@dataclass
class Embedded:
    """What a method makes of one subset's gathered outputs: ``queries`` [Q, ...] and ``gallery``
    [G, ...] as its score function takes them, the per-query ``uncertainty`` [Q] (None: the
    method has none; higher = less sure) and ``extras``, further per-query values [Q] exported
    beside it."""

    queries: Tensor
    gallery: Tensor
    uncertainty: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- protocol metrics


def target_ranks(
    subset: EvalSubset, queries: Tensor, gallery: Tensor, scoring: Scoring = Scoring()
) -> Tensor:
    """0-based rank of each query's target (reference excluded when the protocol removes it)."""
    if subset.target is None:
        raise ValueError(f"{subset.split.name} has no targets (labels withheld)")
    exclude = subset.reference if subset.split.remove_reference else None
    return rank_of(queries, gallery, subset.target, exclude=exclude, **scoring.kwargs())


def subset_metrics(
    subset: EvalSubset, queries: Tensor, gallery: Tensor, scoring: Scoring = Scoring()
) -> dict[str, float]:
    """Protocol metrics of one subset in percent, keys without the stage prefix.

    FashionIQ: ``"<cat>/R@{1,5,10,50}"``. CIRR (CLIP4Cir's ``compute_cirr_val_metrics``):
    ``"R@{1,5,10,50}"``, ``"Rs@{1,2,3}"`` and ``"avg"`` = (R@5 + Rs@1) / 2.
    """
    if subset.family == "fashioniq":
        recall = recall_from_ranks(target_ranks(subset, queries, gallery, scoring), FIQ_KS)
        return {f"{subset.prefix}R@{k}": 100.0 * v for k, v in recall.items()}
    metrics = cirr_recall_from_embeddings(
        queries,
        gallery,
        subset.target,
        subset.reference,
        subset.members,
        CIRR_KS,
        CIRR_SUBSET_KS,
        **scoring.kwargs(),
    )
    out = {f"{subset.prefix}{k}": 100.0 * v for k, v in metrics.items()}
    out[f"{subset.prefix}avg"] = (out[f"{subset.prefix}R@5"] + out[f"{subset.prefix}Rs@1"]) / 2
    return out


def fashioniq_summary(metrics: dict[str, float], categories: Sequence[str]) -> dict[str, float]:
    """The FashionIQ aggregates of per-category metrics: ``avg/R@10``, ``avg/R@50``, ``avg`` =
    (avg R@10 + avg R@50) / 2, and ``R@k`` = the mean over categories of R@k for every k."""
    per_cat = {c: {k: metrics[f"{c}/{k}"] for k in ("R@10", "R@50")} for c in categories}
    out = {k: v for k, v in fashioniq_average(per_cat).items() if k.startswith("avg")}
    for k in FIQ_KS:
        out[f"R@{k}"] = sum(metrics[f"{c}/R@{k}"] for c in categories) / len(categories)
    return out


# ----------------------------------------------------------------------------- CIRR test server


def cirr_submission(
    subset: EvalSubset,
    queries: Tensor,
    gallery: Tensor,
    scoring: Scoring = Scoring(),
    *,
    k: int = 50,
    subset_k: int = 3,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two CIRR test-server files (datasets/cir.md §2.3) as dicts.

    ``{"version": "rc2", "metric": "recall", "<pairid>": [k names]}`` (the top k of the gallery
    after removing the reference; k is capped at gallery size - 1) and ``{..., "metric":
    "recall_subset", "<pairid>": [subset_k names]}`` (the best of the 5 non-reference members).
    """
    if subset.members is None or not subset.split.pair_ids:
        raise ValueError(f"{subset.split.name}: a CIRR submission needs pair ids and image sets")
    k = min(k, len(subset.split.gallery) - 1)
    _, top = topk(queries, gallery, k, exclude=subset.reference, **scoring.kwargs())
    member_scores = gather_scores(
        queries, gallery, subset.members, chunk_size=scoring.chunk_size, score_fn=scoring.score_fn
    ).float()
    worst = float("-inf") if scoring.largest else float("inf")
    member_scores[subset.members == subset.reference[:, None]] = worst
    _, ranked = order_candidates(member_scores, subset.members, scoring.largest)
    best_members = ranked[:, :subset_k]  # CIRR groups hold no duplicates; the reference is last
    names = subset.split.gallery
    recall: dict[str, Any] = {"version": "rc2", "metric": "recall"}
    recall_subset: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
    for q, pair_id in enumerate(subset.split.pair_ids):
        recall[str(pair_id)] = [names[j] for j in top[q].tolist()]
        recall_subset[str(pair_id)] = [names[j] for j in best_members[q].tolist()]
    return recall, recall_subset


def write_cirr_submission(
    folder: Path | str, name: str, recall: dict[str, Any], recall_subset: dict[str, Any]
) -> list[Path]:
    """Write ``recall_submission_<name>.json`` and ``recall_subset_submission_<name>.json``
    (CLIP4Cir's file names, keys sorted) atomically; returns their paths."""
    paths = []
    for stem, obj in (("recall_submission", recall), ("recall_subset_submission", recall_subset)):
        path = Path(folder) / f"{stem}_{name}.json"
        atomic_write_text(path, json.dumps(obj, sort_keys=True))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- uncertainty out


def uncertainty_csv(
    subset: EvalSubset, ranks: Tensor, uncertainty: Tensor, extras: dict[str, Tensor]
) -> str:
    """One row per query: :data:`UNCERTAINTY_COLUMNS`, then the method's extra columns. Floats
    are written exactly (``repr``): near-equal uncertainties must stay distinct."""
    split = subset.split
    columns = [uncertainty.tolist(), *(values.tolist() for values in extras.values())]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*UNCERTAINTY_COLUMNS, *extras])
    for i, rank in enumerate(ranks.tolist()):
        pair_id = split.pair_ids[i] if split.pair_ids else ""
        names = [split.reference[i], split.target[i], split.text[i]]
        writer.writerow([i, pair_id, *names, rank, *(repr(float(c[i])) for c in columns)])
    return buf.getvalue()


# ----------------------------------------------------------------------------- the LightningModule


class CIRModule(pl.LightningModule, abc.ABC):
    """Validation and test of a CIR method under the official protocols (see the module docs).

    A subclass sets :attr:`scoring`, :attr:`export_uncertainty` and :attr:`run_dir` and implements
    :meth:`encode_gallery`, :meth:`encode_queries` and :meth:`embed`; its own validation/test
    steps and epoch hooks are these. Metrics are logged as ``<stage>/<key>``; counts, calibration
    and submission counts go to :attr:`extra_metrics` (merged into metrics.json by the pipeline).
    """

    scoring: Scoring = Scoring()
    export_uncertainty: bool = True
    run_dir: Path | None = None

    def __init__(self) -> None:
        super().__init__()
        self.extra_metrics: dict[str, Any] = {}
        self._cir_outputs: dict[int, list[tuple[Tensor, dict[str, Tensor]]]] = {}
        self._query_seconds, self._local_queries = 0.0, 0

    # -- what a method supplies --------------------------------------------------------------
    @abc.abstractmethod
    def encode_gallery(self, pixels: Tensor) -> dict[str, Tensor]:
        """Per-image outputs ``{name: [B, ...]}`` of one batch of gallery images."""

    @abc.abstractmethod
    def encode_queries(self, *inputs: Any) -> dict[str, Tensor]:
        """Per-query outputs ``{name: [B, ...]}`` of one batch of queries: ``(tokens,)``, or
        ``(reference pixels, tokens)`` when the datamodule has ``query_images=True``."""

    @abc.abstractmethod
    def embed(
        self, gallery: dict[str, Tensor], queries: dict[str, Tensor], reference: Tensor
    ) -> Embedded:
        """From one subset's gathered outputs (``reference`` [Q]: each query's reference as a
        gallery index), what :attr:`scoring` ranks and the per-query uncertainty."""

    # -- Lightning hooks ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._cir_outputs.clear()
        self._query_seconds, self._local_queries = 0.0, 0

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val", self.trainer.datamodule.val_subsets)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test", self.trainer.datamodule.test_subsets)

    # -- the protocol ------------------------------------------------------------------------
    def _encode(self, batch: Any, dataloader_idx: int) -> None:
        """Loader 2s: gallery images ``(idx, pixels, valid)``; loader 2s+1: queries
        ``(idx, *inputs)``, their encoding timed."""
        idx, *inputs = batch
        if dataloader_idx % 2 == 0:
            out = self.encode_gallery(inputs[0])
        else:
            start = time.perf_counter()
            out = self.encode_queries(*inputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._query_seconds += time.perf_counter() - start
            self._local_queries += len(idx)
        outputs = {name: value.float() for name, value in out.items()}
        self._cir_outputs.setdefault(dataloader_idx, []).append((idx.to(self.device), outputs))

    def _gathered(self, dataloader_idx: int, n: int) -> tuple[dict[str, Tensor], Tensor]:
        """One loader's outputs of every rank in dataset order, and which rows were encoded."""
        parts = self._cir_outputs.get(dataloader_idx, [])
        if not parts:
            return {}, torch.zeros(n, dtype=torch.bool)
        idx = torch.cat([i for i, _ in parts])
        values = {name: torch.cat([p[name] for _, p in parts]) for name in parts[0][1]}
        return gather_by_index(self, idx, values, n)

    def _subset_outputs(
        self, stage: str, full: EvalSubset, s: int
    ) -> tuple[EvalSubset, dict[str, Tensor], dict[str, Tensor]] | None:
        """(subset, gallery outputs, query outputs) of subset ``s``, limited to what was
        encoded; None when nothing was."""
        gallery, g_seen = self._gathered(2 * s, len(full.split.gallery))
        queries, q_seen = self._gathered(2 * s + 1, len(full.split.text))
        if not gallery or not queries:
            return None
        if g_seen.all() and q_seen.all():
            return full, gallery, queries
        subset, g_keep, q_keep = full.restrict(g_seen, q_seen)  # limit_*_batches
        log.warning(
            "%s %s: evaluating %d of %d queries on %d of %d gallery images (loaders cut short "
            "by limit_%s_batches)",
            stage, full.split.name, len(q_keep), len(q_seen), len(g_keep), len(g_seen), stage,
        )  # fmt: skip
        gallery = {k: v[g_keep.to(v.device)] for k, v in gallery.items()}
        queries = {k: v[q_keep.to(v.device)] for k, v in queries.items()}
        return subset, gallery, queries

    @torch.no_grad()
    def _evaluate(self, stage: str, subsets: Sequence[EvalSubset]) -> None:
        if not self._cir_outputs:
            return
        metrics: dict[str, float] = {}
        categories: list[str] = []
        seconds, ranked = 0.0, 0
        for s, full in enumerate(subsets):
            found = self._subset_outputs(stage, full, s)
            if found is None:
                continue
            subset, gallery, queries = found
            subset = subset.to(self.device)  # ranked where the embeddings are
            self.extra_metrics.update({f"{stage}/{k}": v for k, v in subset.counts().items()})
            start = time.perf_counter()
            embedded = self.embed(gallery, queries, subset.reference)
            if subset.target is None:  # CIRR test1: labels withheld, write the server files
                if stage == "test":
                    self._write_submission(subset, embedded)
                continue
            if not len(subset.target):
                continue
            metrics.update(subset_metrics(subset, embedded.queries, embedded.gallery, self.scoring))
            seconds, ranked = seconds + time.perf_counter() - start, ranked + len(subset.target)
            if subset.family == "fashioniq":
                categories.append(subset.key)
            if stage == "test" and self.export_uncertainty and embedded.uncertainty is not None:
                self._export_uncertainty(stage, subset, embedded)
        if categories and len(categories) == sum(s.family == "fashioniq" for s in subsets):
            metrics.update(fashioniq_summary(metrics, categories))
        if ranked:  # query encoding timed on this rank's queries, the rest on all of them
            encode = self._query_seconds / max(1, self._local_queries)
            metrics["ms_per_query"] = 1000 * (encode + seconds / ranked)
        self._cir_outputs.clear()
        for key, value in metrics.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "avg", rank_zero_only=False)

    def _write_submission(self, subset: EvalSubset, embedded: Embedded) -> None:
        """The two CIRR test-server files in ``<run_dir>/submission/`` (rank 0)."""
        if self.run_dir is None or self.trainer.global_rank != 0:
            return
        recall, recall_subset = cirr_submission(
            subset, embedded.queries, embedded.gallery, self.scoring
        )
        folder = Path(self.run_dir) / "submission"
        paths = write_cirr_submission(folder, subset.split.name, recall, recall_subset)
        self.extra_metrics[f"test/{subset.prefix}submission_queries"] = len(subset.split.pair_ids)
        log.info("CIRR submission files: %s", ", ".join(map(str, paths)))

    def _export_uncertainty(self, stage: str, subset: EvalSubset, embedded: Embedded) -> None:
        """Calibration metrics of the per-query uncertainty against the target's rank, and the
        rows to ``<run_dir>/uncertainty/<stage>_<subset>.csv`` (rank 0)."""
        ranks = target_ranks(subset, embedded.queries, embedded.gallery, self.scoring).cpu()
        uncertainty = embedded.uncertainty.float().cpu()
        calibration = uncertainty_calibration(uncertainty, ranks, CALIBRATION_KS)
        prefix = f"{stage}/{subset.prefix}uncertainty"
        self.extra_metrics.update({f"{prefix}/{k}": v for k, v in calibration.items()})
        if self.run_dir is None or self.trainer.global_rank != 0:
            return
        extras = {k: v.float().cpu() for k, v in embedded.extras.items()}
        path = Path(self.run_dir) / "uncertainty" / f"{stage}_{subset.key or subset.split.name}.csv"
        atomic_write_text(path, uncertainty_csv(subset, ranks, uncertainty, extras))
