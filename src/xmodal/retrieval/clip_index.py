"""An external image-text index in the clip-retrieval on-disk layout: build it, open it, query it.

The layout is rom1504/clip-retrieval's (``datasets/zeroshot.md`` §5), in one folder::

    <folder>/img_emb/img_emb_{p}.npy        float16 [n_p, d], L2-normalised image embeddings
    <folder>/metadata/metadata_{p}.parquet  image_path, caption (+ the source's other columns)
    <folder>/image.index                    faiss index over img_emb (inner product = cosine)
    <folder>/text_emb/text_emb_{p}.npy      optional: the captions' embeddings ...
    <folder>/text.index                     ... and their faiss index
    <folder>/xmodal_index.json              written last by xmodal: encoder, counts, factory,
                                            tuned search parameters and their measured recall

Rows are aligned across the three kinds of file, and an item's id is its row position when the
partitions are concatenated in sorted file order (what ``clip back`` and autofaiss do). The
partition id ``p`` is zero-padded to the number of digits of the partition count. So an index
built here can be served by ``clip-retrieval back``, and an index downloaded from clip-retrieval
(e.g. LAION-400M: ViT-B/32 embeddings, ``image.index``, metadata parquet) opens here.

Building follows ``clip-retrieval inference`` then ``clip-retrieval index``: :func:`build`
encodes a collection (``xmodal.data.collection.read_collection``: a parquet/csv of image paths +
captions, webdataset tar shards, or a folder holding either, like the shapes world's ``pool/``)
partition by partition with the ``EncodeFn`` it is given, then
:func:`index_embeddings` trains, fills and tunes a faiss index as autofaiss does
(``xmodal.retrieval.tuning``): exact ``Flat`` for small collections, else an IVF factory chosen
for a memory budget, its search parameters tuned for a target recall against exact search and
stored in ``xmodal_index.json`` (and the faiss file); :class:`ClipIndex` applies them on opening.
An index folder without its info json is an unfinished build (or an untuned foreign index) and is
refused with the command that finishes, rebuilds or tunes it; so is an unreadable index file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.errors import DatasetLayoutError
from xmodal.retrieval import tuning
from xmodal.retrieval.search import FaissIndex
from xmodal.retrieval.tuning import FLAT_MAX, auto_factory  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

INFO_FILE = "xmodal_index.json"
PLAN_FILE = "xmodal_build.json"  # the plan of an unfinished build, so a rerun resumes it
FORMAT_VERSION = 2  # 2: tuned search parameters in the info json
MODALITIES = {"image": ("img_emb", "image.index"), "text": ("text_emb", "text.index")}

LAYOUT = """\
    <folder>/image.index                     faiss index over the image embeddings
    <folder>/metadata/metadata_<p>.parquet   a 'caption' column, rows aligned with the index
    <folder>/img_emb/img_emb_<p>.npy         (to build the index) float16 L2-normalised
    <folder>/xmodal_index.json               (written last by xmodal-index: the encoder used,
                                             the tuned search parameters and their recall)"""


def index_error(folder: Path | str, problem: str, fix: str) -> DatasetLayoutError:
    """The one-paragraph error for a missing or malformed index: what, where, layout, fix."""
    return DatasetLayoutError(
        f"X-MoRe external index: {problem}\n"
        f"  index folder: {folder}\n"
        f"  expected layout (rom1504/clip-retrieval):\n{LAYOUT}\n"
        f"  fix: {fix}"
    )


BUILD_FIX = (
    "build one with `xmodal-index build --source <collection> --folder <folder> "
    "backbone=<index encoder>` (see docs/xmore.md), set evaluator.index.collection=<collection> "
    "to build it on first use, or point evaluator.index.folder at a clip-retrieval index "
    "(e.g. LAION-400M's) with evaluator.index.backbone set to the encoder it was built with, "
    "after tuning it once with `xmodal-index tune <folder> --embeddings <its img_emb/ dump>`."
)

# ------------------------------------------------------------------------------------------
# Building: embeddings (clip-retrieval inference), then the faiss index (clip-retrieval index)
# ------------------------------------------------------------------------------------------

#: ``encode(refs or texts, kind) -> (embeddings [n, d], valid [n])`` (valid: image decoded)
EncodeFn = Callable[[list[str], str], tuple[torch.Tensor, torch.Tensor]]


def _partition_name(p: int, count: int) -> str:
    return str(p).zfill(len(str(count)))


def _readable(path: Path | str) -> None:
    """0666 minus the umask: mkstemp's 0600 would hide a shared index from its other users."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then ``os.replace(tmp, path)``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _readable(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic(path, write)


def _save_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    _atomic(path, lambda tmp: pq.write_table(table, tmp))


def _save_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_info(folder: Path | str) -> dict | None:
    """``xmodal_index.json`` of a finished xmodal build (None for a foreign or unfinished one)."""
    return _read_json(Path(folder) / INFO_FILE)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass
class IndexOptions:
    """How the faiss index over the embeddings is chosen and tuned (``xmodal.retrieval.tuning``):
    ``factory`` (``auto``: chosen for ``max_memory``; or any faiss factory string), the training
    sample size (default ``max(100k, 40 nlist)``), and the recall target of the search-parameter
    tuning: recall@``tune_k`` >= ``target_recall`` against exact search on ``tune_queries``
    held-out queries."""

    factory: str = "auto"
    max_memory: str = tuning.DEFAULT_MAX_MEMORY
    train_size: int | None = None
    target_recall: float = tuning.DEFAULT_TARGET_RECALL
    tune_k: int = tuning.DEFAULT_TUNE_K
    tune_queries: int = tuning.DEFAULT_TUNE_QUERIES

    def record(self) -> dict[str, Any]:
        """What the info json records of the options (``train_size`` only shapes training)."""
        return {
            "factory": self.factory,
            "max_memory": str(self.max_memory),
            "target_recall": float(self.target_recall),
            "tune_k": int(self.tune_k),
        }


def build(
    folder: Path | str,
    collection: Any,
    encode: EncodeFn,
    encoder: dict[str, Any],
    *,
    partition_size: int = 1_000_000,
    text: bool = False,
    options: IndexOptions | None = None,
    is_writer: bool = True,
) -> dict[str, Any]:
    """Encode ``collection`` (:class:`xmodal.data.collection.Collection`: ``source``,
    ``image_refs``, ``table``, ``digest()``) into ``folder`` (clip-retrieval layout) and index it;
    return the info.

    ``encoder`` identifies the embeddings (backbone name + identity) and is recorded in
    ``xmodal_index.json``, which is written last: its presence (and the absence of the plan file
    ``xmodal_build.json``) means the index is complete. Partitions of an interrupted build with
    the same plan are reused, and so are those of a finished build when only the index options
    changed. Under DDP every rank calls this (encoding is sharded); only the ``is_writer`` rank
    writes files, builds and tunes the index.
    """
    folder = Path(folder)
    options = options or IndexOptions()
    n = len(collection)
    count = max(1, math.ceil(n / partition_size))
    plan = {
        "format_version": FORMAT_VERSION,
        "command": "build",
        "encoder": encoder,
        "collection": collection.source,
        "collection_digest": collection.digest(),
        "count": n,
        "partition_size": partition_size,
        "text": text,
    }
    plan = json.loads(json.dumps(plan, default=str))  # as it reads back from the plan file
    kinds = ["image", "text"] if text else ["image"]
    old_plan = _read_json(folder / PLAN_FILE)
    if old_plan is None or old_plan.get("command") != "build":  # reuse a finished build's
        old_info = read_info(folder) or {}
        old_plan = {key: old_info.get(key) for key in plan}
    todo = [
        p
        for p in range(count)
        if old_plan != plan or not _partition_done(folder, _partition_name(p, count), kinds)
    ]
    _barrier()  # every rank decided before rank 0 writes anything
    if is_writer:
        if old_plan != plan:
            _clear(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _save_json(folder / PLAN_FILE, plan)
        (folder / INFO_FILE).unlink(missing_ok=True)  # unfinished from here on
    for p in todo:
        name = _partition_name(p, count)
        rows = slice(p * partition_size, min(n, (p + 1) * partition_size))
        emb, valid = encode(collection.image_refs[rows], "image")
        keep = valid.nonzero().squeeze(1)
        if len(keep) < len(valid):
            log.warning("partition %s: dropped %d unreadable images", name, len(valid) - len(keep))
        table = collection.table.slice(rows.start, rows.stop - rows.start).take(keep.numpy())
        text_emb = None
        if text:
            texts = [str(c or "") for c in table.column("caption").to_pylist()]
            text_emb, _ = encode(texts, "text")
        if is_writer:
            _save_npy(folder / "img_emb" / f"img_emb_{name}.npy", _fp16_unit(emb[keep]))
            if text_emb is not None:
                _save_npy(folder / "text_emb" / f"text_emb_{name}.npy", _fp16_unit(text_emb))
            _save_parquet(folder / "metadata" / f"metadata_{name}.parquet", table)
        log.info("index %s: partition %s/%d encoded (%d items)", folder, name, count, len(keep))
    info: dict[str, Any] = {}
    if is_writer:
        info = {**plan, **options.record()}
        for kind in kinds:
            info.update(index_embeddings(folder, kind=kind, options=options))
        info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        info["items"] = sum(_rows(p) for p in _metadata_files(folder))
        _save_json(folder / INFO_FILE, info)
        (folder / PLAN_FILE).unlink(missing_ok=True)
    _barrier()
    return _read_json(folder / INFO_FILE) or info


def _fp16_unit(emb: torch.Tensor) -> np.ndarray:
    return F.normalize(emb.float(), dim=-1).to(torch.float16).numpy()


def _partition_done(folder: Path, name: str, kinds: Sequence[str]) -> bool:
    files = [folder / "metadata" / f"metadata_{name}.parquet"]
    files += [folder / MODALITIES[k][0] / f"{MODALITIES[k][0]}_{name}.npy" for k in kinds]
    return all(f.is_file() for f in files)


def _clear(folder: Path) -> None:
    """Remove what an earlier build of another plan left (never the folder's other files)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    for name in ("image.index", "text.index", INFO_FILE, PLAN_FILE):
        (folder / name).unlink(missing_ok=True)


def _metadata_files(folder: Path) -> list[Path]:
    return sorted((folder / "metadata").glob("*.parquet"))


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def index_embeddings(
    folder: Path | str,
    *,
    embeddings: Path | str | None = None,
    kind: str = "image",
    options: IndexOptions | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build and tune ``<folder>/<kind>.index`` from ``<embeddings>/img_emb/*.npy`` (default:
    the folder itself), as ``clip-retrieval index`` (autofaiss) does.

    Embeddings are read one partition at a time (memory-mapped). An IVF/PQ index is trained on
    ``options.train_size`` vectors sampled uniformly over all partitions; its search parameters
    are then tuned (:func:`xmodal.retrieval.tuning.tune`) on up to ``options.tune_queries``
    other vectors, each searched leave-one-out against the exact top-k, and written into the
    faiss file. Metadata of another ``embeddings`` folder is copied next to the index. Returns
    the info json's entries for this kind: ``<kind>_index`` (the factory),
    ``<kind>_index_bytes`` (the file's size) and ``<kind>_search`` (the tuned parameters and the
    recall they measured).
    """
    folder = Path(folder)
    options = options or IndexOptions()
    source = Path(embeddings) if embeddings is not None else folder
    sub, index_name = MODALITIES[kind]
    arrays = _embedding_arrays(source, sub)
    n, dim = sum(len(a) for a in arrays), int(arrays[0].shape[1])
    factory = options.factory
    if factory == "auto":
        factory = tuning.auto_factory(n, dim, options.max_memory)
    rng = np.random.default_rng(seed)
    index = FaissIndex(dim, factory)
    train_rows = np.zeros(0, dtype=np.int64)
    if not index.index.is_trained:
        size = min(n, options.train_size or max(100_000, 40 * _nlist(factory)))
        train_rows = np.sort(rng.choice(n, size=size, replace=False))
        index.train(torch.from_numpy(_take_rows(arrays, train_rows)))
    for array in arrays:
        for r0 in range(0, len(array), 1_000_000):
            index.add(torch.from_numpy(np.asarray(array[r0 : r0 + 1_000_000], np.float32)))
    search = _tune_on(index.index, arrays, options, rng, exclude=train_rows)
    if source != folder:
        for path in _metadata_files(source):
            (folder / "metadata").mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / "metadata" / path.name)
    index.save(folder / index_name)  # the tuned parameters travel in the file too
    _readable(folder / index_name)
    log.info(
        "%s: %s index of %d x %d written; search %s: recall@%d %.4f against exact search",
        folder / index_name,
        factory,
        n,
        dim,
        search["params"] or "exhaustive",
        search["k"],
        search["recall"],
    )
    return {
        f"{kind}_index": factory,
        f"{kind}_index_bytes": (folder / index_name).stat().st_size,
        f"{kind}_search": search,
    }


def _embedding_arrays(source: Path, sub: str) -> list[np.ndarray]:
    files = sorted((source / sub).glob("*.npy"))
    if not files:
        raise index_error(source, f"no {sub}/*.npy embedding files", BUILD_FIX)
    arrays = []
    for path in files:
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (OSError, ValueError) as err:
            record = read_info(source) or {}
            fix = "re-create the embedding dump (clip-retrieval inference, or download it again)."
            if record.get("collection"):
                fix = f"delete it and re-encode it with `{rebuild_command(source, record)}` "
                fix += "(the other partitions are reused)."
            raise index_error(
                source, f"{path} could not be read ({err}): it is truncated or corrupt", fix
            ) from None
    return arrays


def _tune_on(
    index: Any,
    arrays: Sequence[np.ndarray],
    options: IndexOptions,
    rng: np.random.Generator,
    exclude: np.ndarray,
) -> dict[str, Any]:
    """Tune ``index`` on held-out rows of ``arrays`` (not in ``exclude``, the training sample,
    when possible), each searched leave-one-out against the exact top-k."""
    n = sum(len(a) for a in arrays)
    k = min(options.tune_k, n - 1)
    if k < 1:  # a single item: nothing to tune
        return {
            "params": "",
            "recall": 1.0,
            "recall_se": 0.0,
            "missing": 0,
            "k": 0,
            "queries": 0,
            "target": options.target_recall,
            "exact": True,
            "reached": True,
            "trials": [],
        }
    rows = _held_out_rows(n, exclude, min(options.tune_queries, n), rng)
    queries = _take_rows(arrays, rows)
    exact = tuning.drop_own(tuning.exact_knn(arrays, queries, k + 1), rows, k)
    return tuning.tune(index, queries, exact, own=rows, target=options.target_recall)


def _held_out_rows(n: int, exclude: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct sorted rows of ``range(n)``, outside the sorted ``exclude`` when
    enough rows are left (else anywhere)."""
    if n - len(exclude) < count:
        return np.sort(rng.choice(n, size=count, replace=False))
    rows = np.zeros(0, dtype=np.int64)
    while len(rows) < count:
        draw = rng.integers(0, n, size=2 * (count - len(rows)) + 16)
        draw = draw[~np.isin(draw, exclude, assume_unique=False)]
        rows = np.unique(np.concatenate([rows, draw]))
    return np.sort(rng.choice(rows, size=count, replace=False))


def _nlist(factory: str) -> int:
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 1


def _take_rows(arrays: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows (global ids, sorted) of the concatenation of ``arrays``, as float32."""
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    out = []
    for i, array in enumerate(arrays):
        local = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
        if len(local):
            out.append(np.asarray(array[local], np.float32))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------
# Re-indexing an embedding dump, tuning an index made elsewhere
# ------------------------------------------------------------------------------------------


def index_folder(
    folder: Path | str,
    *,
    embeddings: Path | str | None = None,
    kinds: Sequence[str] = ("image",),
    options: IndexOptions | None = None,
) -> dict[str, Any]:
    """``xmodal-index index``: build and tune ``<kind>.index`` of an embedding dump
    (``img_emb/`` + ``metadata/``, e.g. LAION-400M's) into ``folder`` and write its info json.

    A plan file marks the folder unfinished until the info json is written. The encoder (and
    the collection) recorded by an earlier xmodal build of the embeddings are kept.
    """
    folder = Path(folder)
    options = options or IndexOptions()
    source = Path(embeddings) if embeddings is not None else folder
    plan = _read_json(folder / PLAN_FILE)
    if plan is not None and plan.get("command") == "build":
        raise index_error(
            folder,
            f"an unfinished build ({PLAN_FILE} is there, {INFO_FILE} is not)",
            f"finish it first (finished partitions are reused): `{rebuild_command(folder, plan)}`.",
        )
    folder.mkdir(parents=True, exist_ok=True)
    _save_json(folder / PLAN_FILE, {"command": "index", "embeddings": str(source)})
    info = read_info(source) or {}
    if not info:
        info = {"format_version": FORMAT_VERSION, "encoder": None, "embeddings": str(source)}
    info = {**info, "format_version": FORMAT_VERSION, **options.record()}
    for kind in kinds:
        info.update(index_embeddings(folder, embeddings=source, kind=kind, options=options))
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    info["items"] = sum(_rows(p) for p in _metadata_files(folder))
    _save_json(folder / INFO_FILE, info)
    (folder / PLAN_FILE).unlink(missing_ok=True)
    return info


def tune_folder(
    folder: Path | str,
    *,
    embeddings: Path | str | None = None,
    kind: str = "image",
    options: IndexOptions | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``xmodal-index tune``: tune the search parameters of an existing ``<kind>.index`` (e.g.
    one built by clip-retrieval) against exact search over the embeddings it was built from
    (``<embeddings>/img_emb/*.npy``, default the folder's own) and record them, with the
    measured recall, in the folder's info json. The faiss file itself is left as it is."""
    folder = Path(folder)
    options = options or IndexOptions()
    source = Path(embeddings) if embeddings is not None else folder
    sub, index_name = MODALITIES[kind]
    path = folder / index_name
    if not path.exists():
        raise index_error(folder, f"missing {index_name}", BUILD_FIX)
    if not (source / sub).is_dir():
        raise index_error(
            folder,
            f"tuning {index_name} needs the embeddings it was built from, and {source / sub} "
            "does not exist",
            f"pass them: `xmodal-index tune {folder} --embeddings <folder with {sub}/*.npy>`.",
        )
    arrays = _embedding_arrays(source, sub)
    index = _read_faiss(folder, path, mmap=True, record=read_info(folder))
    n = sum(len(a) for a in arrays)
    if n != len(index) or int(arrays[0].shape[1]) != index.dim:
        raise index_error(
            folder,
            f"{index_name} holds {len(index)} vectors of dimension {index.dim} but "
            f"{source / sub} holds {n} of dimension {arrays[0].shape[1]}: not its embeddings",
            "pass the embeddings the index was built from with --embeddings.",
        )
    search = _tune_on(index.index, arrays, options, np.random.default_rng(seed), np.zeros(0))
    info = read_info(folder) or read_info(source) or {"encoder": None, "embeddings": str(source)}
    info.update({"format_version": FORMAT_VERSION, "target_recall": options.target_recall})
    info.update(
        {
            f"{kind}_index": info.get(f"{kind}_index") or type(index.index).__name__,
            f"{kind}_index_bytes": _index_bytes(path),
            f"{kind}_search": search,
            "items": int(n),
            "tuned": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    _save_json(folder / INFO_FILE, info)
    return info


# ------------------------------------------------------------------------------------------
# Opening and querying
# ------------------------------------------------------------------------------------------


def rebuild_command(folder: Path | str, record: dict[str, Any] | None) -> str | None:
    """The command that (re)builds ``folder``, from its info json or plan file, or None."""
    folder = Path(folder)
    record = record or {}
    if record.get("collection"):
        encoder = (record.get("encoder") or {}).get("name") or "<index encoder>"
        command = f"xmodal-index build --source {record['collection']} --folder {folder} "
        command += f"backbone={encoder}"
        if record.get("factory", "auto") != "auto":
            command += f" --factory '{record['factory']}'"
        return command + (" --text" if record.get("text") else "")
    embeddings = record.get("embeddings")
    if embeddings is None and (folder / "img_emb").is_dir():
        embeddings = folder
    if embeddings is not None:
        return f"xmodal-index index --embeddings {embeddings} --folder {folder}"
    return None


def _rebuild_fix(folder: Path | str, record: dict[str, Any] | None) -> str:
    command = rebuild_command(folder, record)
    return f"rebuild it with `{command}` (see docs/xmore.md)." if command else BUILD_FIX


def _tune_command(folder: Path) -> str:
    if (folder / "img_emb").is_dir():
        return f"xmodal-index tune {folder}"
    return f"xmodal-index tune {folder} --embeddings <the folder with its img_emb/*.npy>"


def _index_bytes(path: Path) -> int | None:
    """Size of a faiss index file (None for autofaiss' on-disk folder)."""
    return path.stat().st_size if path.is_file() else None


def open_info(folder: Path | str, modality: str = "image") -> dict[str, Any]:
    """The info json of a finished, tuned index in ``folder``; a one-paragraph error (file,
    problem, the command that fixes it) for an unfinished build, a missing index, an index
    without its info json or tuned parameters, or an index file that changed since."""
    folder = Path(folder)
    name = MODALITIES[modality][1]
    path = folder / name
    plan = _read_json(folder / PLAN_FILE)
    if plan is not None:
        raise index_error(
            folder,
            f"an unfinished build: {PLAN_FILE} is there and {INFO_FILE} is not (the build was "
            "interrupted, or is still running)",
            f"finish it (what was done is reused): `{rebuild_command(folder, plan)}`"
            + (
                ", or let X-MoRe finish it (evaluator.index.collection)."
                if "collection" in plan
                else "."
            ),
        )
    if not path.exists():
        raise index_error(folder, f"missing {name}", BUILD_FIX)
    info = read_info(folder)
    if info is None:
        command = rebuild_command(folder, None)
        raise index_error(
            folder,
            f"{name} has no {INFO_FILE} beside it: an unfinished build, or an index made "
            "elsewhere whose search parameters (nprobe) were never tuned and recorded, so its "
            "recall is unknown",
            (f"rebuild it with `{command}`, or " if command else "")
            + f"tune and record this index with `{_tune_command(folder)}`.",
        )
    search = info.get(f"{modality}_search")
    if info.get("format_version", 1) < 2 or not isinstance(search, dict):
        raise index_error(
            folder,
            f"{INFO_FILE} records no tuned search parameters for {name} (an index built by an "
            "older xmodal, searched at faiss' default nprobe=1)",
            f"{_rebuild_fix(folder, info)[:-1]}, or tune it: `{_tune_command(folder)}`.",
        )
    recorded, actual = info.get(f"{modality}_index_bytes"), _index_bytes(path)
    if recorded is not None and actual != recorded:
        raise index_error(
            folder,
            f"{path} holds {actual} bytes but {INFO_FILE} recorded {recorded} when it was "
            "built: the file is truncated, or was replaced after the build",
            _rebuild_fix(folder, info)[:-1]
            + f"; if you replaced it on purpose, tune and record it: `{_tune_command(folder)}`.",
        )
    return info


def _read_faiss(folder: Path, path: Path, mmap: bool, record: dict | None) -> FaissIndex:
    """Read a faiss index (a file, or autofaiss' on-disk folder); an unreadable file is a
    one-paragraph error naming it and the command that rebuilds it, not faiss' C++ message."""
    import faiss

    if path.is_dir():  # autofaiss' merged on-disk index, as `clip back` loads it
        target, flags = path / "populated.index", faiss.IO_FLAG_ONDISK_SAME_DIR
    else:
        target, flags = path, (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    try:
        return FaissIndex.load(target, None, flags)
    except (RuntimeError, MemoryError) as err:
        said = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        said = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", said)  # the C++ location
        raise index_error(
            folder,
            f"{target} could not be read: it is truncated or corrupt (faiss: {said})",
            _rebuild_fix(folder, record),
        ) from None


class ClipIndex:
    """An opened clip-retrieval index folder: batched kNN search and caption look-up.

    The folder's info json must say the build finished; the search parameters tuned at build
    time (``<modality>_search.params``, e.g. ``nprobe=48``) are applied, and an explicit
    ``nprobe`` overrides them. Captions are read lazily, one metadata partition at a time, so a
    LAION-400M index (410 partitions of ~1M rows) never holds all its captions in memory.
    """

    def __init__(
        self,
        folder: Path | str,
        modality: str = "image",
        nprobe: int | None = None,
        mmap: bool = False,
    ) -> None:
        self.folder = Path(folder)
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {tuple(MODALITIES)}, got {modality!r}")
        path = self.folder / MODALITIES[modality][1]
        self.info = open_info(self.folder, modality)
        self.index = _read_faiss(self.folder, path, mmap, self.info)
        self.tuned = self.info[f"{modality}_search"]
        self.params = self.tuned.get("params", "")
        tuning.apply_params(self.index.index, self.params)
        if nprobe is not None:
            try:
                self.params = tuning.set_nprobe(self.index.index, nprobe)
            except ValueError:
                log.info("%s is not an IVF index: nprobe=%d ignored", path, nprobe)
        self.partitions = _metadata_files(self.folder)
        if not self.partitions:
            raise index_error(self.folder, "no metadata/*.parquet files", BUILD_FIX)
        rows = []
        for part in self.partitions:
            try:
                rows.append(_rows(part))
            except (OSError, ValueError) as err:
                raise index_error(
                    self.folder,
                    f"{part} could not be read ({err}): it is truncated or corrupt",
                    _rebuild_fix(self.folder, self.info),
                ) from None
        self.offsets = np.cumsum([0, *rows])
        if self.offsets[-1] != len(self.index):
            raise index_error(
                self.folder,
                f"the metadata holds {self.offsets[-1]} rows but {path.name} holds "
                f"{len(self.index)} vectors (rows must be aligned)",
                _rebuild_fix(self.folder, self.info),
            )

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int:
        return self.index.dim

    def search(
        self, queries: torch.Tensor, k: int, batch_size: int = 16384
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(scores, ids)`` [Q, k] of L2-normalised ``queries``; id -1 where fewer than k
        items were reachable (IVF) or the index holds fewer than k items."""
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have dimension {queries.shape[1]} but the index at {self.folder} has "
                f"{self.dim}: encode the queries with the encoder the index was built with"
            )
        return self.index.search(queries, k, batch_size)

    def column(self, ids: torch.Tensor, name: str = "caption") -> list[list[Any]]:
        """Metadata column ``name`` of ``ids`` [Q, k] as nested lists; None where id is -1."""
        import pyarrow.parquet as pq

        flat = ids.reshape(-1).numpy()
        values: list[Any] = [None] * len(flat)
        valid = np.nonzero(flat >= 0)[0]
        part = np.searchsorted(self.offsets, flat[valid], side="right") - 1
        for p in np.unique(part):
            path = self.partitions[p]
            where = valid[part == p]
            try:
                column = pq.read_table(path, columns=[name]).column(name)
            except KeyError:
                raise index_error(
                    self.folder, f"{path.name} has no {name!r} column", BUILD_FIX
                ) from None
            for i, value in zip(where, column.take(flat[where] - self.offsets[p]).to_pylist()):
                values[i] = value
        width = ids.shape[1] if ids.dim() == 2 else 1
        return [values[r : r + width] for r in range(0, len(values), width)]
