"""uCLIP's maths and calibration protocol, shared by ``evaluator=uclip`` and ``method=probvlm``.

N posterior samples of every caption and image embedding (``Posterior``: MC-dropout passes,
ensemble members, or one model) give N cosine score matrices S_k; ranks, recalls and the oracle
use their mean S̄, streamed over blocks (never N matrices, nor one full matrix, at once). The five
confidences of uCLIP (``Posterior.confidence``; see ``xmodal.evaluators.uclip``) and the plots and
``curves.json`` of a calibration report (:func:`write_calibration_outputs`). ``method=probvlm``
ranks with one deterministic sample (its frozen CLIP) through the same ``Posterior``, so its R@K,
ranks and oracle are uCLIP's single-model ones. ``arithmetic="fp16_official"`` reproduces the
released code's float16 arithmetic (:data:`ARITHMETICS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.errors import check_choice
from xmodal.evaluators.schemas import UCLIP_BLOCK_SIZE
from xmodal.metrics.calibration import calibration_scores, rejection_area
from xmodal.metrics.retrieval import positive_ranks
from xmodal.retrieval.search import order_candidates, rank_of_scores, topk, topk_scores

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
#: ``fp32``: every score, mean and gradient in float32 (the default). ``fp16_official``: the
#: released code's arithmetic (its embeddings stay float16 and all its maths runs in float16 on the
#: GPU), emulated on any device by rounding to float16 after each operation it does in float16.
ARITHMETICS = ("fp32", "fp16_official")
#: The methods whose official confidences are float16 tensors under ``fp16_official`` (the
#: consistency ones are Python fractions, float32 either way).
FP16_CONFIDENCES = ("top1_similarity", "adversarial", "adversarial_linear")

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
# Plots and curves of a calibration report
# ----------------------------------------------------------------------------------------------


def write_calibration_outputs(
    run_dir: Path | str, curves: Mapping[str, Any], ks: Sequence[int]
) -> None:
    """``curves.json`` (from :func:`calibration_report`) plus ``calibration.png`` (R@1 per
    uncertainty level, one line per method) and ``rejection.png`` (R@k after removing the least
    confident queries, beside the oracle's upper bound) in ``run_dir``."""
    import json

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
            ax.plot(range(1, len(recall) + 1), recall, marker="o", label=f"{method} (S={s:.2f})")
        ax.set(title=titles[d], xlabel="uncertainty level (bin)", ylabel="R@1")
        ax.legend(fontsize="small", loc="upper right")
    fig.savefig(run_dir / "calibration.png", dpi=100)
    fig = Figure(figsize=(15, 8), layout="tight")
    axes = fig.subplots(2, len(ks), squeeze=False)
    for row, d in zip(axes, ("t2i", "i2t")):
        for ax, k in zip(row, ks):
            key = f"R@{k}"
            lines = [(m, per_dir[d]["rejection"][key]) for m, per_dir in curves["methods"].items()]
            if d in curves.get("oracle", {}):
                lines.append(("upper bound (oracle)", curves["oracle"][d][key]))
            for label, (removed, recall) in lines:
                area = rejection_area(torch.tensor(removed), torch.tensor(recall))
                style = {"color": "black", "linestyle": "--"} if "oracle" in label else {}
                ax.plot(removed, recall, label=f"{label} ({area:.2f})", **style)
            ax.set(title=f"{titles[d]} {key}", xlabel="queries removed", ylabel=key)
            ax.legend(fontsize="small", loc="upper left")
    fig.savefig(run_dir / "rejection.png", dpi=100)
