"""Image-caption collections to build an external index from (X-MoRe's caption pool): a
parquet/csv table of image paths and captions, or webdataset tar shards, read without decoding
an image. Indexing them is ``xmodal.retrieval.clip_index``'s job."""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.data.images import IMG_EXTENSIONS, tar_ref, wds_samples
from xmodal.errors import DatasetLayoutError
from xmodal.inputs import digest

log = logging.getLogger(__name__)

COLLECTION_LAYOUT = """\
    <file>.parquet | <file>.csv              columns image_path (relative to the file) + caption
    <folder>/metadata.parquet | metadata.csv (the same, e.g. the shapes world's pool/)
    <shard>.tar, a folder of .tar shards, or 'shards/{00000..00099}.tar'
                                             webdataset: <key>.jpg|png|webp + <key>.txt (or .json
                                             with a "caption"), e.g. img2dataset output"""


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
