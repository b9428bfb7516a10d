"""uCLIP's maths and calibration protocol, shared by ``evaluator=uclip`` and ``method=probvlm``.

N posterior samples of every caption and image embedding (``Posterior``: MC-dropout passes,
ensemble members, or one model) give N cosine score matrices S_k; ranks, recalls and the oracle
use their mean S̄, streamed over blocks (never N matrices, nor one full matrix, at once). The five
confidences of uCLIP (``Posterior.confidence``; see ``xmodal.evaluators.uclip``) and the plots and
``curves.json`` of a calibration report (:func:`write_calibration_outputs`). ``method=probvlm``
ranks with one deterministic sample (its frozen CLIP) through the same ``Posterior``, so its R@K,
ranks and oracle are uCLIP's single-model ones.
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
    """

    def __init__(
        self,
        text_samples: Tensor,
        image_samples: Tensor,
        caption_image: Tensor | None = None,
        depth: int = 10,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
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
        self.text_mean = text_samples.float().mean(0)  # raw means: the adversarial methods
        self.image_mean = image_samples.float().mean(0)
        self.text = F.normalize(text_samples.float(), dim=-1).contiguous()
        self.image = F.normalize(image_samples.float(), dim=-1).contiguous()
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
            yield t0, t1, torch.bmm(self.text[:, t0:t1], image_t)

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
            mean = scores.mean(0)  # the S̄ rows t0:t1
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
        opts = {**OPTIONS, **options}
        block = self.block_size
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
            text = _adversarial_radius(self.text_mean, self.image_mean, step, iters, block)
            image = _adversarial_radius(self.image_mean, self.text_mean, step, iters, block)
            return torch.tanh(text), torch.tanh(image)
        if method == "adversarial_linear":
            eps = float(opts["eps"])
            return (
                _linear_confidence(self.text_mean, self.image_mean, eps, block),
                _linear_confidence(self.image_mean, self.text_mean, eps, block),
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
            mean = scores.mean(0)
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
            mean = scores.mean(0)
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
    queries: Tensor, gallery: Tensor, step_size: float, max_iter: int, block_size: int
) -> Tensor:
    """L2 size of the fixed-step normalised-gradient walk of each raw query that flips its top-1.

    All queries step together; a query leaves the batch when its top-1 changes or its gradient is
    zero. ∇_q [cos(q, g*) − cos(q, g_r)] = (ĝ* − ĝ_r − m·q̂) / ‖q‖ with m the margin, so no
    autograd is needed; computing m as q̂·(ĝ* − ĝ_r) makes it exactly 0 for duplicate rows.
    """
    gallery_hat = F.normalize(gallery, dim=-1)
    q = queries.clone()
    top1 = torch.empty(len(q), dtype=torch.long, device=q.device)
    active = torch.arange(len(q), device=q.device)
    # a chunk holds its [rows, G] scores and about eight [rows, D] vectors: block_size in all
    rows = max(1, block_size // (len(gallery) + 8 * queries.shape[1]))
    for it in range(max_iter):
        still = []
        for idx in active.split(rows):
            qa = q[idx]
            norm = qa.norm(dim=1, keepdim=True)
            q_hat = qa / norm
            sims = q_hat @ gallery_hat.T
            best = sims.argmax(1)
            if it == 0:
                top1[idx] = best
            star = top1[idx]
            flipped = best != star
            sims.scatter_(1, star[:, None], -1e4)
            diff = gallery_hat[star] - gallery_hat[sims.argmax(1)]
            margin = (q_hat * diff).sum(1, keepdim=True)
            grad = (diff - margin * q_hat) / norm
            grad_norm = grad.norm(dim=1, keepdim=True)
            moving = ~flipped & (grad_norm.squeeze(1) > 0)
            q[idx[moving]] = qa[moving] - step_size * grad[moving] / (grad_norm[moving] + 1e-10)
            still.append(idx[moving])
        active = torch.cat(still) if still else active[:0]
        if active.numel() == 0:
            break
    return (q - queries).norm(dim=1)


def _linear_confidence(queries: Tensor, gallery: Tensor, eps: float, block_size: int) -> Tensor:
    """tanh(f / (‖∇f‖ + eps)) with f the top-1 minus top-2 cosine of each raw query."""
    if len(gallery) < 2:
        return torch.zeros(len(queries), device=queries.device)
    q_hat = F.normalize(queries, dim=-1)
    gallery_hat = F.normalize(gallery, dim=-1)
    rows = max(1, block_size // len(gallery))
    _, idx = topk(q_hat, gallery_hat, 2, chunk_size=rows)
    diff = gallery_hat[idx[:, 0]] - gallery_hat[idx[:, 1]]
    gap = (q_hat * diff).sum(1)
    grad_norm = (diff - gap[:, None] * q_hat).norm(dim=1) / queries.norm(dim=1)
    return torch.tanh(gap / (grad_norm + eps))


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
