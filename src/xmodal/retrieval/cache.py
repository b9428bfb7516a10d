"""On-disk embedding cache for frozen encoders.

An entry is keyed by everything that determines the embeddings: the backbone identity (architecture,
the weights' content hash, or the seed of random-init weights, QuickGELU, preprocessing), the
dataset, split and item list with each image file's fingerprint (size and modification time, so a
replaced image is re-encoded), the policy for corrupt images, the transform and the kind of item
(image or text) plus any sampler state (e.g. an MC-dropout pass and its seed). A sweep over
uncertainty methods therefore encodes a dataset once, and never reuses embeddings of other inputs.

Writes are atomic (temp file in the same folder + ``os.replace``): an interrupted run never leaves a
half-written entry, and a reader sees either the old entry or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from xmodal.errors import broken_file


class EmbeddingCache:
    """A folder of ``<key>.pt`` entries with a human-readable ``<key>.json`` describing each key."""

    def __init__(self, root: Path | str, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    @staticmethod
    def key(parts: Mapping[str, Any]) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:20]

    def path(self, parts: Mapping[str, Any]) -> Path:
        return self.root / f"{self.key(parts)}.pt"

    def load(self, parts: Mapping[str, Any]) -> Any | None:
        """The cached value, or None on a miss (or when the cache is disabled)."""
        if not self.enabled:
            return None
        path = self.path(parts)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable entry gets the same advice
            raise broken_file(
                path,
                f"this embedding cache entry cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it is truncated or "
                "was not written by xmodal",
                f"delete it (`rm {path} {path.with_suffix('.json')}`) and re-run to recompute "
                "it, or run with evaluator.cache=false",
            ) from None

    def save(self, parts: Mapping[str, Any], value: Any) -> Path:
        path = self.path(parts)
        if not self.enabled:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        meta = path.with_suffix(".json")
        meta.write_text(json.dumps(parts, indent=2, sort_keys=True, default=str) + "\n")
        return path

    def get_or_compute(
        self, parts: Mapping[str, Any], compute: Callable[[], Any], write: bool = True
    ) -> Any:
        """Return the cached value or compute it (and store it when ``write``, i.e. on rank 0)."""
        value = self.load(parts)
        if value is None:
            value = compute()
            if write:
                self.save(parts, value)
        return value
