"""Fingerprints of the files a run reads, so a finished run or a cache entry is only reused while
its inputs are unchanged (standard library only: the "finished, skipping" path stays cheap).

A file's fingerprint is its size and modification time (``[size, mtime_ns]``): replacing an image,
rewriting an annotation file or re-exporting a checkpoint changes it, and checking thousands of
files costs one ``stat`` each. Weight files are also identified by their content hash where the
embedding cache needs it (:func:`xmodal.backbones.file_identity`).

While a run works, :func:`recording` collects every file the loaders read (:func:`note`): the
annotation files through ``xmodal.data.images.Layout``, the images of every loaded split, the
backbone's weights and any other file the resolved config names. The run directory keeps the
record (``inputs.json``); :func:`changed_files` compares it with the disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TAR_SEP = "::"  # an image inside a webdataset shard: "<shard.tar>::<member>"

Fingerprint = list[int]  # [size, mtime_ns]; [-1, -1] for a missing file


def fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """``[size, mtime_ns]`` of a file (the shard of a ``<shard>::<member>`` reference);
    ``[-1, -1]`` when it does not exist."""
    path = os.fspath(path).split(TAR_SEP, 1)[0]
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def digest(items: Iterable[Any]) -> str:
    """Stable hash of a list of strings/paths as written (the item list of a split), in order;
    :func:`content_digest` hashes the files' fingerprints instead."""
    h = hashlib.sha1()
    for item in items:
        h.update(str(item).encode())
        h.update(b"\0")
    return h.hexdigest()


def content_digest(refs: Iterable[Any]) -> str:
    """One hash of the fingerprints of ``refs`` in order: it changes when any of the files is
    replaced, rewritten, added or removed (the embedding cache keys images on it)."""
    h = hashlib.sha1()
    for ref in refs:
        size, mtime = fingerprint(ref)
        h.update(f"{ref}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


class InputLog:
    """The files one run read, each with its fingerprint at the time it was first noted."""

    def __init__(self) -> None:
        self.files: dict[str, Fingerprint] = {}

    def add(self, path: str | os.PathLike[str]) -> None:
        key = os.path.abspath(os.fspath(path).split(TAR_SEP, 1)[0])
        if key not in self.files:
            self.files[key] = fingerprint(key)

    def as_tree(self) -> dict[str, dict[str, Fingerprint]]:
        """``{folder: {file name: fingerprint}}``: compact for thousands of images."""
        tree: dict[str, dict[str, Fingerprint]] = {}
        for path, fp in sorted(self.files.items()):
            folder, name = os.path.split(path)
            tree.setdefault(folder, {})[name] = fp
        return tree


_ACTIVE: list[InputLog] = []


@contextmanager
def recording() -> Iterator[InputLog]:
    """Collect every file :func:`note` sees in this process while the block runs."""
    log = InputLog()
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)


def note(*paths: str | os.PathLike[str]) -> None:
    """Record files as inputs of the runs being recorded (a no-op when none is)."""
    note_all(paths)


def note_all(paths: Iterable[str | os.PathLike[str]]) -> None:
    if not _ACTIVE:
        return
    for path in paths:
        for log in _ACTIVE:
            log.add(path)


def note_config_files(node: Any, skip: Iterable[str] = ()) -> None:
    """Note every existing file that a (resolved, plain) config names, and the files directly
    inside every folder it names (a ``save_pretrained`` folder, an index folder), except the
    dotted keys in ``skip`` (data roots, output folders), whose readers note what they read."""
    skipped = set(skip)

    def walk(value: Any, key: str) -> None:
        if key in skipped:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        elif isinstance(value, str) and ("/" in value or os.sep in value):
            path = Path(value).expanduser()
            if path.is_file():
                note(path)
            elif path.is_dir():
                note_all(p for p in sorted(path.iterdir()) if p.is_file())

    walk(node, "")


def changed_files(tree: dict[str, dict[str, Fingerprint]]) -> list[str]:
    """The recorded files whose fingerprint differs from the disk now (missing ones included)."""
    changed = []
    for folder, files in tree.items():
        for name, recorded in files.items():
            path = os.path.join(folder, name)
            if fingerprint(path) != list(recorded):
                changed.append(path)
    return changed
