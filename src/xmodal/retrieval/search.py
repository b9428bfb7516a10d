"""Exact chunked top-k search and target ranks, plus an optional faiss index.

Nothing here materialises a full queries x gallery score matrix: queries are processed in chunks
of ``chunk_size`` rows and the gallery in blocks of ``gallery_chunk_size`` items, so at most one
``chunk_size x gallery_chunk_size`` score block is alive at a time, and no row is ever fully
sorted (``torch.topk`` on each block, merged with a running top-k).

**Tie rule (everywhere in xmodal).** Gallery item ``a`` ranks before item ``b`` when its score is
better (higher for ``largest=True``, lower for ``largest=False``), or when the scores are equal and
``a < b``. This is the order of ``torch.sort(scores, descending=largest, stable=True)``: ties go to
the lower gallery index. ``torch.topk`` (and so CLIP_benchmark) leaves the order of ties
unspecified; both agree whenever no tie straddles the k boundary, i.e. almost surely for float
embeddings. Excluded items get the worst possible score (``-inf``, or ``+inf`` when ranking
ascending) and so come last. Scores must not contain NaN.

Scores come from ``score_fn(query_chunk, gallery_chunk) -> [q, g]``; the default is the dot product
(normalise both sides beforehand for cosine). Distance-based methods (HUG ranks by an expected
distance) pass their own ``score_fn`` with ``largest=False``.

**Precision.** The default dot product is computed and returned in float32 at least (float64 stays
float64): bf16 or fp16 embeddings, as a mixed-precision encoder hands them out, are upcast chunk by
chunk. Their dot products in bf16 would keep 8 bits of mantissa, so scores 0.004 apart at cosine
~0.3 tie and ranks follow the tie rule instead of the embeddings. A custom ``score_fn`` sets its own
precision.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_GALLERY_CHUNK_SIZE = 65536


def dot_score(queries: Tensor, gallery: Tensor) -> Tensor:
    """Dot-product scores ``queries @ gallery.T`` (cosine when both sides are normalised)."""
    return queries @ gallery.T


def order_candidates(
    values: Tensor, indices: Tensor, largest: bool = True
) -> tuple[Tensor, Tensor]:
    """Sort candidate lists row-wise by the tie rule: better score first, then lower index.

    Both inputs are ``[Q, n]``; returns them reordered. Two sorts: by index, then a stable sort by
    score, so equal scores keep ascending index order.
    """
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = values.sort(dim=1, descending=largest, stable=True).indices
    return values.gather(1, by_value), indices.gather(1, by_value)


def _block_topk(block: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of ``block`` under the tie rule (indices local to the block).

    ``torch.topk`` picks an arbitrary subset when a tie straddles the k-th place, so we take k + 1
    and, in the (rare) rows where the k-th and (k+1)-th scores are equal, fall back to a stable
    sort of that row.
    """
    n = block.shape[1]
    k = min(k, n)
    kk = min(k + 1, n)
    values, indices = block.topk(kk, dim=1, largest=largest, sorted=True)
    if kk > k:
        tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        values, indices = values[:, :k].clone(), indices[:, :k].clone()
        if tied.numel():
            fixed = block[tied].sort(dim=1, descending=largest, stable=True)
            values[tied] = fixed.values[:, :k]
            indices[tied] = fixed.indices[:, :k]
    return order_candidates(values, indices, largest)


def _mask_excluded(
    block: Tensor, exclude: Tensor | None, q0: int, g0: int, largest: bool, owned: bool
) -> Tensor:
    """Set ``block[i, exclude[q0 + i] - g0]`` to the worst score where it falls inside the block.

    Copies the block first unless ``owned`` (we must never write into a caller's tensor).
    """
    if exclude is None:
        return block
    local = exclude[q0 : q0 + block.shape[0]] - g0
    rows = ((local >= 0) & (local < block.shape[1])).nonzero().squeeze(1)
    if rows.numel() == 0:
        return block
    if not owned:
        block = block.clone()
    block[rows, local[rows]] = float("-inf") if largest else float("inf")
    return block


def _check_exclude(exclude: Tensor | None, num_queries: int) -> Tensor | None:
    if exclude is None:
        return None
    exclude = torch.as_tensor(exclude, dtype=torch.long)
    if exclude.shape != (num_queries,):
        raise ValueError(f"exclude must be long [{num_queries}], got shape {tuple(exclude.shape)}")
    return exclude


def _blocks(
    queries: Tensor,
    gallery: Tensor,
    *,
    chunk_size: int,
    gallery_chunk_size: int,
    score_fn: ScoreFn | None,
    exclude: Tensor | None,
    largest: bool,
) -> Iterator[tuple[int, int, int, Tensor]]:
    """Yield ``(q0, q1, g0, block)`` score blocks, query chunks outer, gallery chunks inner.

    With the default dot product the block is written into one reused buffer (no new allocation
    per chunk); a block is only valid until the next one is yielded.
    """
    if chunk_size < 1 or gallery_chunk_size < 1:
        raise ValueError("chunk_size and gallery_chunk_size must be >= 1")
    num_q, num_g = queries.shape[0], gallery.shape[0]
    buffer, dtype = None, _score_dtype(queries, gallery)
    if score_fn is None:
        shape = (min(chunk_size, num_q), min(gallery_chunk_size, num_g))
        buffer = torch.empty(shape, dtype=dtype, device=queries.device)
    for q0 in range(0, num_q, chunk_size):
        q_chunk = queries[q0 : q0 + chunk_size]
        for g0 in range(0, num_g, gallery_chunk_size):
            g_chunk = gallery[g0 : g0 + gallery_chunk_size]
            if buffer is None:
                block = score_fn(q_chunk, g_chunk)
                owned = False
            else:
                block = buffer[: q_chunk.shape[0], : g_chunk.shape[0]]
                torch.mm(q_chunk.to(dtype), g_chunk.to(dtype).T, out=block)
                owned = True
            yield (
                q0,
                q0 + q_chunk.shape[0],
                g0,
                _mask_excluded(block, exclude, q0, g0, largest, owned),
            )


def _dense_blocks(
    scores: Tensor, *, chunk_size: int, exclude: Tensor | None, largest: bool
) -> Iterator[tuple[int, int, int, Tensor]]:
    """Yield row chunks of an existing score matrix in the same form as :func:`_blocks`."""
    for q0 in range(0, scores.shape[0], chunk_size):
        block = scores[q0 : q0 + chunk_size]
        yield q0, q0 + block.shape[0], 0, _mask_excluded(block, exclude, q0, 0, largest, False)


def _topk_over(
    blocks: Iterator[tuple[int, int, int, Tensor]],
    num_q: int,
    num_g: int,
    k: int,
    largest: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Merge per-block exact top-k lists into the exact top-k of every query.

    The outputs take the dtype and device of the score blocks (``dtype``/``device`` only serve
    when there are no queries).
    """
    out_values = torch.empty((num_q, k), dtype=dtype, device=device)
    out_indices = torch.empty((num_q, k), dtype=torch.long, device=device)
    run_q0, run_values, run_indices = -1, None, None
    for q0, q1, g0, block in blocks:
        if q0 == 0 and g0 == 0:
            out_values = out_values.to(device=block.device, dtype=block.dtype)
            out_indices = out_indices.to(block.device)
        values, indices = _block_topk(block, k, largest)
        indices = indices + g0
        if q0 != run_q0:  # first gallery chunk of a new query chunk
            run_q0, run_values, run_indices = q0, values, indices
        else:
            run_values, run_indices = order_candidates(
                torch.cat([run_values, values], dim=1),
                torch.cat([run_indices, indices], dim=1),
                largest,
            )
            run_values, run_indices = run_values[:, :k], run_indices[:, :k]
        if g0 + block.shape[1] == num_g:  # last gallery chunk of this query chunk
            out_values[q0:q1] = run_values
            out_indices[q0:q1] = run_indices
    return out_values, out_indices


def _check_k(k: int, num_g: int) -> None:
    if not 1 <= k <= num_g:
        raise ValueError(f"k must be in [1, gallery size = {num_g}], got {k}")


def topk(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gallery_chunk_size: int = DEFAULT_GALLERY_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
    exclude: Tensor | None = None,
    largest: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact top-k gallery items of every query, computed chunk by chunk.

    Args:
        queries: ``[Q, ...]`` query embeddings (anything ``score_fn`` accepts, sliced on dim 0).
        gallery: ``[G, ...]`` gallery embeddings, sliced on dim 0.
        k: list length, ``1 <= k <= G``.
        chunk_size: queries per chunk; gallery_chunk_size: gallery items per block.
        score_fn: ``(q_chunk, g_chunk) -> [q, g]`` scores; default dot product.
        exclude: long ``[Q]``: one gallery index per query ranked last (e.g. the CIRR reference);
            a negative entry excludes nothing.
        largest: rank by descending score (similarities) or ascending (distances).

    Returns:
        ``(values, indices)``, both ``[Q, k]``, best first, ties to the lower gallery index.
    """
    num_q, num_g = queries.shape[0], gallery.shape[0]
    _check_k(k, num_g)
    exclude = _check_exclude(exclude, num_q)
    blocks = _blocks(
        queries,
        gallery,
        chunk_size=chunk_size,
        gallery_chunk_size=gallery_chunk_size,
        score_fn=score_fn,
        exclude=exclude,
        largest=largest,
    )
    return _topk_over(
        blocks, num_q, num_g, k, largest, queries.device, _score_dtype(queries, gallery)
    )


def topk_scores(
    scores: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    largest: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of an existing ``[Q, G]`` score matrix, with the same tie rule and
    ``exclude`` as :func:`topk` (the input is never modified)."""
    _check_k(k, scores.shape[1])
    exclude = _check_exclude(exclude, scores.shape[0])
    blocks = _dense_blocks(scores, chunk_size=chunk_size, exclude=exclude, largest=largest)
    return _topk_over(blocks, *scores.shape, k, largest, scores.device, scores.dtype)


def _score_dtype(queries: Tensor, gallery: Tensor) -> torch.dtype:
    """The default dot product's dtype: the inputs' promoted, and at least float32 (module doc)."""
    return torch.promote_types(torch.promote_types(queries.dtype, gallery.dtype), torch.float32)


def _target_scores(blocks: Iterator[tuple[int, int, int, Tensor]], target: Tensor) -> Tensor:
    """Read each query's target score out of the score blocks themselves."""
    out = None
    for q0, q1, g0, block in blocks:
        if out is None:
            out = torch.empty(target.shape, dtype=block.dtype, device=block.device)
        local = target[q0:q1] - g0
        rows = ((local >= 0) & (local < block.shape[1])).nonzero().squeeze(1)
        out[q0 + rows] = block[rows, local[rows]]
    return out if out is not None else torch.empty(target.shape)


def _count_ahead(
    blocks: Iterator[tuple[int, int, int, Tensor]],
    target: Tensor,
    target_score: Tensor | None,
    largest: bool,
) -> Tensor:
    """Count, per query, the gallery items ranked before its target (the target's 0-based rank).

    ``target_score=None`` reads it from each block, which must then span the whole gallery.
    """
    rank = torch.zeros_like(target)
    for q0, q1, g0, block in blocks:
        if target_score is None:
            t_score = block.gather(1, target[q0:q1, None])
        else:
            t_score = target_score[q0:q1, None]
        better = block > t_score if largest else block < t_score
        rank[q0:q1] += better.sum(dim=1)
        # Equal scores at a lower gallery index also come first (tie rule). Only rows with an
        # equal score other than the target itself need the (index-aware) second pass.
        equal = block == t_score
        local_t = target[q0:q1] - g0
        target_here = (local_t >= 0) & (local_t < block.shape[1])
        tied_rows = (equal.sum(dim=1) > target_here.long()).nonzero().squeeze(1)
        if tied_rows.numel():
            cols = torch.arange(block.shape[1], device=block.device)[None]
            before = equal[tied_rows] & (cols < local_t[tied_rows, None])
            rank[q0 + tied_rows] += before.sum(dim=1)
    return rank


def _check_target(target: Tensor, num_q: int, num_g: int) -> Tensor:
    target = torch.as_tensor(target, dtype=torch.long)
    if target.shape != (num_q,):
        raise ValueError(f"target must be long [{num_q}], got shape {tuple(target.shape)}")
    if num_q and (target.min() < 0 or target.max() >= num_g):
        raise ValueError(f"target indices must lie in [0, {num_g}), the gallery")
    return target


def rank_of(
    queries: Tensor,
    gallery: Tensor,
    target: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gallery_chunk_size: int = DEFAULT_GALLERY_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
    exclude: Tensor | None = None,
    largest: bool = True,
) -> Tensor:
    """0-based rank of gallery item ``target[i]`` in query i's full ranking, computed chunked.

    The rank counts the items ranked before the target under the tie rule, so it is exact and
    unbounded (a "hit at k" is ``rank < k``) and each query has exactly one target. ``exclude``
    drops one item per query from the ranking, as in :func:`topk`; excluding the target itself
    is meaningless (callers should reject it). The target's score is read from the same score
    blocks it is compared with (a separately computed score could differ in the last bit); when
    the gallery spans several blocks this takes a second pass.
    """
    num_q, num_g = queries.shape[0], gallery.shape[0]
    target = _check_target(target, num_q, num_g)
    exclude = _check_exclude(exclude, num_q)

    def blocks() -> Iterator[tuple[int, int, int, Tensor]]:
        return _blocks(
            queries,
            gallery,
            chunk_size=chunk_size,
            gallery_chunk_size=gallery_chunk_size,
            score_fn=score_fn,
            exclude=exclude,
            largest=largest,
        )

    target_score = None if num_g <= gallery_chunk_size else _target_scores(blocks(), target)
    return _count_ahead(blocks(), target, target_score, largest)


def rank_of_scores(
    scores: Tensor,
    target: Tensor,
    *,
    exclude: Tensor | None = None,
    largest: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """:func:`rank_of` on an existing ``[Q, G]`` score matrix (never modified)."""
    target = _check_target(target, scores.shape[0], scores.shape[1])
    exclude = _check_exclude(exclude, scores.shape[0])
    blocks = _dense_blocks(scores, chunk_size=chunk_size, exclude=exclude, largest=largest)
    return _count_ahead(blocks, target, None, largest)


def gather_scores(
    queries: Tensor,
    gallery: Tensor,
    index: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    score_fn: ScoreFn | None = None,
) -> Tensor:
    """Scores of a few gallery items per query: ``out[i, m] = score(q_i, g_{index[i, m]})``.

    ``index`` is long ``[Q, M]`` (e.g. a query's target, or its CIRR group members). Only the
    ``Q x M`` needed scores are computed: each query chunk is scored against just the gallery rows
    its chunk references.
    """
    index = torch.as_tensor(index, dtype=torch.long)
    if score_fn is None:  # the default dot product at the precision of topk's (module doc)
        dtype = _score_dtype(queries, gallery)
        score_fn = lambda q, g: dot_score(q.to(dtype), g.to(dtype))  # noqa: E731
    out = []
    for q0 in range(0, queries.shape[0], chunk_size):
        q_chunk, idx = queries[q0 : q0 + chunk_size], index[q0 : q0 + chunk_size]
        used, local = torch.unique(idx, return_inverse=True)
        block = score_fn(q_chunk, gallery[used])
        out.append(block.gather(1, local))
    if not out:
        return torch.empty(index.shape, dtype=_score_dtype(queries, gallery))
    return torch.cat(out)


class FaissIndex:
    """Optional faiss backend: exact ``IndexFlatIP`` by default, any factory string (e.g.
    ``"IVF1024,PQ64"``) for large collections; inner-product metric (cosine on normalised input).

    Flat results equal :func:`topk` up to the order of exactly tied scores.
    """

    def __init__(self, dim: int, factory: str = "Flat", nprobe: int | None = None) -> None:
        import faiss

        self.dim = dim
        self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if nprobe is not None:
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    @staticmethod
    def _numpy(x: Tensor) -> np.ndarray:
        """faiss wants float32, C-contiguous numpy arrays."""
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def train(self, vectors: Tensor) -> None:
        """Train the coarse quantiser / PQ codebooks (a no-op for flat indexes)."""
        if not self.index.is_trained:
            self.index.train(self._numpy(vectors))

    def add(self, vectors: Tensor) -> None:
        """Append ``[N, dim]`` vectors; ids continue from ``len(self)``. Trains on the first batch
        if the index needs training and was not trained explicitly."""
        self.train(vectors)
        self.index.add(self._numpy(vectors))

    def search(self, queries: Tensor, k: int, batch_size: int = 16384) -> tuple[Tensor, Tensor]:
        """Top-k ``(scores [Q, k] float32, indices [Q, k] long)``, best first, in query batches.

        Missing results (fewer than k items reachable, IVF) have index -1 and score -inf.
        """
        values, indices = [], []
        for q0 in range(0, queries.shape[0], batch_size):
            d, i = self.index.search(self._numpy(queries[q0 : q0 + batch_size]), k)
            values.append(torch.from_numpy(d))
            indices.append(torch.from_numpy(i).long())
        if not values:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        values_t, indices_t = torch.cat(values), torch.cat(indices)
        values_t[indices_t < 0] = float("-inf")
        return values_t, indices_t

    def save(self, path: str | Path) -> None:
        """Write the index atomically: to a temporary file beside ``path``, then ``os.replace``."""
        import faiss

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | Path, nprobe: int | None = None, io_flags: int = 0) -> FaissIndex:
        """Read an index written by :meth:`save` (or by any faiss tool). ``io_flags`` are faiss
        read flags, e.g. ``faiss.IO_FLAG_MMAP`` to memory-map a large index instead of loading it.
        """
        import faiss

        index = faiss.read_index(str(path), io_flags)
        self = cls.__new__(cls)
        self.dim = int(index.d)
        self.index = index
        if nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = nprobe
        return self
