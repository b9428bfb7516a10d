"""The one per-query uncertainty interface: what every method exports, and its scoring against the
ambiguity the data records.

Every method writes its per-query uncertainties at test time to
``<run_dir>/uncertainty/<stage>_<subset>.csv``, one row per query:

- the composed-retrieval protocol (RUIR, HUG and any CIR method; :mod:`xmodal.protocols.cir`):
  ``query, pair_id, reference, target, text, target_rank, uncertainty[, sigma_r2, ...]``;
- uCLIP (``<subset>`` = ``i2t`` for image queries, ``t2i`` for caption queries):
  ``query, item, target_rank, uncertainty[, <method>, ...]``, uncertainty = -confidence;
- ProbVLM (the same subsets): ``query, item, target_rank, uncertainty[, <kind>, ...]``, the
  predicted variances (``method.uncertainty`` first, then ``method.compare``);
- X-MoRe (``<subset>`` = ``images``): ``query, item, label, pred_image, pred_text, uncertainty,
  text``, the image- and text-modal uncertainties 1 - alpha and 1 - beta (eq. 1).

``uncertainty`` and every column after it are uncertainties (higher = less sure). A query is named
by its ``item`` (the image's path relative to ``data.root``, ``#j`` appended for its j-th caption)
or, for composed retrieval, by ``<reference>><target>``: the ids of :mod:`xmodal.data.ambiguity`.

When the dataset has an ``ambiguity.json`` (the shapes world written with ``ambiguity=True``),
:func:`ambiguity_metrics` scores every uncertainty column against it
(:func:`xmodal.metrics.ambiguity.ambiguity_scores`), for every run, in one place (the pipeline
calls it before writing metrics.json): keys ``<stage>/<subset>/ambiguity/<kind>/{spearman,auroc,
count}`` for ``uncertainty`` and ``<stage>/<subset>/<column>/ambiguity/...`` for the others, plus
``<stage>/<subset>/ambiguity/matched`` (queries found in the sidecar).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from xmodal import inputs
from xmodal.data.ambiguity import (
    FILE,
    Item,
    caption_item,
    cir_item,
    read_sidecar,
    sidecar_folder,
)
from xmodal.metrics.ambiguity import DEFAULT_THRESHOLD, ambiguity_scores
from xmodal.runs import atomic_write_text

log = logging.getLogger("xmodal")

FOLDER = "uncertainty"
FIRST_UNCERTAINTY = "uncertainty"


def csv_path(run_dir: Path | str, stage: str, subset: str) -> Path:
    """``<run_dir>/uncertainty/<stage>_<subset>.csv``."""
    return Path(run_dir) / FOLDER / f"{stage}_{subset}.csv"


def relative_items(paths: Sequence[Any], root: Path | str) -> list[str]:
    """Query ids of image paths: each path relative to ``root`` (``data.root``), POSIX style."""
    root = os.path.abspath(root)
    return [Path(os.path.relpath(os.path.abspath(str(p)), root)).as_posix() for p in paths]


def retrieval_items(
    split: Any, root: Path | str, valid: Sequence[bool] | Tensor | None = None
) -> dict[str, list[str]]:
    """Query ids of an image-text split (``RetrievalSplit``), undecodable images (``valid``
    False) and their captions left out as the evaluators drop them: ``i2t`` the images (path
    relative to ``root``), ``t2i`` the captions (``<image>#<j>``, j-th caption of its image)."""
    images = relative_items(split.image_paths, root)
    keep = [True] * len(images) if valid is None else [bool(v) for v in valid]
    captions, seen = [], {}
    for image in split.caption_image:
        j = seen[image] = seen.get(image, -1) + 1
        if keep[image]:
            captions.append(caption_item(images[image], j))
    return {"i2t": [i for i, ok in zip(images, keep) if ok], "t2i": captions}


def write_query_csv(
    path: Path | str,
    leading: Mapping[str, Sequence[Any]],
    uncertainties: Mapping[str, Tensor | Sequence[float]],
) -> None:
    """Write one row per query: the ``leading`` columns, then the uncertainty columns (the first
    one named ``uncertainty``), floats written exactly (``repr``)."""
    names = list(uncertainties)
    if not names or names[0] != FIRST_UNCERTAINTY:
        raise ValueError(f"the first uncertainty column must be {FIRST_UNCERTAINTY!r}, got {names}")
    columns = [list(v) for v in leading.values()]
    values = [
        torch.as_tensor(v, dtype=torch.float64).flatten().tolist() for v in uncertainties.values()
    ]
    n = len(values[0])
    if any(len(c) != n for c in columns + values):
        raise ValueError("every column needs one value per query")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*leading, *names])
    for i in range(n):
        writer.writerow([*(c[i] for c in columns), *(repr(float(v[i])) for v in values)])
    atomic_write_text(Path(path), buf.getvalue())


def write_retrieval_csvs(
    run_dir: Path | str,
    items: Mapping[str, Sequence[str]],
    ranks: Mapping[str, Tensor],
    uncertainties: Mapping[str, Mapping[str, Tensor]],
    stage: str = "test",
) -> None:
    """The image-text files of uCLIP and ProbVLM: ``<stage>_i2t.csv`` and ``<stage>_t2i.csv``
    with ``query, item, target_rank`` then one column per entry of ``uncertainties`` (name ->
    ``{"i2t": [I], "t2i": [T]}``), the first written as ``uncertainty``. ``items``: the query
    ids of :func:`retrieval_items`; ``ranks``: each query's target rank per direction."""
    names = list(uncertainties)
    for d in ("i2t", "t2i"):
        columns = {FIRST_UNCERTAINTY: uncertainties[names[0]][d]}
        columns.update({name: uncertainties[name][d] for name in names[1:]})
        leading = {
            "query": range(len(items[d])),
            "item": items[d],
            "target_rank": torch.as_tensor(ranks[d]).tolist(),
        }
        write_query_csv(csv_path(run_dir, stage, d), leading, columns)


def read_query_csv(path: Path | str) -> tuple[list[str], dict[str, list[float]]]:
    """(query ids, uncertainty column -> values) of a per-query uncertainty file."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return [], {}
    header = list(rows[0])
    if FIRST_UNCERTAINTY not in header:
        raise ValueError(f"{path}: no {FIRST_UNCERTAINTY!r} column (found {header})")
    if "item" in header:
        ids = [r["item"] for r in rows]
    elif {"reference", "target"} <= set(header):
        ids = [cir_item(r["reference"], r["target"]) for r in rows]
    else:
        raise ValueError(f"{path}: queries need an 'item' or 'reference' + 'target' column")
    names = header[header.index(FIRST_UNCERTAINTY) :]
    values = {n: [float(r[n]) if r[n] not in ("", None) else math.nan for r in rows] for n in names}
    return ids, values


def _lookup(item: str, items: Mapping[str, Item], root: Path, folder: Path) -> Item | None:
    """The sidecar entry of a query id, taking ids relative to ``data.root`` to the sidecar's
    folder (e.g. ImageNet: root = the data root, sidecar in ``imagenet/images/val``)."""
    if item in items:
        return items[item]
    path, sep, caption = item.partition("#")
    moved = Path(os.path.relpath(os.path.abspath(root / path), os.path.abspath(folder))).as_posix()
    return items.get(moved + sep + caption)


def ambiguity_metrics(
    data_cfg: DictConfig | Mapping[str, Any],
    run_dir: Path | str,
    stage: str = "test",
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Score every ``<run_dir>/uncertainty/<stage>_*.csv`` against the data's ``ambiguity.json``
    (module docs); empty when the dataset has no sidecar or the run wrote no uncertainties."""
    family = data_cfg.get("family")
    if not family or not data_cfg.get("root"):
        return {}
    try:
        folder = sidecar_folder(family, data_cfg["root"], data_cfg.get("dataset"))
    except (KeyError, ValueError):
        return {}
    sidecar = folder / FILE
    files = sorted((Path(run_dir) / FOLDER).glob(f"{stage}_*.csv"))
    if not sidecar.is_file() or not files:
        return {}
    inputs.note(sidecar)
    items = read_sidecar(sidecar)
    root = Path(data_cfg["root"])
    out: dict[str, Any] = {}
    for path in files:
        subset = path.stem[len(stage) + 1 :]
        ids, columns = read_query_csv(path)
        found = [_lookup(i, items, root, folder) for i in ids]
        keep = [k for k, f in enumerate(found) if f is not None]
        out[f"{stage}/{subset}/ambiguity/matched"] = len(keep)
        if len(keep) < len(ids):
            log.warning(
                "%s: %d of %d queries are not in %s (another world?); they are left out of the "
                "ambiguity scores",
                path,
                len(ids) - len(keep),
                len(ids),
                sidecar,
            )
        if not keep:
            continue
        level = [found[k].level for k in keep]
        kind = [found[k].kind for k in keep]
        for name, values in columns.items():
            if all(math.isnan(values[k]) for k in keep):  # e.g. a source the model does not have
                continue
            scores = ambiguity_scores([values[k] for k in keep], level, kind, threshold)
            prefix = f"{stage}/{subset}/" + ("" if name == FIRST_UNCERTAINTY else f"{name}/")
            out.update({f"{prefix}ambiguity/{key}": v for key, v in scores.items()})
    return out
