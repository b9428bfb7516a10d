"""Extended positives of COCO's 5k test (ECCV Caption, CxC, PMRP) in the ``eccv_caption`` format.

The ``eccv_caption`` package (NAVER, MIT; Chun et al., ECCV 2022) ships the ground truth of the
COCO 5k test as JSON files keyed by COCO ids: for each set, ``<set>_image_to_caption.json``
(image id -> caption ids) and ``<set>_caption_to_image.json`` (caption id -> image ids), with
string keys and integer lists. The sets are ``original`` (COCO's own pairs), ``cxc``
(Crisscrossed Captions) and ``eccv`` (ECCV Caption, whose queries are a subset: 1,332 captions and
1,261 images); ``coco_test_ids.npy`` lists the 25,000 caption ids (5 per image, image by image)
in the order of the 1k folds. PCME's plausible matches (``pm_*.json``, > 140 MB) are a separate
download that eccv_caption reads from an ``extra_file_dir``.

``load(folder)`` reads a folder in that layout; ``folder="eccv_caption"`` means the files bundled
with the installed package. Nothing is downloaded. Loaders read data; the metrics live in
:mod:`xmodal.protocols.extended`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from xmodal import inputs
from xmodal.errors import DatasetLayoutError

#: ``data.extended_positives`` value that names the files bundled with the eccv_caption package.
BUNDLED = "eccv_caption"
#: protocol -> file prefix; ``pm`` (PMRP) comes from its own folder when given.
SETS = {"coco": "original", "cxc": "cxc", "eccv": "eccv"}
PM_SET = "pm"
FILES = {"i2t": "image_to_caption", "t2i": "caption_to_image"}
FOLD_IDS = "coco_test_ids.npy"

LAYOUT = """\
    <folder>/original_image_to_caption.json   {"<image id>": [caption ids]}  (COCO's own pairs)
    <folder>/original_caption_to_image.json   {"<caption id>": [image ids]}
    <folder>/cxc_{image_to_caption,caption_to_image}.json    (CxC)
    <folder>/eccv_{image_to_caption,caption_to_image}.json   (ECCV Caption)
    <folder>/coco_test_ids.npy                (optional: caption ids in the order of the 1k folds)
    <pm folder>/pm_{image_to_caption,caption_to_image}.json  (optional, data.plausible_matches)"""

Positives = dict[int, list[int]]


@dataclass
class ExtendedPositives:
    """The ground-truth sets of one COCO test split.

    ``sets[protocol][direction]`` maps a query id to its positive ids: protocol ``coco``
    (original), ``cxc``, ``eccv`` and, when given, ``pm``; direction ``i2t`` (image id -> caption
    ids) or ``t2i`` (caption id -> image ids). ``caption_order`` is the protocol's caption set in
    the order of the 1k folds (``coco_test_ids.npy``, else the keys of the original
    caption-to-image file); the protocol's images are the keys of the original image-to-caption
    file.
    """

    source: str
    sets: dict[str, dict[str, Positives]]
    caption_order: list[int]

    @property
    def image_ids(self) -> set[int]:
        return set(self.sets["coco"]["i2t"])


def bundled_folder() -> Path:
    """The data folder of the installed ``eccv_caption`` package (found without importing it)."""
    spec = importlib.util.find_spec("eccv_caption")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetLayoutError(
            "data.extended_positives=eccv_caption names the ground truth bundled with the "
            "eccv_caption package, which is not installed. Fix: `pip install eccv_caption` "
            "(an xmodal dependency), point data.extended_positives at a folder in its format, "
            "or set data.extended_positives=null."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _error(problem: str, folder: Path) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"extended positives (ECCV Caption / CxC / PMRP ground truth): {problem}\n"
        f"  folder: {folder}\n"
        f"  expected the eccv_caption package's layout:\n{LAYOUT}\n"
        "  fix: point data.extended_positives at such a folder (`eccv_caption`: the files bundled "
        "with the package) and data.plausible_matches at the folder of pm_*.json (or null), or "
        "set data.extended_positives=null to evaluate without extended positives."
    )


def _read_set(folder: Path, prefix: str) -> dict[str, Positives]:
    import json

    out = {}
    for direction, name in FILES.items():
        path = folder / f"{prefix}_{name}.json"
        if not path.is_file():
            raise _error(f"missing file {path}", folder)
        inputs.note(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            out[direction] = {int(k): [int(i) for i in v] for k, v in raw.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise _error(
                f"malformed {path}: expected an object of id -> list of ids ({exc})", folder
            ) from None
    return out


def _read_order(folder: Path, fallback: list[int]) -> list[int]:
    path = folder / FOLD_IDS
    if not path.is_file():
        return fallback
    import numpy as np

    inputs.note(path)
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _error(f"malformed {path}: expected a 1-d integer array ({exc})", folder) from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise _error(f"malformed {path}: expected a 1-d integer array, got {ids.dtype}", folder)
    return [int(i) for i in ids]


def load(folder: str | Path, pm_folder: str | Path | None = None) -> ExtendedPositives:
    """Read the ground truth of ``folder`` (``"eccv_caption"``: the package's bundled files) and
    PCME's plausible matches of ``pm_folder`` when given."""
    source = str(folder)
    path = bundled_folder() if source == BUNDLED else Path(folder).expanduser()
    if not path.is_dir():
        raise _error("no such folder", path)
    sets = {protocol: _read_set(path, prefix) for protocol, prefix in SETS.items()}
    if pm_folder is not None:
        pm_path = Path(pm_folder).expanduser()
        if not pm_path.is_dir():
            raise _error("data.plausible_matches: no such folder", pm_path)
        sets["pm"] = _read_set(pm_path, PM_SET)
    order = _read_order(path, list(sets["coco"]["t2i"]))
    if len(set(order)) != len(order):
        raise _error(f"{path / FOLD_IDS} lists a caption id twice", path)
    unknown = [c for c in order if c not in sets["coco"]["t2i"]]
    if unknown:
        raise _error(
            f"{len(unknown)} caption ids of {FOLD_IDS} (e.g. {unknown[0]}) are not in "
            "original_caption_to_image.json",
            path,
        )
    return ExtendedPositives(source, sets, order)
