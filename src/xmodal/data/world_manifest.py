"""Which shapes world a folder holds, from its MANIFEST.json: standard library only, so that the
"finished, skipping" path can tell that the world a run read is one this xmodal would rewrite
(a newer generator) without importing the generator (:mod:`xmodal.data.shapes`, torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 2: COCO captions_*2014.json and eccv_caption ground truth
#: the ambiguity world's own version: 2, the X-MoRe pool holds new photos of every class of the
#: classification sets
AMBIGUITY_VERSION = 2
AMBIGUITY_FRACTION = 0.5  # the share of each dataset's items made ambiguous (the default)
SEED = 0  # the default seed of the worlds the data options write (`data.shapes_seed`)


def data_seed(data_cfg: Any) -> int:
    """The seed a data config draws its shapes world from (``data.shapes_seed``, default 0)."""
    return int(data_cfg.get("shapes_seed") or SEED)


def ambiguity_record(fraction: float, pool_noise: float, train: bool) -> dict[str, Any]:
    """What a manifest records of an ambiguity world (:class:`~xmodal.data.shapes.Ambiguity`)."""
    return {
        "fraction": fraction,
        "pool_noise": pool_noise,
        "train": train,
        "version": AMBIGUITY_VERSION,
    }


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def matches(manifest: dict | None, seed: int, size: str, ambiguity: dict | None) -> bool:
    """Whether ``manifest`` is that of the world of ``seed``, ``size`` and ``ambiguity`` (its
    :func:`ambiguity_record`; None: the default world) written by this xmodal."""
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("seed") == seed
        and manifest.get("size") == size
        and manifest.get("ambiguity") == ambiguity
    )


def data_ambiguity(data_cfg: Any) -> dict | None:
    """The ambiguity a data config asks for (``data.shapes_ambiguity`` and its options), as
    :func:`ambiguity_record` fields, or None for the default world."""
    if not data_cfg.get("shapes_ambiguity"):
        return None
    return {
        "pool_noise": float(data_cfg.get("shapes_pool_noise") or 0.0),
        "train": bool(data_cfg.get("shapes_ambiguity_train")),
    }


def outdated_world(data_cfg: Any, shapes_dir: str | Path | None = None) -> str | None:
    """Why the shapes world a run reads is not the one this xmodal writes for it (it will be
    rewritten before the run, so a finished run on it is stale); None when it is, or when the data
    is not a generated shapes world (``data.shapes_world`` unset). The world is at
    ``data.shapes_dir``, else ``shapes_dir`` (as :func:`~xmodal.data.datamodule.ensure_shapes_world`
    writes it)."""
    size = data_cfg.get("shapes_world")
    folder = data_cfg.get("shapes_dir") or shapes_dir
    if not size or not folder:
        return None
    path = Path(folder) / "MANIFEST.json"
    asked = data_ambiguity(data_cfg)
    record = None if asked is None else ambiguity_record(AMBIGUITY_FRACTION, **asked)
    if matches(read_manifest(path), data_seed(data_cfg), size, record):
        return None
    return f"the shapes world it read ({path.parent}) is not the one this xmodal writes"
