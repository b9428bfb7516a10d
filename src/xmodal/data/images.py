"""Image reading for every loader: files or members of webdataset tar shards, plus layout checks.

An image reference is a path, or the string ``"<shard.tar>::<member>"`` for an image stored inside
a webdataset shard (CLIP_benchmark's ``wds_*`` mirrors), so a split can point into tars without
unpacking them. ``Layout`` holds the small file checks the loaders share, so every missing or
malformed file ends in the same one-paragraph ``DatasetLayoutError``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from xmodal import inputs
from xmodal.data.base import DatasetLayoutError, layout_error
from xmodal.errors import CorruptImageError

TAR_SEP = "::"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")
ON_CORRUPT = ("fail", "skip")

ImageRef = str | Path


# Tar handles are cached per process: a forked DataLoader worker must not share the parent's file
# offset, so the key includes the pid and each worker lazily opens its own handle.
_TARS: dict[tuple[int, str], tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}


def split_tar_ref(ref: ImageRef) -> tuple[str, str] | None:
    """Return ``(shard, member)`` for a ``"<shard.tar>::<member>"`` reference, else None."""
    if isinstance(ref, Path) or TAR_SEP not in ref:
        return None
    shard, member = ref.split(TAR_SEP, 1)
    return shard, member


def wds_samples(shard: Path | str) -> dict[str, dict[str, str]]:
    """A webdataset shard's members grouped by sample key (folder + basename up to the first
    dot), in tar order: ``key -> {lowercased extension: member name}``, except ``txt`` and
    ``json`` members, which map to their decoded text. Raises ``tarfile.TarError``, ``OSError``
    or ``UnicodeDecodeError`` on a broken shard (callers name the file in their error)."""
    samples: dict[str, dict[str, str]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            folder, _, base = info.name.rpartition("/")
            if not info.isfile() or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            ext = ext.lower()
            value = info.name
            if ext in ("txt", "json"):
                fh = tar.extractfile(info)
                assert fh is not None
                value = fh.read().decode("utf-8")
            samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = value
    return samples


def tar_ref(shard: Path | str, member: str) -> str:
    """Build the reference of ``member`` inside the tar ``shard``."""
    return f"{shard}{TAR_SEP}{member}"


def _open_tar(shard: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    key = (os.getpid(), shard)
    if key not in _TARS:
        tar = tarfile.open(shard, "r")
        _TARS[key] = (tar, {m.name: m for m in tar.getmembers() if m.isfile()})
    return _TARS[key]


def read_bytes(ref: ImageRef) -> bytes:
    """Raw bytes of a file or of a tar member (used for images and wds ``.txt`` members)."""
    parts = split_tar_ref(ref)
    if parts is None:
        return Path(ref).read_bytes()
    shard, member = parts
    tar, members = _open_tar(shard)
    if member not in members:
        raise FileNotFoundError(f"{member} is not in tar shard {shard}")
    fh = tar.extractfile(members[member])
    assert fh is not None
    return fh.read()


def open_image(ref: ImageRef) -> Image.Image:
    """Open an image as fully decoded RGB; ``ref`` is a path or ``"<shard.tar>::<member>"``."""
    try:
        if split_tar_ref(ref) is None:
            with Image.open(ref) as img:
                return img.convert("RGB")
        with Image.open(io.BytesIO(read_bytes(ref))) as img:
            return img.convert("RGB")
    except (OSError, ValueError, tarfile.TarError) as exc:
        raise CorruptImageError(f"cannot read image {ref}: {exc}") from exc


class ImageDataset(Dataset):
    """Images by reference for encoding; an item is ``(index, tensor, valid)``.

    ``on_corrupt="fail"`` stops at the first unreadable image with a message naming it;
    ``"skip"`` returns a zero tensor of the usual shape with ``valid=False`` so the caller can drop
    and count it (batches keep a fixed shape).
    """

    def __init__(
        self,
        refs: Sequence[ImageRef],
        transform: Callable[[Image.Image], torch.Tensor],
        on_corrupt: str = "fail",
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.refs = list(refs)
        self.transform = transform
        self.on_corrupt = on_corrupt
        self._shape: torch.Size | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def _blank(self) -> torch.Tensor:
        # The shape of a transformed image; transforms resize/crop to a fixed size, so any
        # stand-in image gives it.
        if self._shape is None:
            self._shape = self.transform(Image.new("RGB", (256, 256))).shape
        return torch.zeros(self._shape)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, bool]:
        ref = self.refs[index]
        try:
            image = open_image(ref)
        except CorruptImageError as exc:
            if self.on_corrupt == "fail":
                raise CorruptImageError(
                    f"{exc}\n  (image #{index}) re-download or replace it, or set "
                    "`data.on_corrupt=skip` to drop unreadable images and count them"
                ) from exc
            return index, self._blank(), False
        tensor = self.transform(image)
        if self._shape is None:
            self._shape = tensor.shape
        return index, tensor, True


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted like torchvision's ImageFolder.

    The folders walked are noted as run inputs (:mod:`xmodal.inputs`): adding or removing an
    image changes a folder's modification time, and with it the split.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        inputs.note(dirpath)
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMG_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return found


@dataclass(frozen=True)
class Layout:
    """The expected tree of one dataset; turns every file problem into a ``DatasetLayoutError``.

    ``dataset`` is the prepare-script name (``scripts/prepare_<dataset>.py``).
    """

    dataset: str
    root: Path
    tree: str

    def error(self, problem: str) -> DatasetLayoutError:
        """The standard paragraph for ``problem``."""
        return layout_error(self.dataset, problem, self.root, self.tree)

    def require(self, path: Path, kind: str = "file") -> Path:
        """Return ``path`` if it exists as a file (``kind="file"``) or folder, else raise."""
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            found = "" if not path.exists() else f" (it exists but is not a {kind})"
            raise self.error(f"missing {kind} {path}{found}")
        if kind == "file":
            inputs.note(path)  # an annotation file: its content decides the split
        return path

    def read_text(self, path: Path) -> str:
        """Text of a required file."""
        try:
            return self.require(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(f"malformed file {path}: not UTF-8 text ({exc})") from None

    def read_json(self, path: Path) -> Any:
        """Parsed JSON of a required file; a parse error names the file and the position."""
        text = self.read_text(path)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise self.error(f"malformed JSON in {path}: {exc}") from None

    def check(self, ok: bool, problem: str) -> None:
        """Raise the paragraph for ``problem`` unless ``ok``."""
        if not ok:
            raise self.error(problem)

    def require_all(self, paths: Sequence[Path], what: str) -> None:
        """Raise if any of ``paths`` is missing, naming the count and the first few."""
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            shown = "\n    ".join(str(p) for p in missing[:5])
            raise self.error(
                f"{len(missing)} of {len(paths)} {what} are missing, e.g.\n    {shown}"
            )
