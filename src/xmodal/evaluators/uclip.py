"""``evaluator=uclip``: training-free uncertainty for CLIP image<->text retrieval.

Reimplements "Over the Top-1: Uncertainty-Aware Cross-Modal Retrieval with CLIP" (Gomez, UAI 2025;
code lluisgomez/uCLIP, spec uclip.md). N posterior samples of every caption and image embedding
(MC dropout passes, ensemble members, or one model) give N cosine score matrices S_k; every recall,
bin and curve ranks with their mean S̄. A *confidence* (higher = surer) per query comes from:

- ``top1_similarity``: the query's best score in S̄;
- ``top1_consistency``: the fraction of samples whose own top-1 (query_k against gallery_k, lowest
  index on ties) is the most frequent one; values k/N;
- ``top5_consistency``: the mean Jaccard between each sample's top-5 and the 5 most frequent
  indices (ties: first seen, as ``Counter.most_common``);
- ``adversarial``: tanh of the L2 size of the perturbation of the mean query embedding that flips
  its top-1 against the mean gallery: normalised gradient steps of 0.025 on the margin
  cos(q, g*) − max_{j≠*} cos(q, g_j), at most 50, stopping at the flip (or a zero gradient);
- ``adversarial_linear``: tanh(f / (‖∇f‖ + eps)), f = the gap between the top-2 cosines of the
  mean query, in closed form ‖∇f‖ = ‖ĝ1 − ĝ2 − f·q̂‖ / ‖q‖.

Duplicate gallery rows give the adversarial methods confidence 0 (zero margin and gradient), never
NaN. The oracle confidence 1/rank of the first positive (inf for a correct top-1) draws the
rejection upper bound. All of it is vectorised over queries and streams over blocks of the score
matrices: peak memory is the samples plus one block of ``block_size`` scores, never N matrices.

``arithmetic=fp16_official`` reproduces the released code's float16 arithmetic (fp16 embeddings,
scores, means and adversarial gradients) on any device, by rounding to float16 after each of
those operations; the default ``fp32`` computes in float32 (docs/uclip.md lists the differences).

The evaluator encodes the posterior samples through the embedding cache (an MC-dropout pass is
keyed by its index and seed), so a sweep over methods encodes once, then reports for ``method``
(and every method in ``compare``, under ``test/<method>/...``), per direction (``t2i``: caption
queries; ``i2t``: image queries): ``S``, ``R2``, ``-SR2`` on ``num_bins`` confidence bins, the
extra ``AUROC`` and ``AURC`` of the confidence for a correct top-1 (and ``ECE`` for the one
probability-like confidence, ``top1_consistency``: see :data:`PROBABILITY_METHODS`), the rejection
areas ``rejection/R@k`` (percent) beside the oracle's, and S̄'s ``R@k`` (percent). Rejection curves
and AURC average over the orders of tied confidences (``ties=average``; ``ties=index`` takes
them in query-index order, the released code's sort made deterministic). It writes
``calibration.png``, ``rejection.png`` and ``curves.json`` into the run directory.

On the COCO 5k test with ``data.extended_positives`` set, S̄'s ranking also gives the
extended-positive protocols (:mod:`xmodal.protocols.extended`: COCO 1k/5k, CxC, ECCV Caption,
PMRP) under ``test/<protocol>/<dir>/...``, and every method is calibrated a second time against
each query's ECCV Caption R-Precision instead of its top-1 correctness (the PCME++ target),
over the queries ECCV Caption lists: ``.../<dir>/eccv_R-P/{S,R2,-SR2,num_bins}``, same bins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.errors import check_choice
from xmodal.evaluators.schemas import UCLIP_BLOCK_SIZE, EnsembleMember
from xmodal.metrics.calibration import (
    TIES,
    calibration_scores,
    confidence_aurc,
    confidence_auroc,
    confidence_bins,
    confidence_ece,
    rejection_area,
    rejection_curve,
)
from xmodal.metrics.retrieval import positive_ranks
from xmodal.retrieval.search import order_candidates, rank_of_scores, topk, topk_scores

if TYPE_CHECKING:
    from xmodal.data.extended import ExtendedPositives
    from xmodal.protocols.extended import ExtendedResult

METHODS = (
    "top1_similarity",
    "top1_consistency",
    "top5_consistency",
    "adversarial",
    "adversarial_linear",
)
#: Confidences that estimate the probability of a correct top-1, the only ones ECE is reported for:
#: the fraction of posterior samples agreeing on it. A cosine (top1_similarity), a mean Jaccard
#: (top5_consistency) or tanh of a distance (adversarial*) lies in [0, 1] without being one.
PROBABILITY_METHODS = ("top1_consistency",)
SAMPLERS = ("mcd", "ensemble", "single")
VARIANTS = ("corrected", "official")
#: ``fp32``: every score, mean and gradient in float32 (the default). ``fp16_official``: the
#: released code's arithmetic (its embeddings stay float16 and all its maths runs in float16 on the
#: GPU), emulated on any device by rounding to float16 after each operation it does in float16.
ARITHMETICS = ("fp32", "fp16_official")
#: The methods whose official confidences are float16 tensors under ``fp16_official`` (the
#: consistency ones are Python fractions, float32 either way).
FP16_CONFIDENCES = ("top1_similarity", "adversarial", "adversarial_linear")
DIRECTIONS = ("t2i", "i2t")
log = logging.getLogger("xmodal")

DEFAULT_BLOCK_SIZE = UCLIP_BLOCK_SIZE  # scores per block (64 MB in float32)
OPTIONS = {"step_size": 0.025, "max_iter": 50, "eps": 1e-8, "top_k": 5}


# ----------------------------------------------------------------------------------------------
# Posterior samples and the streaming pass over their score matrices
# ----------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What one pass over the blocks of S_1..S_N (texts x images) collects.

    ``text_max`` / ``image_max``: best score of each caption / image in S̄. ``text_top`` [N, T, k] /
    ``image_top`` [N, I, k]: each sample's own top-k gallery indices (best first, lowest index on
    ties), when ``sample_k > 0``. ``text_ranks`` / ``image_ranks``: rank of the first positive
    in S̄, capped at ``depth`` (a miss), when ``caption_image`` was given.
    """

    sample_k: int
    depth: int
    text_max: Tensor
    image_max: Tensor
    text_top: Tensor | None = None
    image_top: Tensor | None = None
    text_ranks: Tensor | None = None
    image_ranks: Tensor | None = None


def fp16_round(x: Tensor) -> Tensor:
    """``x`` rounded to the nearest float16 and returned as float32: the result of one float16
    operation of the official code (which computes in float32 inside the op and rounds its output,
    as CUDA and CPU half kernels do), reproduced on any device."""
    return x.half().float()


def _identity(x: Tensor) -> Tensor:
    return x


def _normalize(x: Tensor, fp16: bool = False) -> Tensor:
    """``F.normalize(x, dim=-1)``; with ``fp16`` as the official code does it on float16
    embeddings: the norm is rounded to float16, then the quotient."""
    if not fp16:
        return F.normalize(x, dim=-1)
    return fp16_round(x / fp16_round(x.norm(dim=-1, keepdim=True)).clamp_min(1e-12))


def mean_cosine(queries: Tensor, gallery: Tensor, fp16: bool = False) -> Tensor:
    """S̄ of a block: ``queries`` [q, N, D] and ``gallery`` [g, N, D] normalised samples ->
    mean over the N samples of their cosines, [q, g] (a ``score_fn`` of the chunked search).
    ``fp16``: each S_k and their mean rounded to float16 (``arithmetic=fp16_official``)."""
    scores = torch.bmm(queries.transpose(0, 1), gallery.permute(1, 2, 0))
    if not fp16:
        return scores.mean(0)
    return fp16_round(fp16_round(scores).mean(0))


def _merge_top(
    running: tuple[Tensor, Tensor] | None, new: tuple[Tensor, Tensor], k: int
) -> tuple[Tensor, Tensor]:
    """Merge two best-first candidate lists row by row and keep the best k (tie rule of search)."""
    if running is None:
        return new
    values, indices = order_candidates(
        torch.cat([running[0], new[0]], 1), torch.cat([running[1], new[1]], 1)
    )
    return values[:, :k], indices[:, :k]


def _sample_tops(
    scores: Tensor, k: int, t0: int, running: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Each sample's top-k of a block ``scores`` [N, c, I] (rows: captions t0.., columns: images),
    best first with the lowest index on ties: (caption tops [N, c, k], running image tops merged
    with this block's, as (values, caption indices) [N * I, k])."""
    n, rows, num_images = scores.shape
    if k == 1:  # argmax / max return the first maximal index: no sort needed
        values, idx = scores.max(1)  # [N, I], over this block's captions
        values, idx = values.reshape(-1, 1), idx.reshape(-1, 1) + t0
        if running is not None:  # earlier blocks hold lower caption indices: they win ties
            better = values > running[0]
            values = torch.where(better, values, running[0])
            idx = torch.where(better, idx, running[1])
        return scores.argmax(2, keepdim=True), (values, idx)
    text_top = topk_scores(scores.reshape(-1, num_images), k)[1].reshape(n, rows, k)
    by_image = [topk_scores(sample.T, min(k, rows)) for sample in scores]  # no transposed copy
    values = torch.cat([v for v, _ in by_image])
    idx = torch.cat([i for _, i in by_image]) + t0
    return text_top, _merge_top(running, (values, idx), k)


class Posterior:
    """N posterior samples of the caption and image embeddings, with uCLIP's maths on them.

    ``text_samples`` float [N, T, D] and ``image_samples`` float [N, I, D] are raw (unnormalised)
    embeddings; ``caption_image`` long [T] (the image of each caption) is needed for ranks and the
    oracle. The cosine of sample k is S_k = normalize(text_k) @ normalize(image_k).T and
    S̄ = mean_k S_k; neither is ever held beyond one block of ``block_size`` scores.

    ``arithmetic="fp16_official"`` reproduces the released code's float16 arithmetic (see
    :data:`ARITHMETICS` and docs/uclip.md): the samples are rounded to float16, and so is the
    result of every operation the official code does in float16 (norms, normalised vectors, each
    S_k, S̄, the adversarial margins, gradients, steps and radii, tanh); the maths itself runs in
    float32, so the result does not depend on the device. Confidences of
    :data:`FP16_CONFIDENCES` are then float16 tensors, like the official ones.
    """

    def __init__(
        self,
        text_samples: Tensor,
        image_samples: Tensor,
        caption_image: Tensor | None = None,
        depth: int = 10,
        block_size: int = DEFAULT_BLOCK_SIZE,
        arithmetic: str = "fp32",
    ) -> None:
        check_choice("arithmetic", arithmetic, ARITHMETICS)
        self.arithmetic = arithmetic
        self.fp16 = arithmetic == "fp16_official"
        self._round = fp16_round if self.fp16 else _identity
        if text_samples.ndim != 3 or image_samples.ndim != 3:
            raise ValueError(
                "text_samples and image_samples must be [N, T, D] and [N, I, D] (N posterior "
                f"samples; N = 1 for one model), got {tuple(text_samples.shape)} and "
                f"{tuple(image_samples.shape)}"
            )
        if text_samples.shape[0] != image_samples.shape[0] or (
            text_samples.shape[2] != image_samples.shape[2]
        ):
            raise ValueError(
                f"text_samples {tuple(text_samples.shape)} and image_samples "
                f"{tuple(image_samples.shape)} must share N (samples) and D (embedding size)"
            )
        if min(text_samples.shape[:2]) < 1 or image_samples.shape[1] < 1:
            raise ValueError("need at least one sample, one caption and one image")
        text_samples, image_samples = text_samples.float(), image_samples.float()
        if self.fp16:  # the official embeddings are the float16 outputs of autocast
            text_samples, image_samples = fp16_round(text_samples), fp16_round(image_samples)
        # raw means: the adversarial methods
        self.text_mean = self._round(text_samples.mean(0))
        self.image_mean = self._round(image_samples.mean(0))
        self.text = _normalize(text_samples, self.fp16).contiguous()
        self.image = _normalize(image_samples, self.fp16).contiguous()
        self.caption_image = None
        if caption_image is not None:
            self.caption_image = torch.as_tensor(
                caption_image, dtype=torch.long, device=self.text.device
            )
            if self.caption_image.shape != (self.text.shape[1],):
                raise ValueError(
                    f"caption_image must give the image of each of the {self.text.shape[1]} "
                    f"captions, got shape {tuple(self.caption_image.shape)}"
                )
        self.depth = int(depth)
        self.block_size = int(block_size)
        self._scan: Scan | None = None

    @property
    def num_samples(self) -> int:
        return self.text.shape[0]

    def _blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        """``(t0, t1, S[:, t0:t1])``: the N sample score matrices, a few caption rows at a time."""
        n, num_texts, num_images = self.num_samples, self.text.shape[1], self.image.shape[1]
        rows = max(1, self.block_size // (n * num_images))
        image_t = self.image.transpose(1, 2)
        for t0 in range(0, num_texts, rows):
            t1 = min(t0 + rows, num_texts)
            yield t0, t1, self._round(torch.bmm(self.text[:, t0:t1], image_t))

    def mean_scores(self, queries: Tensor, gallery: Tensor) -> Tensor:
        """S̄ of a block of normalised samples ([q, N, D], [g, N, D]) in this posterior's
        arithmetic: the ``score_fn`` of a chunked search over S̄."""
        return mean_cosine(queries, gallery, self.fp16)

    def scan(self, sample_k: int = 0) -> Scan:
        """One pass over S_1..S_N collecting what the methods and recalls need; cached, and a
        later call asking for no larger ``sample_k`` returns the cached pass."""
        if self._scan is not None and self._scan.sample_k >= sample_k:
            return self._scan
        n, num_texts, num_images = self.num_samples, self.text.shape[1], self.image.shape[1]
        for what, size in (("images", num_images), ("captions", num_texts)):
            if sample_k > size:
                raise ValueError(f"top-{sample_k} per sample needs at least {sample_k} {what}")
        device, depth, caption_image = self.text.device, self.depth, self.caption_image
        text_max = torch.empty(num_texts, device=device)
        image_max = torch.full((num_images,), -math.inf, device=device)
        text_top = torch.empty(n, num_texts, sample_k, dtype=torch.long, device=device)
        text_ranks = torch.empty(num_texts, dtype=torch.long, device=device)
        image_top = best_texts = None
        images = torch.arange(num_images, device=device)
        for t0, t1, scores in self._blocks():
            mean = self._round(scores.mean(0))  # the S̄ rows t0:t1
            text_max[t0:t1] = mean.max(1).values
            image_max = torch.maximum(image_max, mean.max(0).values)
            if sample_k:
                text_top[:, t0:t1], image_top = _sample_tops(scores, sample_k, t0, image_top)
            if caption_image is not None:
                positives = caption_image[t0:t1, None] == images[None]
                text_ranks[t0:t1] = positive_ranks(mean, positives, depth)
                values, idx = topk_scores(mean.T, min(depth, t1 - t0))
                best_texts = _merge_top(best_texts, (values, idx + t0), depth)
            del scores  # before the next block is computed
        scan = Scan(sample_k, depth, text_max, image_max)
        if sample_k:
            scan.text_top = text_top
            scan.image_top = image_top[1].reshape(n, num_images, sample_k)
        if caption_image is not None:
            values, idx = best_texts
            scan.text_ranks = text_ranks
            scan.image_ranks = positive_ranks(values, caption_image[idx] == images[:, None], depth)
        self._scan = scan
        return scan

    def ranks(self) -> dict[str, Tensor]:
        """Rank of each query's first positive in S̄, capped at ``depth``: ``{"t2i", "i2t"}``."""
        if self.caption_image is None:
            raise ValueError("ranks need caption_image (the image of each caption)")
        scan = self.scan()
        return {"t2i": scan.text_ranks, "i2t": scan.image_ranks}

    # -- the five confidences -------------------------------------------------------------------

    def confidence(self, method: str, **options: Any) -> tuple[Tensor, Tensor]:
        """``(caption confidence [T], image confidence [I])`` of one method (see module doc).

        Options: ``step_size`` and ``max_iter`` (adversarial), ``eps`` (adversarial_linear),
        ``top_k`` (top5_consistency).
        """
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(OPTIONS)}")
        conf = self._confidence(method, {**OPTIONS, **options})
        if self.fp16 and method in FP16_CONFIDENCES:  # the official float16 tensors
            return conf[0].half(), conf[1].half()
        return conf

    def _confidence(self, method: str, opts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        block, fp16 = self.block_size, self.fp16
        if method == "top1_similarity":
            scan = self.scan()
            return scan.text_max, scan.image_max
        if method == "top1_consistency":
            scan = self.scan(sample_k=1)
            return _mode_fraction(scan.text_top[..., 0]), _mode_fraction(scan.image_top[..., 0])
        if method == "top5_consistency":
            k = int(opts["top_k"])
            scan = self.scan(sample_k=k)
            return (
                _topk_agreement(scan.text_top[..., :k]),
                _topk_agreement(scan.image_top[..., :k]),
            )
        if method == "adversarial":
            step, iters = float(opts["step_size"]), int(opts["max_iter"])
            text = _adversarial_radius(self.text_mean, self.image_mean, step, iters, block, fp16)
            image = _adversarial_radius(self.image_mean, self.text_mean, step, iters, block, fp16)
            return self._round(torch.tanh(text)), self._round(torch.tanh(image))
        if method == "adversarial_linear":
            eps = float(opts["eps"])
            return (
                _linear_confidence(self.text_mean, self.image_mean, eps, block, fp16),
                _linear_confidence(self.image_mean, self.text_mean, eps, block, fp16),
            )
        raise ValueError(f"unknown uCLIP method {method!r}; expected one of {', '.join(METHODS)}")

    def oracle(self) -> tuple[Tensor, Tensor]:
        """``1 / rank`` of each query's first positive in S̄ (inf when it is the top-1; 0 for an
        image without captions): the rejection upper bound. Two passes, exact full ranks."""
        if self.caption_image is None:
            raise ValueError("the oracle needs caption_image (the image of each caption)")
        device, caption_image = self.text.device, self.caption_image
        num_texts, num_images = self.text.shape[1], self.image.shape[1]
        text_rank = torch.empty(num_texts, dtype=torch.long, device=device)
        positive = torch.empty(num_texts, device=device)
        for t0, t1, scores in self._blocks():
            mean = self._round(scores.mean(0))
            target = caption_image[t0:t1]
            text_rank[t0:t1] = rank_of_scores(mean, target)
            positive[t0:t1] = mean.gather(1, target[:, None]).squeeze(1)
        # each image's best caption (lowest index among equal scores), then count what beats it
        best = torch.full((num_images,), -math.inf, device=device)
        best = best.scatter_reduce(0, caption_image, positive, "amax")
        texts = torch.arange(num_texts, device=device)
        is_best = positive == best[caption_image]
        best_text = torch.full((num_images,), num_texts, dtype=torch.long, device=device)
        best_text = best_text.scatter_reduce(0, caption_image[is_best], texts[is_best], "amin")
        image_rank = torch.zeros(num_images, dtype=torch.long, device=device)
        for t0, t1, scores in self._blocks():
            mean = self._round(scores.mean(0))
            ahead = (mean > best) | ((mean == best) & (texts[t0:t1, None] < best_text))
            image_rank += ahead.sum(0)
        image_conf = 1.0 / image_rank.float()
        image_conf[best_text == num_texts] = 0.0
        return 1.0 / text_rank.float(), image_conf


def _vote_counts(votes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tally each row of ``votes`` [Q, P] (gallery indices): ``(index, count, first position)``
    per distinct index, as [Q, P] tensors padded with count 0 (runs of a stable sort)."""
    width = votes.shape[1]
    values, position = votes.sort(dim=1, stable=True)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    run = starts.long().cumsum(1) - 1
    count = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run))
    first = torch.full_like(run, width).scatter_reduce_(1, run, position, "amin")
    index = torch.zeros_like(values).scatter_(1, run, values)
    return index, count, first


def _mode_fraction(top1: Tensor) -> Tensor:
    """[N, Q] per-sample top-1 indices -> count of the most frequent one / N, per query."""
    _, count, _ = _vote_counts(top1.T)
    return (count.max(1).values.double() / top1.shape[0]).float()


def _topk_agreement(top: Tensor) -> Tensor:
    """[N, Q, k] per-sample top-k -> mean Jaccard between each sample's top-k set and the
    consensus: the k most frequent indices, ties broken by first appearance (sample order, then
    rank within the sample), as ``Counter(...).most_common(k)`` in the official code."""
    n, num_queries, k = top.shape
    per_sample = top.permute(1, 0, 2)  # [Q, N, k]
    index, count, first = _vote_counts(per_sample.reshape(num_queries, n * k))
    key = torch.where(count > 0, count * (n * k + 1) + (n * k - first), -1)
    consensus = index.gather(1, key.topk(k, dim=1).indices)  # [Q, k]
    inter = (per_sample[:, :, :, None] == consensus[:, None, None, :]).any(3).sum(2).double()
    return ((inter / (2 * k - inter)).sum(1) / n).float()


def _adversarial_radius(
    queries: Tensor,
    gallery: Tensor,
    step_size: float,
    max_iter: int,
    block_size: int,
    fp16: bool = False,
) -> Tensor:
    """L2 size of the fixed-step normalised-gradient walk of each raw query that flips its top-1.

    All queries step together; a query leaves the batch when its top-1 changes or its gradient is
    zero. ∇_q [cos(q, g*) − cos(q, g_r)] = (ĝ* − ĝ_r − m·q̂) / ‖q‖ with m the margin, so no
    autograd is needed; computing m as q̂·(ĝ* − ĝ_r) makes it exactly 0 for duplicate rows.
    ``fp16``: every quantity the official code holds in float16 is rounded to float16 (cosines,
    margin, gradient, its norm, the normalised gradient, the step, the walked query, the radius);
    m is then the difference of the two rounded cosines, as the official loss, still 0 for
    duplicate rows.
    """
    rnd = fp16_round if fp16 else _identity
    gallery_hat = _normalize(gallery, fp16)
    q = queries.clone()
    top1 = torch.empty(len(q), dtype=torch.long, device=q.device)
    active = torch.arange(len(q), device=q.device)
    # a chunk holds its [rows, G] scores and about eight [rows, D] vectors: block_size in all
    rows = max(1, block_size // (len(gallery) + 8 * queries.shape[1]))
    for it in range(max_iter):
        still = []
        for idx in active.split(rows):
            qa = q[idx]
            norm = rnd(qa.norm(dim=1, keepdim=True))
            q_hat = rnd(qa / norm)
            sims = rnd(q_hat @ gallery_hat.T)
            best = sims.argmax(1)
            if it == 0:
                top1[idx] = best
            star = top1[idx]
            flipped = best != star
            star_sim = sims.gather(1, star[:, None])
            sims.scatter_(1, star[:, None], -1e4)
            runner_sim, runner = sims.max(1, keepdim=True)
            diff = gallery_hat[star] - gallery_hat[runner.squeeze(1)]
            if fp16:
                margin = rnd(star_sim - runner_sim)
            else:
                margin = (q_hat * diff).sum(1, keepdim=True)
            grad = rnd((diff - margin * q_hat) / norm)
            grad_norm = rnd(grad.norm(dim=1, keepdim=True))
            moving = ~flipped & (grad_norm.squeeze(1) > 0)
            if fp16:  # the + 1e-10 of the official normalisation vanishes in float16
                update = rnd(step_size * rnd(grad / grad_norm.clamp_min(1e-10)))
            else:
                update = step_size * grad / (grad_norm + 1e-10)
            q[idx[moving]] = rnd(qa[moving] - update[moving])
            still.append(idx[moving])
        active = torch.cat(still) if still else active[:0]
        if active.numel() == 0:
            break
    return rnd(rnd(q - queries).norm(dim=1))


def _linear_confidence(
    queries: Tensor, gallery: Tensor, eps: float, block_size: int, fp16: bool = False
) -> Tensor:
    """tanh(f / (‖∇f‖ + eps)) with f the top-1 minus top-2 cosine of each raw query.

    ``fp16``: cosines, f, ∇f, its norm, the quotient and tanh rounded to float16, as the official
    code computes them; eps (below float16's smallest value) vanishes there, so a zero gap (tied
    top-2 cosines, which float16 makes frequent) gives 0, as in float32 (the official code
    yields NaN only when ∇f is also 0, i.e. for duplicate gallery rows, and zeroes it for image
    queries; 0 here in both directions).
    """
    if len(gallery) < 2:
        return torch.zeros(len(queries), device=queries.device)
    q_hat = _normalize(queries, fp16)
    gallery_hat = _normalize(gallery, fp16)
    rows = max(1, block_size // len(gallery))
    score_fn = (lambda q, g: fp16_round(q @ g.T)) if fp16 else None
    values, idx = topk(q_hat, gallery_hat, 2, chunk_size=rows, score_fn=score_fn)
    diff = gallery_hat[idx[:, 0]] - gallery_hat[idx[:, 1]]
    if not fp16:
        gap = (q_hat * diff).sum(1)
        grad_norm = (diff - gap[:, None] * q_hat).norm(dim=1) / queries.norm(dim=1)
        return torch.tanh(gap / (grad_norm + eps))
    gap = fp16_round(values[:, 0] - values[:, 1])
    norm = fp16_round(queries.norm(dim=1, keepdim=True))
    grad_norm = fp16_round(fp16_round((diff - gap[:, None] * q_hat) / norm).norm(dim=1))
    delta = torch.where(gap == 0, torch.zeros_like(gap), gap / grad_norm.clamp_min(1e-30))
    return fp16_round(torch.tanh(fp16_round(delta)))


def confidence(
    method: str, text_samples: Tensor, image_samples: Tensor, **options: Any
) -> tuple[Tensor, Tensor]:
    """uCLIP confidence of every caption query (t2i) and image query (i2t); higher = surer.

    ``text_samples`` float [N, T, D], ``image_samples`` float [N, I, D]: raw embeddings of N
    posterior samples (N = 1 for one model). ``method``: one of ``METHODS``. Options:
    ``step_size`` (0.025) and ``max_iter`` (50) for ``adversarial``, ``eps`` (1e-8) for
    ``adversarial_linear``, ``top_k`` (5) for ``top5_consistency``, ``block_size`` (scores held
    at once). Returns ``(text_conf [T], image_conf [I])``.
    """
    block_size = int(options.pop("block_size", DEFAULT_BLOCK_SIZE))
    posterior = Posterior(text_samples, image_samples, block_size=block_size)
    return posterior.confidence(method, **options)


def oracle_confidence(
    text_samples: Tensor,
    image_samples: Tensor,
    caption_image: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """``1 / rank`` of each query's first positive in S̄ (inf for a correct top-1): the oracle
    of the rejection upper bound. For N = 1 this is the official ``get_oracle_confidence``."""
    return Posterior(text_samples, image_samples, caption_image, block_size=block_size).oracle()


# ----------------------------------------------------------------------------------------------
# Posterior samplers: MC dropout, deep ensemble, single model
# ----------------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.MultiheadAttention]:
    """The attention of every residual block of both open_clip towers."""
    towers = [getattr(getattr(model, "visual", None), "transformer", None)]
    towers.append(getattr(model, "transformer", None))
    blocks = [list(getattr(tower, "resblocks", [])) for tower in towers]
    found = [getattr(block, "attn", None) for tower in blocks for block in tower]
    if not all(blocks) or not all(isinstance(a, nn.MultiheadAttention) for a in found):
        raise ValueError(
            f"MC dropout needs an open_clip transformer CLIP whose residual blocks use "
            f"nn.MultiheadAttention in both towers; {type(model).__name__} does not. "
            "Use an open_clip ViT backbone (e.g. backbone=openclip_vit_l_14_openai), or "
            "evaluator.sampler=ensemble|single."
        )
    return found


@contextlib.contextmanager
def mc_dropout(model: nn.Module, p: float = 0.2) -> Iterator[int]:
    """Attention dropout ``p`` on every residual block of both towers, active even in eval mode.

    A forward pre-hook switches each nn.MultiheadAttention to training mode for its own call
    only (so Lightning's ``eval()`` and inference mode cannot silently turn the passes into
    copies of each other) and the original dropout and mode come back on exit. Seed the global
    RNG (``torch.manual_seed``) before a pass to make it reproducible. Yields the block count.
    """
    modules = _attention_modules(model)
    saved = [(m, m.dropout) for m in modules]

    def before(module: nn.Module, args: Any, kwargs: Any) -> None:
        module._uclip_mode = module.training
        module.training = True

    def after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        module.training = module._uclip_mode

    handles = []
    try:
        for m in modules:
            m.dropout = float(p)
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, with_kwargs=True))
        yield len(modules)
    finally:
        for h in handles:
            h.remove()
        for m, dropout in saved:
            m.dropout = dropout


def pass_seed(seed: int, index: int, kind: str, rank: int = 0) -> int:
    """The RNG seed of MC-dropout pass ``index`` for ``kind`` (image|text) on ``rank``."""
    blob = f"uclip-mcd/{seed}/{index}/{kind}/{rank}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------


class UCLIPEvaluator:
    """Encode N posterior samples (cached), then confidences, calibration and rejection metrics."""

    def __init__(
        self,
        method: str = "top1_similarity",
        compare: Sequence[str] = (),
        sampler: str = "mcd",
        passes: int = 50,
        dropout: float = 0.2,
        members: Sequence[Any] = (),
        variant: str = "corrected",
        arithmetic: str = "fp32",
        step_size: float = 0.025,
        max_iter: int = 50,
        eps: float = 1e-8,
        top_k: int = 5,
        num_bins: int = 10,
        ks: Sequence[int] = (1, 5, 10),
        rejection_step_t2i: int = 500,
        rejection_step_i2t: int = 100,
        ties: str = "average",
        ece_bins: int = 15,
        block_size: int = DEFAULT_BLOCK_SIZE,
        device: str = "auto",
        cache: bool = True,
        plots: bool = True,
    ) -> None:
        for key, value in [("method", method), *[("compare", m) for m in compare]]:
            check_choice(f"evaluator.{key}", value, METHODS)
        check_choice("evaluator.sampler", sampler, SAMPLERS)
        check_choice("evaluator.variant", variant, VARIANTS)
        check_choice("evaluator.arithmetic", arithmetic, ARITHMETICS)
        self.arithmetic = arithmetic
        check_choice("evaluator.ties", ties, TIES)
        self.ties = ties
        self.methods = [method] + [m for m in dict.fromkeys(compare) if m != method]
        self.sampler, self.variant = sampler, variant
        if sampler == "mcd" and (passes < 1 or not 0.0 <= dropout < 1.0):
            raise ValueError(
                f"evaluator.passes={passes} must be >= 1 and evaluator.dropout={dropout} in [0, 1)"
            )
        self.passes, self.dropout = int(passes), float(dropout)
        self.members = [self._member(m) for m in members]
        if sampler == "ensemble" and not self.members:
            raise ValueError(
                "evaluator.sampler=ensemble needs evaluator.members: a list of {arch, "
                "pretrained, quick_gelu} (conf/evaluator/uclip.yaml lists uCLIP's 12)."
            )
        self.options = {"step_size": step_size, "max_iter": max_iter, "eps": eps, "top_k": top_k}
        self.num_bins, self.ks = int(num_bins), sorted(int(k) for k in ks)
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"evaluator.ks={list(ks)} must be positive ranks, e.g. [1, 5, 10]")
        self.steps = {"t2i": int(rejection_step_t2i), "i2t": int(rejection_step_i2t)}
        self.ece_bins, self.block_size = int(ece_bins), int(block_size)
        self.device, self.use_cache, self.plots = device, cache, plots

    @staticmethod
    def _member(spec: Any) -> EnsembleMember:
        spec = dict(spec)
        if not spec.get("arch"):
            raise ValueError(f"evaluator.members entry {spec} needs an 'arch' (e.g. ViT-L-14)")
        return EnsembleMember(
            str(spec["arch"]), spec.get("pretrained"), bool(spec.get("quick_gelu", False))
        )

    # -- posterior samples ------------------------------------------------------------------------

    def member_config(self, member: EnsembleMember) -> Any:
        """The backbone config of an ensemble member. ``variant=official`` builds every member as
        the plain (GELU) architecture, as the official code does, QuickGELU weights included."""
        from xmodal.backbones import BackboneConfig

        official = self.variant == "official"
        tag = str(member.pretrained).replace("/", "_") if member.pretrained else "random"
        return BackboneConfig(
            kind="open_clip",
            name=f"{member.arch}_{tag}".lower().replace("-", "_"),
            arch=member.arch,
            pretrained=member.pretrained,
            quick_gelu=False if official else member.quick_gelu,
            allow_quick_gelu_mismatch=official,
        )

    def _encode(
        self,
        ctx: Any,
        split: Any,
        extra: dict[str, Any],
        build: Callable[[], tuple[Any, ...]],
        seeds: dict[str, int] | None = None,
        label: str = "single model",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(image [I, D], valid [I], text [T, D]) of one posterior sample through the cache.

        ``build()`` returns (model, preprocess, tokenizer) and is only called on a cache miss;
        ``seeds`` maps the kind (image|text) to the RNG seed set right before encoding it;
        ``label`` names the sample in the progress line (e.g. "MC-dropout pass 3/50").
        """
        from xmodal.data.images import ImageDataset
        from xmodal.retrieval.encode import TextDataset, encode_cached, text_collate

        built: list[Any] = []
        out = {}
        for kind, items in (("image", split.image_paths), ("text", split.captions)):
            key = ctx.embedding_key(kind, items, **extra)
            if "backbone" in extra:  # a member's own weights: its identity pins the transform
                key["transform"] = None
            hit = ctx.cache.load(key)
            log.info(
                "uCLIP %s: %d %ss %s",
                label,
                len(items),
                kind,
                "from the cache" if hit else "encoding",
            )
            if hit is not None:
                out[kind] = (hit["emb"], hit["valid"])
                continue
            if not built:
                built.extend(build())
            model, preprocess, tokenizer = built[:3]
            if kind == "image":
                dataset = ImageDataset(items, preprocess, on_corrupt=ctx.cfg.data.on_corrupt)
                kwargs = {}
            else:
                dataset, kwargs = TextDataset(items), {"collate_fn": text_collate(tokenizer)}
            if seeds is not None:
                torch.manual_seed(seeds[kind])
            out[kind] = encode_cached(
                ctx.cache, key, ctx.trainer, model, dataset, kind, **kwargs, **ctx.loader_kwargs()
            )
        return out["image"][0], out["image"][1], out["text"][0]

    def _samples(self, ctx: Any, split: Any) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield (image, valid, text) for every posterior sample of the configured sampler."""
        from xmodal import backbones

        if self.sampler == "mcd":
            yield from self._mcd_samples(ctx, split)
            return
        run_backbone = backbones.as_config(ctx.cfg.backbone)
        if self.sampler == "ensemble":
            yield from self._member_samples(ctx, split, self.members)
        elif self.variant == "official" and run_backbone.quick_gelu:
            # the official single model: the GELU architecture on the QuickGELU weights
            member = EnsembleMember(run_backbone.arch, run_backbone.pretrained, True)
            yield from self._member_samples(ctx, split, [member])
        else:  # the run's model, under the retrieval evaluator's cache keys
            yield self._encode(ctx, split, {}, lambda: (ctx.model, ctx.preprocess, ctx.tokenizer))

    def _mcd_samples(self, ctx: Any, split: Any) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """MC-dropout passes of the run's model; pass i is seeded from (seed, i, kind, rank)."""
        rank = int(ctx.trainer.global_rank)
        with mc_dropout(ctx.model, self.dropout):
            for index in range(self.passes):
                extra = {
                    "sampler": "mcd",
                    "dropout": self.dropout,
                    "pass": index,
                    "seed": int(ctx.cfg.seed),
                    "batch_size": int(ctx.cfg.data.batch_size),  # they decide the masks too
                    "world_size": int(ctx.trainer.world_size),
                }
                seeds = {k: pass_seed(ctx.cfg.seed, index, k, rank) for k in ("image", "text")}
                label = f"MC-dropout pass {index + 1}/{self.passes}"
                yield self._encode(
                    ctx,
                    split,
                    extra,
                    lambda: (ctx.model, ctx.preprocess, ctx.tokenizer),
                    seeds,
                    label,
                )

    def _member_samples(
        self, ctx: Any, split: Any, members: Sequence[EnsembleMember]
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One sample per member, each built by the backbone factory only on a cache miss."""
        from xmodal import backbones

        for index, member in enumerate(members):
            if "/" in str(member.pretrained) and not Path(str(member.pretrained)).is_file():
                raise FileNotFoundError(
                    f"evaluator.members[{index}].pretrained={member.pretrained}: no such "
                    "checkpoint file. Fix: point it at an existing file or an open_clip tag (the "
                    "shapes ensemble's extra members come from `xmodal-train "
                    "experiment=uclip/shapes_ens_member seed=<n>`)."
                )
            cfg = self.member_config(member)
            extra = {"backbone": backbones.identity(cfg)}
            label = f"ensemble member {index + 1}/{len(members)} ({cfg.name})"
            build = lambda cfg=cfg: backbones.build(cfg)  # noqa: E731 - built on a cache miss only
            yield self._encode(ctx, split, extra, build, label=label)

    def posterior_samples(self, ctx: Any, split: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(text [N, T, D], image [N, I, D], valid [I])`` of every posterior sample."""
        text = image = valid = None
        count = {"mcd": self.passes, "ensemble": len(self.members), "single": 1}[self.sampler]
        for n, (img, ok, txt) in enumerate(self._samples(ctx, split)):
            if text is None:
                text = torch.empty(count, *txt.shape)
                image = torch.empty(count, *img.shape)
                valid = ok.clone()
            text[n], image[n] = txt, img
            valid &= ok
        return text, image, valid

    # -- metrics ---------------------------------------------------------------------------------

    def rejection(self, conf: Tensor, ranks: Tensor, step: int) -> tuple[dict, dict]:
        """Rejection curves of one direction for every k: (areas in percent, curves)."""
        areas, curves = {}, {}
        for k in self.ks:
            removed, recall = rejection_curve(conf, ranks < k, step, ties=self.ties)
            areas[f"R@{k}"] = 100.0 * rejection_area(removed, recall)
            curves[f"R@{k}"] = [removed.tolist(), recall.tolist()]
        return areas, curves

    def direction_metrics(
        self, conf: Tensor, ranks: Tensor, step: int, probability: bool = False
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Calibration and rejection metrics of one direction: (scalars, curves for the plots).
        ``probability``: the confidence estimates P(correct top-1), so ECE is reported too."""
        correct = ranks < 1
        bins = confidence_bins(conf, correct, self.num_bins)
        scalars: dict[str, Any] = dict(calibration_scores(bins))
        scalars["AUROC"] = confidence_auroc(conf, correct)
        scalars["AURC"] = confidence_aurc(conf, correct, ties=self.ties)
        if probability:
            scalars["ECE"] = confidence_ece(conf, correct, self.ece_bins)
        scalars["num_bins"] = len(bins)
        areas, rejection = self.rejection(conf, ranks, step)
        scalars.update({f"rejection/{key}": area for key, area in areas.items()})
        return scalars, {"bins": [list(b) for b in bins], "rejection": rejection}

    def eccv_calibration(
        self, conf: Tensor, rprecision: Tensor
    ) -> tuple[dict[str, float], list[list[float]]]:
        """S / R² / −S·R² of one direction with each query's ECCV Caption R-Precision as the
        target (NaN = a query ECCV Caption does not list, left out): (scalars, bins)."""
        listed = ~rprecision.isnan()
        if not listed.any():  # every query ECCV Caption lists was dropped (data.on_corrupt=skip)
            return {"S": math.nan, "R2": math.nan, "-SR2": math.nan, "num_bins": 0}, []
        bins = confidence_bins(conf[listed], rprecision[listed], self.num_bins)
        scalars: dict[str, Any] = dict(calibration_scores(bins))
        scalars["num_bins"] = len(bins)
        return scalars, [list(b) for b in bins]

    def evaluate(self, ctx: Any) -> dict[str, Any]:
        """Posterior samples of the split (cached), then every metric; plots on rank 0."""
        from xmodal.data.base import RetrievalSplit
        from xmodal.evaluators.base import dataset_split
        from xmodal.evaluators.retrieval import drop_invalid_images, extended_positives, kept_ids

        what = "an image-text dataset (coco, flickr30k)"
        split = dataset_split(ctx, RetrievalSplit, "uclip", what)
        gt = extended_positives(ctx.cfg.data, split)  # before encoding: a bad folder stops early
        ctx.cache.enabled = ctx.cache.enabled and self.use_cache
        text, image, valid = self.posterior_samples(ctx, split)
        if not ctx.is_rank_zero:
            return {}  # every rank encoded its shard; rank 0 alone does the maths and writes
        image, text, caption_image, skipped = drop_invalid_images(
            split, image.transpose(0, 1), text.transpose(0, 1), valid
        )
        device = ctx.trainer.strategy.root_device if self.device == "auto" else self.device
        posterior = Posterior(
            text.transpose(0, 1).to(device),
            image.transpose(0, 1).to(device),
            caption_image,
            depth=max(self.ks),
            block_size=self.block_size,
            arithmetic=self.arithmetic,
        )
        del text, image
        extended = None
        if gt is not None:
            extended = self.extended(posterior, *kept_ids(split, valid), gt)
        metrics, curves = self.score(posterior, extended)
        metrics["test/skipped_images"] = skipped
        if self.plots:
            self.write_outputs(ctx.run_dir, curves)
        return metrics

    def extended(
        self,
        posterior: Posterior,
        image_ids: Sequence[int],
        caption_ids: Sequence[int],
        gt: ExtendedPositives,
    ) -> ExtendedResult:
        """The extended-positive protocols on S̄'s ranking (one chunked search per direction,
        ``block_size`` scores of the N samples at a time)."""
        from xmodal.protocols.extended import coco_extended_metrics

        texts, images = posterior.text.transpose(0, 1), posterior.image.transpose(0, 1)
        gallery = max(texts.shape[0], images.shape[0])
        return coco_extended_metrics(
            images,
            texts,
            image_ids,
            caption_ids,
            gt,
            self.ks,
            chunk_size=max(1, self.block_size // (posterior.num_samples * gallery)),
            gallery_chunk_size=gallery,
            score_fn=posterior.mean_scores,
        )

    def score(
        self, posterior: Posterior, extended: ExtendedResult | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every metric of the run from its posterior samples: (metrics.json entries, curves);
        ``extended``: the extended-positive results of :meth:`extended`, when there are any."""
        sample_k = max(
            [1 if m == "top1_consistency" else 0 for m in self.methods]
            + [self.options["top_k"] if m == "top5_consistency" else 0 for m in self.methods]
        )
        posterior.scan(sample_k)  # one pass serves the recalls and every method
        ranks = {d: r.cpu() for d, r in posterior.ranks().items()}
        metrics: dict[str, Any] = {
            f"test/{d}/R@{k}": 100.0 * (ranks[d] < k).double().mean().item()
            for d in DIRECTIONS
            for k in self.ks
        }
        curves: dict[str, Any] = {"methods": {}, "oracle": {}}
        for d, conf in zip(DIRECTIONS, posterior.oracle()):
            areas, curves["oracle"][d] = self.rejection(conf.cpu(), ranks[d], self.steps[d])
            metrics.update({f"test/{d}/oracle_rejection/{k}": v for k, v in areas.items()})
        for method in self.methods:
            prefix = "test" if method == self.methods[0] else f"test/{method}"
            curves["methods"][method] = {}
            for d, conf in zip(DIRECTIONS, posterior.confidence(method, **self.options)):
                scalars, curve = self.direction_metrics(
                    conf.cpu(), ranks[d], self.steps[d], method in PROBABILITY_METHODS
                )
                metrics.update({f"{prefix}/{d}/{key}": v for key, v in scalars.items()})
                if extended is not None:
                    scalars, curve["eccv_bins"] = self.eccv_calibration(
                        conf.cpu(), extended.eccv_rprecision[d]
                    )
                    metrics.update({f"{prefix}/{d}/eccv_R-P/{k}": v for k, v in scalars.items()})
                curves["methods"][method][d] = curve
        if extended is not None:
            metrics.update({f"test/{k}": v for k, v in extended.metrics.items()})
        metrics.update(
            {
                "test/num_samples": posterior.num_samples,
                "test/num_images": posterior.image.shape[1],
                "test/num_texts": posterior.text.shape[1],
            }
        )
        return metrics, curves

    # -- plots -----------------------------------------------------------------------------------

    def write_outputs(self, run_dir: Any, curves: dict[str, Any]) -> None:
        """``curves.json`` plus ``calibration.png`` (R@1 per uncertainty level, one line per
        method) and ``rejection.png`` (R@k after removing the least confident queries)."""
        from matplotlib.figure import Figure

        from xmodal.runs import atomic_write_text

        run_dir = Path(run_dir)
        atomic_write_text(run_dir / "curves.json", json.dumps(curves, indent=1) + "\n")
        titles = {"t2i": "text-to-image (caption queries)", "i2t": "image-to-text (image queries)"}
        fig = Figure(figsize=(12, 4), layout="tight")
        for ax, d in zip(fig.subplots(1, 2), ("i2t", "t2i")):
            for method, per_dir in curves["methods"].items():
                recall = [b[3] for b in per_dir[d]["bins"]][::-1]  # most uncertain bin first
                s = calibration_scores(per_dir[d]["bins"])["S"]
                ax.plot(
                    range(1, len(recall) + 1), recall, marker="o", label=f"{method} (S={s:.2f})"
                )
            ax.set(title=titles[d], xlabel="uncertainty level (bin)", ylabel="R@1")
            ax.legend(fontsize="small", loc="upper right")
        fig.savefig(run_dir / "calibration.png", dpi=100)
        fig = Figure(figsize=(15, 8), layout="tight")
        axes = fig.subplots(2, len(self.ks), squeeze=False)
        for row, d in zip(axes, ("t2i", "i2t")):
            for ax, k in zip(row, self.ks):
                key = f"R@{k}"
                lines = [
                    (m, per_dir[d]["rejection"][key]) for m, per_dir in curves["methods"].items()
                ]
                lines.append(("upper bound (oracle)", curves["oracle"][d][key]))
                for label, (removed, recall) in lines:
                    area = rejection_area(torch.tensor(removed), torch.tensor(recall))
                    style = {"color": "black", "linestyle": "--"} if "oracle" in label else {}
                    ax.plot(removed, recall, label=f"{label} ({area:.2f})", **style)
                ax.set(title=f"{titles[d]} {key}", xlabel="queries removed", ylabel=key)
                ax.legend(fontsize="small", loc="upper left")
        fig.savefig(run_dir / "rejection.png", dpi=100)
