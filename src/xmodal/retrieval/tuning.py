"""Choosing and tuning a faiss index the way clip-retrieval's autofaiss does, with faiss' own tools.

clip-retrieval builds its indexes with criteo/autofaiss: a factory chosen for a memory budget and
search parameters tuned and stored with the index. autofaiss pins ``numpy<2`` and so cannot be a
dependency of xmodal; this module does the same with faiss itself:

- :func:`auto_factory` picks the factory for ``n`` vectors of dimension ``d`` under a memory
  budget: exact ``Flat`` for small collections, else ``IVF<nlist>`` over float16 codes
  (``SQfp16``, near exact), 8-bit codes (``SQ8``) or product-quantised codes (``PQ<m>``), the
  most precise codes that fit.
- :func:`tune` picks the search parameter that trades speed for recall (``nprobe`` for IVF, with
  the quantizer's ``efSearch`` for an HNSW coarse quantizer; ``efSearch`` for HNSW): the smallest
  value whose recall@k against exact search, on a sample of held-out queries, reaches the target
  (with a margin of two standard errors, so that unseen queries reach it too) with no missing
  (-1) results. The search is monotone (doubling, then bisection): visiting more
  cells never loses a neighbour that exact distances found (IVF-Flat/SQfp16), and very nearly so
  with quantised distances. When a factory's codes cap the recall below the target (PQ), the
  search stops where doubling gains less than ``PLATEAU`` recall, keeps the smallest value
  within ``PLATEAU`` of the best, and records and logs the shortfall.
- :func:`exact_knn` is the exact reference, read block by block from memory-mapped embeddings.

The chosen parameters are written into the faiss file (faiss stores ``nprobe`` and ``efSearch``)
and, with the measured recall, into the index's info json; :func:`apply_params` sets them again
whenever the index is opened (``xmodal.retrieval.clip_index.ClipIndex``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xmodal.evaluators.schemas import INDEX_MAX_MEMORY, INDEX_TARGET_RECALL
from xmodal.retrieval.search import order_candidates, topk

log = logging.getLogger(__name__)

FLAT_MAX = 1_000_000  # auto factory: exact search up to this many items (2 GB at d=512)
# the defaults live with the evaluator schema (torch-free), so the config layer stays cheap
DEFAULT_MAX_MEMORY = INDEX_MAX_MEMORY  # LAION-400M at d=512 -> IVF65536,PQ64 (29 GB)
DEFAULT_TARGET_RECALL = INDEX_TARGET_RECALL
DEFAULT_TUNE_K = 128  # X-MoRe's K
DEFAULT_TUNE_QUERIES = 1000
IVF_ID_BYTES = 8  # an inverted list stores an int64 id beside each code
PLATEAU = 0.002  # a doubling that gains less recall than this: the codes cap the recall

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(size: str | int | float) -> int:
    """Bytes of ``"32G"``, ``"512M"``, ``"1.5G"``, ``"4096"`` (binary units) or a number."""
    if isinstance(size, int | float):
        return int(size)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", str(size).upper())
    if match is None:
        raise ValueError(f"a memory size like '32G', '512M' or '4096' was expected, got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``4 sqrt(n)`` (faiss'
    guideline), between 1024 and 65536."""
    return int(min(65536, max(1024, 2 ** round(math.log2(4 * math.sqrt(n))))))


def index_bytes(factory: str, n: int, dim: int) -> int:
    """Approximate memory of an index of ``n`` vectors built with an :func:`auto_factory`
    factory (codes, ids and coarse centroids)."""
    if factory == "Flat":
        return 4 * n * dim
    nlist = int(re.match(r"IVF(\d+)", factory).group(1))
    codes = {"SQfp16": 2 * dim, "SQ8": dim}.get(factory.split(",")[1])
    if codes is None:
        codes = int(re.search(r"PQ(\d+)", factory).group(1))
    return n * (codes + IVF_ID_BYTES) + 4 * nlist * dim


def auto_factory(n: int, dim: int, max_memory: str | int = DEFAULT_MAX_MEMORY) -> str:
    """The faiss factory for ``n`` vectors of dimension ``dim`` within ``max_memory`` bytes.

    ``Flat`` (exact) up to ``FLAT_MAX`` items when it fits; else ``IVF<nlist>`` with the most
    precise codes that fit: ``SQfp16`` (2 bytes a dimension, near exact), ``SQ8`` (1 byte), or
    ``PQ<m>np`` with ``m`` the largest divisor of ``dim`` (at most ``dim / 2``) that fits
    (``m`` bytes; its recall against exact search is capped by the codes, whatever nprobe).
    """
    budget = parse_size(max_memory)
    if n <= FLAT_MAX and index_bytes("Flat", n, dim) <= budget:
        return "Flat"
    nlist = ivf_nlist(n)
    for codes in ("SQfp16", "SQ8"):
        if index_bytes(f"IVF{nlist},{codes}", n, dim) <= budget:
            return f"IVF{nlist},{codes}"
    per_vector = (budget - 4 * nlist * dim) // n - IVF_ID_BYTES
    fitting = [m for m in range(1, min(per_vector, dim // 2) + 1) if dim % m == 0]
    if not fitting:
        raise ValueError(
            f"no index of {n} vectors of dimension {dim} fits in {max_memory} "
            f"(IVF{nlist},PQ1 needs {index_bytes(f'IVF{nlist},PQ1', n, dim) / 2**30:.1f} GiB): "
            "raise the memory budget (--max-memory / evaluator.index.max_memory)"
        )
    # np: no polysemous training (4x slower to train; it only serves Hamming pre-filtering,
    # which is off unless polysemous_ht is set)
    return f"IVF{nlist},PQ{fitting[-1]}np"


# ------------------------------------------------------------------------------------------
# Exact reference
# ------------------------------------------------------------------------------------------


def exact_knn(
    arrays: Sequence[np.ndarray], queries: np.ndarray, k: int, block: int = 262_144
) -> np.ndarray:
    """Exact top-k ids ``[Q, k]`` by inner product over the concatenation of ``arrays`` (e.g.
    memory-mapped float16 partitions), read ``block`` rows at a time, xmodal's tie rule."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    best_v, best_i, offset = None, None, 0
    for array in arrays:
        for r0 in range(0, len(array), block):
            rows = torch.from_numpy(np.asarray(array[r0 : r0 + block], np.float32))
            values, ids = topk(q, rows, min(k, len(rows)))
            ids = ids + offset + r0
            if best_v is None:
                best_v, best_i = values, ids
            else:
                best_v, best_i = order_candidates(
                    torch.cat([best_v, values], 1), torch.cat([best_i, ids], 1)
                )
                best_v, best_i = best_v[:, :k], best_i[:, :k]
        offset += len(array)
    return best_i.numpy()


def drop_own(ids: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
    """The first ``k`` ids of each row other than the row's own id (leave-one-out: a query taken
    from the collection is searched as if it were not in it)."""
    if own is None:
        return ids[:, :k]
    order = np.argsort(ids == own[:, None], axis=1, kind="stable")  # own id last, order kept
    return np.take_along_axis(ids, order, axis=1)[:, :k]


def recall_per_query(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``|found_q ∩ exact_q| / k`` of each query: the fraction of its exact top-k that the
    approximate top-k returns (missing ids, -1, count as misses)."""
    k = exact.shape[1]
    return np.array([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)])


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Recall@k: :func:`recall_per_query` averaged over the queries."""
    return float(recall_per_query(found, exact).mean())


# ------------------------------------------------------------------------------------------
# Search parameters
# ------------------------------------------------------------------------------------------


def _inner(index: Any) -> Any:
    """The index under pre-transforms (OPQ, PCA), id maps and refinement."""
    import faiss

    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform | faiss.IndexIDMap):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def is_exact(index: Any) -> bool:
    """Whether ``index`` searches exhaustively with exact float32 distances (``Flat``)."""
    import faiss

    return isinstance(_inner(index), faiss.IndexFlat)


def _knob(index: Any, k: int) -> tuple[str, int, int] | None:
    """``(name, lowest, highest)`` of the parameter that trades speed for recall, or None."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        return "nprobe", 1, int(ivf.nlist)
    if isinstance(_inner(index), faiss.IndexHNSW):
        return "efSearch", k, max(k, 1 << 15)
    return None


def _hnsw_quantizer(index: Any) -> bool:
    import faiss

    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:
        return False
    return isinstance(quantizer, faiss.IndexHNSW)


def params_string(index: Any, name: str, value: int) -> str:
    """faiss ``ParameterSpace`` string setting ``name``; an HNSW coarse quantizer searches
    ``2 nprobe`` (at least 16) candidates so that the nprobe nearest cells are found."""
    params = f"{name}={value}"
    if name == "nprobe" and _hnsw_quantizer(index):
        params += f",quantizer_efSearch={max(16, 2 * value)}"
    return params


def current_params(index: Any, k: int = DEFAULT_TUNE_K) -> str:
    """The search parameters ``index`` holds now (what a plain ``faiss.read_index`` gives)."""
    import faiss

    knob = _knob(index, k)
    if knob is None:
        return ""
    if knob[0] == "nprobe":
        ivf = faiss.extract_index_ivf(index)
        params = f"nprobe={ivf.nprobe}"
        if _hnsw_quantizer(index):
            quantizer = faiss.downcast_index(ivf.quantizer)
            params += f",quantizer_efSearch={quantizer.hnsw.efSearch}"
        return params
    return f"efSearch={_inner(index).hnsw.efSearch}"


def apply_params(index: Any, params: str) -> None:
    """Set faiss search parameters (``"nprobe=32"``, ``"efSearch=256"``, ...) on ``index``."""
    import faiss

    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def set_nprobe(index: Any, nprobe: int) -> str:
    """Set ``nprobe`` (and an HNSW quantizer's efSearch with it); returns the params string.
    A ValueError for an index without inverted lists."""
    import faiss

    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        raise ValueError("nprobe only applies to IVF indexes") from None
    params = params_string(index, "nprobe", nprobe)
    apply_params(index, params)
    return params


def tune(
    index: Any,
    queries: np.ndarray,
    exact: np.ndarray,
    *,
    own: np.ndarray | None = None,
    target: float = DEFAULT_TARGET_RECALL,
) -> dict[str, Any]:
    """Tune ``index``'s search parameter for recall@k ``>= target`` against ``exact`` (the exact
    top-k ids ``[Q, k]`` of ``queries``) and leave ``index`` set to the chosen value.

    A value reaches the target when the recall's lower confidence bound, its mean over the
    queries minus two standard errors, is at least ``target`` and no query misses results:
    so that queries the tuning never saw reach it too, not only half of the time.
    ``own``: each query's id in the collection (leave-one-out queries; the id is dropped from
    both sides). Returns ``{"params", "recall", "recall_se", "missing", "k", "queries",
    "target", "reached", "exact", "trials"}``: the chosen faiss parameter string, the mean
    recall, its standard error and the missing (-1) ids it gives on these queries, whether the
    target was reached, and every ``[params, recall, recall_se, missing]`` measured. An exact
    (``Flat``) index is not measured: its recall is 1.
    """
    k = exact.shape[1]
    queries = np.ascontiguousarray(queries, np.float32)
    trials: dict[int, tuple[float, float, int]] = {}

    def measure(params: str) -> tuple[float, float, int]:
        apply_params(index, params)
        _, ids = index.search(queries, k + (own is not None))
        found = drop_own(ids, own, k)
        recall = recall_per_query(found, exact)
        se = float(recall.std(ddof=1) / np.sqrt(len(recall))) if len(recall) > 1 else 0.0
        return float(recall.mean()), se, int((found < 0).sum())

    def good(recall: float, se: float, missing: int) -> bool:
        return recall - 2 * se >= target and missing == 0

    out = {"k": int(k), "queries": len(queries), "target": float(target)}
    knob = _knob(index, k)
    if is_exact(index) or knob is None:
        exact_index = is_exact(index)
        params = current_params(index, k)
        recall, se, missing = (1.0, 0.0, 0) if exact_index else measure(params)
        return {
            **out,
            "params": params,
            "recall": recall,
            "recall_se": se,
            "missing": missing,
            "exact": exact_index,
            "reached": good(recall, se, missing),
            "trials": [],
        }
    name, lo, hi = knob

    def ok(value: int) -> bool:
        if value not in trials:
            trials[value] = measure(params_string(index, name, value))
            log.info(
                "tuning %s=%d: recall@%d %.4f +- %.4f, %d missing", name, value, k, *trials[value]
            )
        return good(*trials[value])

    below, value = lo - 1, lo  # ok(below) is False (or below is out of range)
    while not ok(value) and value < hi:
        recall, _, missing = trials[value]
        if below >= lo and missing == 0 and recall - trials[below][0] < PLATEAU:
            break  # doubling no longer helps: the codes cap the recall
        below, value = value, min(2 * value, hi)
    reached = ok(value)
    if reached:  # the smallest value in (below, value] that reaches the target
        while value - below > 1:
            mid = (below + value) // 2
            below, value = (below, mid) if ok(mid) else (mid, value)
    else:  # the smallest value within PLATEAU of the best recall (no missing ids if possible)
        complete = [v for v in trials if trials[v][2] == 0] or list(trials)
        best = max(trials[v][0] for v in complete)
        value = min(v for v in complete if trials[v][0] >= best - PLATEAU)
    params = params_string(index, name, value)
    apply_params(index, params)
    recall, se, missing = trials[value]
    if not reached:
        log.warning(
            "the index cannot reach recall@%d >= %.2f against exact search (best: %.4f +- %.4f "
            "at %s, %d missing ids): its codes cap the recall; give it more memory "
            "(--max-memory) or more precise codes (a factory with SQfp16 or SQ8 in place of PQ)",
            k,
            target,
            recall,
            se,
            params,
            missing,
        )
    return {
        **out,
        "params": params,
        "recall": recall,
        "recall_se": se,
        "missing": missing,
        "exact": False,
        "reached": reached,
        "trials": [[params_string(index, name, v), *trials[v]] for v in sorted(trials)],
    }
