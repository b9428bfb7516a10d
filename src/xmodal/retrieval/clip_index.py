"""An external image-text index in the clip-retrieval on-disk layout: build it, open it, query it.

The layout is rom1504/clip-retrieval's (``datasets/zeroshot.md`` §5), in one folder::

    <folder>/img_emb/img_emb_{p}.npy        float16 [n_p, d], L2-normalised image embeddings
    <folder>/metadata/metadata_{p}.parquet  image_path, caption (+ the source's other columns)
    <folder>/image.index                    faiss index over img_emb (inner product = cosine)
    <folder>/text_emb/text_emb_{p}.npy      optional: the captions' embeddings ...
    <folder>/text.index                     ... and their faiss index
    <folder>/xmodal_index.json              written last by xmodal: encoder, counts, factory

Rows are aligned across the three kinds of file, and an item's id is its row position when the
partitions are concatenated in sorted file order (what ``clip back`` and autofaiss do). The
partition id ``p`` is zero-padded to the number of digits of the partition count. So an index
built here can be served by ``clip-retrieval back``, and an index downloaded from clip-retrieval
(e.g. LAION-400M: ViT-B/32 embeddings, ``image.index``, metadata parquet) opens here.

Building follows ``clip-retrieval inference`` then ``clip-retrieval index``: :func:`build`
encodes a collection (a parquet/csv of image paths + captions, webdataset tar shards, or a folder
holding either, like the shapes world's ``pool/``) partition by partition, then
:func:`index_embeddings` trains and fills a faiss index: exact ``Flat`` up to
``FLAT_MAX`` items, else ``IVF<nlist>,PQ<d/8>`` (``factory`` takes any faiss factory string).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.data.base import DatasetLayoutError
from xmodal.data.images import IMG_EXTENSIONS, tar_ref, wds_samples
from xmodal.retrieval.cache import digest
from xmodal.retrieval.search import FaissIndex

log = logging.getLogger(__name__)

INFO_FILE = "xmodal_index.json"
PLAN_FILE = "xmodal_build.json"  # the plan of an unfinished build, so a rerun resumes it
FORMAT_VERSION = 1
FLAT_MAX = 1_000_000  # auto factory: exact search up to this many items (2 GB at d=512)
MODALITIES = {"image": ("img_emb", "image.index"), "text": ("text_emb", "text.index")}

LAYOUT = """\
    <folder>/image.index                     faiss index over the image embeddings
    <folder>/metadata/metadata_<p>.parquet   a 'caption' column, rows aligned with the index
    <folder>/img_emb/img_emb_<p>.npy         (to build the index) float16 L2-normalised
    <folder>/xmodal_index.json               (written by xmodal-index: the encoder used)"""

COLLECTION_LAYOUT = """\
    <file>.parquet | <file>.csv              columns image_path (relative to the file) + caption
    <folder>/metadata.parquet | metadata.csv (the same, e.g. the shapes world's pool/)
    <shard>.tar, a folder of .tar shards, or 'shards/{00000..00099}.tar'
                                             webdataset: <key>.jpg|png|webp + <key>.txt (or .json
                                             with a "caption"), e.g. img2dataset output"""


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
    "(e.g. LAION-400M's) with evaluator.index.backbone set to the encoder it was built with."
)

# ------------------------------------------------------------------------------------------
# Collections: what to index
# ------------------------------------------------------------------------------------------


@dataclass
class Collection:
    """Image-text pairs to index: image references (paths or ``"<tar>::<member>"``) and a
    metadata table (pyarrow) with at least ``image_path`` and ``caption``, row-aligned."""

    source: str
    image_refs: list[str]
    table: Any  # pyarrow.Table

    def __len__(self) -> int:
        return len(self.image_refs)

    @property
    def captions(self) -> list[str | None]:
        return self.table.column("caption").to_pylist()

    def digest(self) -> str:
        """Content hash of the items (images and captions): a changed collection is rebuilt."""
        return digest([*self.image_refs, "\0captions\0", *map(str, self.captions)])


def collection_error(source: str, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"X-MoRe index collection: {problem}\n  source: {source}\n"
        f"  expected one of:\n{COLLECTION_LAYOUT}\n"
        "  fix: point --source / evaluator.index.collection at such a file, folder or shard list."
    )


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset brace ranges: ``"a/{00..02}.tar"`` -> ``a/00.tar, a/01.tar, a/02.tar``
    (zero-padding follows the first bound; several ranges expand as a product)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(
            expand_braces(pattern[: match.start()] + str(i).zfill(len(lo)) + pattern[match.end() :])
        )
    return out


def read_collection(source: str | Path) -> Collection:
    """Read an image-caption collection (see ``COLLECTION_LAYOUT``) without decoding images."""
    source = str(source)
    path = Path(source)
    if "{" in source or source.endswith(".tar"):
        shards = [Path(s) for s in expand_braces(source)]
        return _read_shards(source, shards)
    if path.is_dir():
        for name in ("metadata.parquet", "metadata.csv"):
            if (path / name).is_file():
                return _read_table(source, path / name)
        shards = sorted(path.glob("*.tar"))
        if shards:
            return _read_shards(source, shards)
        raise collection_error(source, "the folder has no metadata.parquet/.csv and no .tar")
    if path.suffix in (".parquet", ".csv") and path.is_file():
        return _read_table(source, path)
    raise collection_error(source, "no such file or folder, or not a .parquet/.csv/.tar")


def _read_table(source: str, path: Path) -> Collection:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = path.resolve()
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    except (OSError, pa.ArrowException) as exc:
        raise collection_error(source, f"cannot read {path}: {exc}") from None
    missing = [c for c in ("image_path", "caption") if c not in table.column_names]
    if missing:
        raise collection_error(
            source, f"{path} lacks column(s) {missing}; it has {table.column_names}"
        )
    refs = [str(path.parent / str(p)) for p in table.column("image_path").to_pylist()]
    absent = [r for r in refs if not os.path.isfile(r)]
    if absent:
        raise collection_error(
            source,
            f"{len(absent)} of {len(refs)} images listed in {path} are missing, e.g. {absent[0]}",
        )
    table = table.set_column(
        table.column_names.index("image_path"), "image_path", pa.array(refs, pa.string())
    )
    return Collection(source, refs, table)


def _read_shards(source: str, shards: Sequence[Path]) -> Collection:
    """One sample per webdataset key (basename up to the first dot) with an image and a caption
    (``.txt``, or ``"caption"`` of the ``.json``); other samples are skipped and counted."""
    import pyarrow as pa

    missing = [s for s in shards if not s.is_file()]
    if not shards or missing:
        raise collection_error(source, f"missing tar shard(s), e.g. {missing[:1] or source}")
    refs, keys, captions, skipped = [], [], [], 0
    for shard in shards:
        try:
            samples = _shard_samples(shard)
        except (tarfile.TarError, OSError, UnicodeDecodeError, ValueError) as exc:
            raise collection_error(source, f"malformed tar shard {shard}: {exc}") from None
        for key, (image, caption) in samples.items():
            if image is None or caption is None:
                skipped += 1
                continue
            refs.append(tar_ref(shard, image))
            keys.append(key)
            captions.append(caption)
    if skipped:
        log.warning("%s: skipped %d samples without an image or a caption", source, skipped)
    if not refs:
        raise collection_error(source, "the shards hold no sample with an image and a caption")
    table = pa.table({"image_path": refs, "caption": captions, "key": keys})
    return Collection(source, refs, table)


def _shard_samples(shard: Path) -> dict[str, tuple[str | None, str | None]]:
    """key -> (image member, caption) of one shard, in tar order; the caption is the ``.txt``,
    else the ``caption`` field of the ``.json`` (img2dataset's layout)."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for key, files in wds_samples(shard).items():
        image = next((name for ext, name in files.items() if f".{ext}" in IMG_EXTENSIONS), None)
        caption = None
        if "txt" in files:
            caption = files["txt"].strip()
        elif "json" in files:
            caption = json.loads(files["json"]).get("caption") or None
        out[key] = (image, caption)
    return out


# ------------------------------------------------------------------------------------------
# Building: embeddings (clip-retrieval inference), then the faiss index (clip-retrieval index)
# ------------------------------------------------------------------------------------------

#: ``encode(refs or texts, kind) -> (embeddings [n, d], valid [n])`` (valid: image decoded)
EncodeFn = Callable[[list[str], str], tuple[torch.Tensor, torch.Tensor]]


def trainer_encode_fn(
    trainer: Any,
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    on_corrupt: str = "skip",
) -> EncodeFn:
    """An ``EncodeFn`` that encodes through a Lightning trainer (``xmodal.retrieval.encode``):
    DDP-sharded, images decoded with ``on_corrupt`` (``skip``: web collections have broken files,
    their rows are dropped from the index)."""
    from xmodal.data.images import ImageDataset
    from xmodal.retrieval.encode import TextDataset, encode, text_collate

    def encode_fn(items: list[str], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = {"batch_size": batch_size, "num_workers": num_workers}
        if kind == "image":
            dataset = ImageDataset(items, preprocess, on_corrupt=on_corrupt)
            return encode(trainer, model, dataset, "image", **loader)
        dataset = TextDataset(items)
        return encode(trainer, model, dataset, "text", collate_fn=text_collate(tokenizer), **loader)

    return encode_fn


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


def build(
    folder: Path | str,
    collection: Collection,
    encode: EncodeFn,
    encoder: dict[str, Any],
    *,
    factory: str = "auto",
    partition_size: int = 1_000_000,
    text: bool = False,
    train_size: int | None = None,
    is_writer: bool = True,
) -> dict[str, Any]:
    """Encode ``collection`` into ``folder`` (clip-retrieval layout) and index it; return the info.

    ``encoder`` identifies the embeddings (backbone name + identity) and is recorded in
    ``xmodal_index.json``, which is written last, so its presence means the index is complete.
    Partitions of an interrupted build with the same plan are reused. Under DDP every rank calls
    this (encoding is sharded); only the ``is_writer`` rank writes files.
    """
    folder = Path(folder)
    n = len(collection)
    count = max(1, math.ceil(n / partition_size))
    plan = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder,
        "collection": collection.source,
        "collection_digest": collection.digest(),
        "count": n,
        "partition_size": partition_size,
        "text": text,
        "factory": factory,
    }
    plan = json.loads(json.dumps(plan, default=str))  # as it reads back from the plan file
    kinds = ["image", "text"] if text else ["image"]
    old_plan = _read_json(folder / PLAN_FILE)
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
        for kind in kinds:
            info[f"{kind}_index"] = index_embeddings(
                folder, kind=kind, factory=factory, train_size=train_size
            )
        info = {**plan, **info, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
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


def auto_factory(n: int, dim: int) -> str:
    """``Flat`` (exact) up to ``FLAT_MAX`` items, else ``IVF<nlist>,PQ<dim/8>`` with nlist the
    power of two nearest ``4 sqrt(n)`` (faiss' guideline), between 1024 and 65536."""
    if n <= FLAT_MAX:
        return "Flat"
    nlist = int(min(65536, max(1024, 2 ** round(math.log2(4 * math.sqrt(n))))))
    return f"IVF{nlist},PQ{dim // 8}" if dim % 8 == 0 else f"IVF{nlist},Flat"


def index_embeddings(
    folder: Path | str,
    *,
    embeddings: Path | str | None = None,
    kind: str = "image",
    factory: str = "auto",
    train_size: int | None = None,
    seed: int = 0,
) -> str:
    """Build ``<folder>/<kind>.index`` from ``<embeddings>/img_emb/*.npy`` (default: the folder
    itself), as ``clip-retrieval index`` does; returns the factory string used.

    Embeddings are read one partition at a time (memory-mapped). An IVF/PQ index is trained on
    ``train_size`` vectors sampled uniformly over all partitions. Metadata of another
    ``embeddings`` folder is copied next to the index.
    """
    folder = Path(folder)
    source = Path(embeddings) if embeddings is not None else folder
    sub, index_name = MODALITIES[kind]
    files = sorted((source / sub).glob("*.npy"))
    if not files:
        raise index_error(source, f"no {sub}/*.npy embedding files", BUILD_FIX)
    arrays = [np.load(f, mmap_mode="r") for f in files]
    n, dim = sum(len(a) for a in arrays), int(arrays[0].shape[1])
    factory = auto_factory(n, dim) if factory == "auto" else factory
    index = FaissIndex(dim, factory)
    if not index.index.is_trained:
        size = min(n, train_size or max(100_000, 40 * _nlist(factory)))
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        index.train(torch.from_numpy(_take_rows(arrays, rows)))
    for array in arrays:
        for r0 in range(0, len(array), 1_000_000):
            index.add(torch.from_numpy(np.asarray(array[r0 : r0 + 1_000_000], np.float32)))
    if source != folder:
        for path in _metadata_files(source):
            (folder / "metadata").mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / "metadata" / path.name)
    index.save(folder / index_name)
    _readable(folder / index_name)
    log.info("%s: %s index of %d x %d written", folder / index_name, factory, n, dim)
    return factory


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
# Opening and querying
# ------------------------------------------------------------------------------------------


class ClipIndex:
    """An opened clip-retrieval index folder: batched kNN search and caption look-up.

    Captions are read lazily, one metadata partition at a time, so a LAION-400M index (410
    partitions of ~1M rows) never holds all its captions in memory.
    """

    def __init__(
        self,
        folder: Path | str,
        modality: str = "image",
        nprobe: int | None = None,
        mmap: bool = False,
    ) -> None:
        import faiss

        self.folder = Path(folder)
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {tuple(MODALITIES)}, got {modality!r}")
        path = self.folder / MODALITIES[modality][1]
        if path.is_dir():  # autofaiss' merged on-disk index, as `clip back` loads it
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
            self.index = FaissIndex.load(path / "populated.index", None, flags)
        elif path.is_file():
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            self.index = FaissIndex.load(path, None, flags)
        else:
            raise index_error(self.folder, f"missing {path.name}", BUILD_FIX)
        if nprobe is not None:
            try:
                faiss.extract_index_ivf(self.index.index).nprobe = nprobe
            except RuntimeError:
                log.info("%s is not an IVF index: nprobe=%d ignored", path, nprobe)
        self.info = _read_json(self.folder / INFO_FILE)
        self.partitions = _metadata_files(self.folder)
        if not self.partitions:
            raise index_error(self.folder, "no metadata/*.parquet files", BUILD_FIX)
        self.offsets = np.cumsum([0] + [_rows(p) for p in self.partitions])
        if self.offsets[-1] != len(self.index):
            raise index_error(
                self.folder,
                f"the metadata holds {self.offsets[-1]} rows but {path.name} holds "
                f"{len(self.index)} vectors (rows must be aligned)",
                "rebuild the index from its embeddings: `xmodal-index index --folder <folder>`.",
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
