"""Plain per-query reference of uCLIP's official semantics (uclip.md §2 and §5).

Written from the spec as the official code behaves: lists of N sample embeddings, Python loops over
queries and samples, ``F.cosine_similarity``, ``argmax`` (first index), ``Counter``, autograd for
the adversarial margins, and the N full score matrices kept in memory. It is the ground truth of
``tests/test_uclip.py`` and the baseline of ``benchmarks/bench_uclip.py``; never use it for real
work (it is slow and memory hungry on purpose).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import linregress, spearmanr


def all_scores(txt: list[torch.Tensor], img: list[torch.Tensor]) -> torch.Tensor:
    """The N cosine matrices S_k [N, T, I], all at once."""
    t = F.normalize(torch.stack(txt), dim=-1)
    i = F.normalize(torch.stack(img), dim=-1)
    return torch.bmm(t, i.transpose(1, 2))


def top1_similarity(txt, img):
    mean = all_scores(txt, img).mean(0)
    return mean.max(1).values, mean.T.max(1).values


def _per_query(queries, gallery, fn):
    """fn(the N cosine rows of query q, one per sample) for every query q."""
    out = []
    for q in range(queries[0].shape[0]):
        sims = [F.cosine_similarity(qk[q][None], gk, dim=1) for qk, gk in zip(queries, gallery)]
        out.append(fn(sims))
    return torch.tensor(out)


def _mode_fraction(sims):
    votes = [int(torch.argmax(s)) for s in sims]
    return Counter(votes).most_common(1)[0][1] / len(sims)


def _agreement(sims, top_k=5):
    sets, seen = [], []
    for s in sims:
        idx = torch.topk(s, k=top_k).indices.tolist()
        sets.append(set(idx))
        seen.extend(idx)
    consensus = {i for i, _ in Counter(seen).most_common(top_k)}
    jaccard = [len(a & consensus) / len(a | consensus) for a in sets]
    return sum(jaccard) / len(jaccard)


def _radius(q0, gallery, step_size=0.025, max_iter=50):
    top = int(torch.argmax(F.cosine_similarity(q0[None], gallery, dim=1)))
    q = q0.clone().requires_grad_(True)
    for _ in range(max_iter):
        sim = F.cosine_similarity(q[None], gallery, dim=1)
        if int(torch.argmax(sim)) != top:
            break
        others = sim.clone()
        others[top] = -1e4
        (sim[top] - others.max()).backward()
        grad = q.grad
        if grad is None or grad.norm() == 0:
            break
        with torch.no_grad():
            q = q - step_size * grad / (grad.norm() + 1e-10)
        q = q.detach().requires_grad_(True)
    return (q.detach() - q0).norm()


def _linear(q0, gallery, eps=1e-8):
    q = q0.clone().requires_grad_(True)
    top = torch.sort(F.cosine_similarity(q[None], gallery, dim=1), descending=True).values
    gap = top[0] - (top[1] if top.numel() > 1 else top[0])
    (grad,) = torch.autograd.grad(gap, q)
    return torch.tanh(gap / (grad.norm() + eps)).detach()


def _mean(samples):
    return torch.stack(list(samples)).mean(0)


def _adversarial(queries, gallery):
    g = _mean(gallery)
    return torch.stack([torch.tanh(_radius(q, g)) for q in _mean(queries)])


def _adversarial_linear(queries, gallery):
    g = _mean(gallery)
    return torch.stack([_linear(q, g) for q in _mean(queries)])


#: One direction: ``fn(query samples, gallery samples) -> confidence [Q]`` (lists of N [., D]);
#: the adversarial ones use the means over samples.
ONE_DIRECTION = {
    "top1_consistency": lambda q, g: _per_query(q, g, _mode_fraction),
    "top5_consistency": lambda q, g: _per_query(q, g, _agreement),
    "adversarial": _adversarial,
    "adversarial_linear": _adversarial_linear,
}


def _both(method):
    return lambda txt, img: (ONE_DIRECTION[method](txt, img), ONE_DIRECTION[method](img, txt))


#: Both directions: ``fn(text samples, image samples) -> (text conf [T], image conf [I])``.
METHODS = {"top1_similarity": top1_similarity, **{m: _both(m) for m in ONE_DIRECTION}}


def oracle(txt, img, truth):
    """1 / (0-based rank of the first positive) on sample 0's scores (inf for a correct top-1)."""
    scores = F.normalize(txt[0], dim=-1) @ F.normalize(img[0], dim=-1).T
    out = []
    for s, t in ((scores, truth), (scores.T, truth.T)):
        order = torch.argsort(s, dim=-1, descending=True, stable=True)
        first = torch.gather(t, 1, order).int().argmax(1)
        out.append(1.0 / first)
    return tuple(out)


def hits_at_k(scores, truth, k):
    """CLIP_benchmark: a hit when any positive is in the top k of the row."""
    top = torch.topk(scores, k, dim=1).indices
    return truth.gather(1, top).any(1)


def bins(scores, truth, conf, num_bins=10, k=1):
    """R@k per equal-width confidence bin, empty bins dropped, last bin closed."""
    edges = torch.linspace(conf.min().item(), conf.max().item(), steps=num_bins + 1)
    out = []
    for b in range(num_bins):
        lo, hi = edges[b].item(), edges[b + 1].item()
        if b < num_bins - 1:
            mask = (conf >= lo) & (conf < hi)
        else:
            mask = (conf >= lo) & (conf <= hi)
        idx = torch.where(mask)[0]
        if len(idx) == 0:
            continue
        recall = hits_at_k(scores[idx], truth[idx], k).float().mean().item()
        out.append(((lo, hi), conf[idx].mean().item(), recall))
    return out


def calibration(recalls):
    """(S = -Spearman, R², -S·R²) of per-bin recalls ordered by increasing confidence."""
    x = np.arange(len(recalls))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant recall: Spearman is NaN, as in the official code
        rho = spearmanr(x, recalls)[0]
    r2 = linregress(x, recalls).rvalue ** 2
    return -rho, r2, rho * r2


def rejection(scores, truth, conf, step, k):
    """R@k of the queries left after removing the n least confident, n = 0, step, ..."""
    order = torch.argsort(conf, descending=False, stable=True)
    out = []
    for n in range(0, len(conf) + 1, step):
        rest = order[n:]
        if len(rest) == 0:
            continue
        out.append((n, hits_at_k(scores[rest], truth[rest], k).float().mean().item()))
    return out


def rejection_area(curve):
    d = np.array(curve, dtype=float)
    x = d[:, 0] / np.max(d[:, 0])
    return float((np.diff(x) * (d[1:, 1] + d[:-1, 1]) / 2.0).sum())
