"""CIRR (rc2) triplets with the CLIP4Cir protocol: gallery = every image of the split file, the
reference removed from its own ranking, ``img_set.members`` for Recall_subset (cir.md §2).

Reads the official layout (images under ``img_raw/``) and the CLIP4Cir one (images next to
``cirr/``); the split files hold paths like ``./dev/dev-244-0-img0.png`` relative to either.
"""

from __future__ import annotations

from pathlib import Path

from xmodal.data.base import CIRSplit
from xmodal.data.images import Layout

SPLITS = ("train", "val", "test1")

LAYOUT = """\
    <root>/cirr/captions/cap.rc2.{train,val,test1}.json
        [{"pairid", "reference", "target_hard", "caption", "img_set": {"members": [6 names]}}]
    <root>/cirr/image_splits/split.rc2.{train,val,test1}.json   {name: "./dev/<name>.png", ...}
    <root>/img_raw/{train/<0..99>,dev,test1}/*.png     (official layout)
  or
    <root>/{train/<0..99>,dev,test1}/*.png             (CLIP4Cir layout)"""


def caption_path(root: Path | str, split: str) -> Path:
    """``<root>/cirr/captions/cap.rc2.<split>.json``: the triplets and image sets of a split."""
    return Path(root) / "cirr" / "captions" / f"cap.rc2.{split}.json"


def split_path(root: Path | str, split: str) -> Path:
    """``<root>/cirr/image_splits/split.rc2.<split>.json``: image name -> relative path."""
    return Path(root) / "cirr" / "image_splits" / f"split.rc2.{split}.json"


def load(root: Path | str, split: str = "val") -> CIRSplit:
    """Load a CIRR split (``train``, ``val`` or ``test1``; test1 has ``target=None``)."""
    root = Path(root)
    layout = Layout("cirr", root, LAYOUT)
    if split not in SPLITS:
        raise ValueError(f"cirr split must be one of {SPLITS}, got {split!r}")
    cap_file, split_file = caption_path(root, split), split_path(root, split)
    layout.require(cap_file)
    layout.require(split_file)

    files = layout.read_json(split_file)
    layout.check(
        isinstance(files, dict) and all(isinstance(v, str) for v in files.values()),
        f"malformed {split_file}: expected an object name -> relative path",
    )
    image_root = root / "img_raw" if (root / "img_raw").is_dir() else root
    name_to_path = {name: image_root / rel for name, rel in files.items()}
    layout.require_all(list(name_to_path.values()), f"images listed in {split_file.name}")

    data = layout.read_json(cap_file)
    layout.check(isinstance(data, list) and bool(data), f"malformed {cap_file}: expected a list")
    has_target = split != "test1"
    reference, text, target, pair_ids, members = [], [], [], [], []
    try:
        for item in data:
            pair_ids.append(int(item["pairid"]))
            reference.append(item["reference"])
            text.append(item["caption"])
            members.append(list(item["img_set"]["members"]))
            if has_target:
                target.append(item["target_hard"])
    except (KeyError, TypeError, ValueError) as exc:
        needs = "pairid, reference, caption, img_set.members" + (", target_hard" * has_target)
        raise layout.error(f"malformed {cap_file}: every entry needs {needs} ({exc!r})") from None
    layout.check(len(set(pair_ids)) == len(pair_ids), f"malformed {cap_file}: duplicate pairid")
    for names in [reference, target, *members]:
        unknown = [n for n in names if n not in name_to_path]
        layout.check(
            not unknown, f"images {unknown[:3]} of {cap_file.name} are not in {split_file}"
        )
    return CIRSplit(
        name=f"cirr_{split}",
        protocol="clip4cir",
        reference=reference,
        text=text,
        target=target if has_target else None,
        gallery=list(files),
        name_to_path=name_to_path,
        remove_reference=True,
        captions=[[t] for t in text],
        pair_ids=pair_ids,
        members=members,
    )
