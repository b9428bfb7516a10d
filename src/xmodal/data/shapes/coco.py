"""COCO and Flickr30k in Karpathy's json (plus Flickr30k's nlphuji csv and COCO's CLIP_benchmark
webdataset of the test split): image-caption retrieval formats."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from collections.abc import Sequence

from xmodal.data.shapes.captions import distinct_captions, tokens
from xmodal.data.shapes.scenes import PALE_BACKGROUNDS, random_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize


def _shuffled_splits(names: Sequence[str], counts: Sequence[int], rng: random.Random) -> list[str]:
    """One split label per image, interleaved like the real Karpathy files."""
    labels = [name for name, n in zip(names, counts) for _ in range(n)]
    rng.shuffle(labels)
    return labels


def _n_captions(k: int) -> int:
    """COCO-like caption counts: mostly 5, about 10% 6 or 7 (both present in any split >= 30)."""
    return 7 if k % 25 == 7 else 6 if k % 12 == 5 else 5


def _karpathy_entry(imgid: int, first_sentid: int, captions: list[str]) -> dict:
    sentences = [
        {"tokens": tokens(c), "raw": c, "imgid": imgid, "sentid": first_sentid + j}
        for j, c in enumerate(captions)
    ]
    return {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences}


def _write_wds(out: Out, rel: str, samples: list[tuple[bytes, list[str]]], shards: int) -> int:
    """A CLIP_benchmark retrieval webdataset split: nshards.txt + <i>.tar of (jpg, txt) samples."""
    shards = max(2, min(shards, len(samples)))
    for s in range(shards):
        lo, hi = s * len(samples) // shards, (s + 1) * len(samples) // shards
        with tarfile.open(out.path(f"{rel}/{s}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(lo, hi):
                data, captions = samples[i]
                for name, payload in (
                    (f"s{i:07d}.jpg", data),
                    (f"s{i:07d}.txt", "\n".join(captions).encode()),
                ):
                    info = tarfile.TarInfo(name)  # mtime 0, uid 0, mode 0644: reproducible
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out.text(f"{rel}/nshards.txt", f"{shards}\n")
    return shards


def write_coco(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    splits = ("train", "restval", "val", "test")
    labels = _shuffled_splits(splits, size.coco, rng)
    cocoids = rng.sample(range(1, 600_000), len(labels))
    seen = dict.fromkeys(splits, 0)
    counts = {s: {"images": 0, "captions": 0} for s in splits}
    images, test = [], []
    sentid = 0
    for imgid, (split, cocoid) in enumerate(zip(labels, cocoids)):
        scene = random_scene(rng, background=rng.choice(PALE_BACKGROUNDS))
        captions = distinct_captions(scene, rng, _n_captions(seen[split]))
        seen[split] += 1
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        data = out.image(f"coco/{folder}/{filename}", scene)
        entry = {"filepath": folder, "filename": filename, "split": split, "cocoid": cocoid}
        entry.update(_karpathy_entry(imgid, sentid, captions))
        images.append(entry)
        sentid += len(captions)
        counts[split]["images"] += 1
        counts[split]["captions"] += len(captions)
        if split == "test":
            test.append((data, captions))
    out.json("coco/dataset_coco.json", {"images": images, "dataset": "coco"})
    shards = _write_wds(out, "coco/wds/test", test, size.wds_shards)
    out.text("coco/wds/dataset_type.txt", "retrieval\n")
    wds = {"images": len(test), "captions": counts["test"]["captions"], "shards": shards}
    return {"coco": counts, "coco_wds": {"test": wds}}


def write_flickr30k(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    splits = ("train", "val", "test")
    labels = _shuffled_splits(splits, size.flickr30k, rng)
    ids = rng.sample(range(10_000_000, 9_999_999_999), len(labels))
    counts = {s: {"images": 0, "captions": 0} for s in splits}
    images, rows = [], []
    for imgid, (split, fid) in enumerate(zip(labels, ids)):
        scene = random_scene(rng, background=rng.choice(PALE_BACKGROUNDS))
        captions = distinct_captions(scene, rng, 5)
        filename = f"{fid}.jpg"
        out.image(f"flickr30k/flickr30k-images/{filename}", scene)
        entry = _karpathy_entry(imgid, 5 * imgid, captions)
        entry.update({"split": split, "filename": filename})
        images.append(entry)
        rows.append([json.dumps(captions), json.dumps(entry["sentids"]), split, filename, imgid])
        counts[split]["images"] += 1
        counts[split]["captions"] += 5
    out.json("flickr30k/dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    with out.path("flickr30k/flickr_annotations_30k.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        writer.writerows(rows)
    return {"flickr30k": counts}
