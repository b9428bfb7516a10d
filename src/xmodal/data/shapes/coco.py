"""COCO and Flickr30k in Karpathy's json (plus Flickr30k's nlphuji csv and COCO's CLIP_benchmark
webdataset of the test split): image-caption retrieval formats.

COCO also gets the official ``annotations/captions_{train,val}2014.json`` (the caption ids) and,
for its test split, extended positives in the ``eccv_caption`` package's format
(``eccv_caption/``), derived from the world's ground truth instead of human annotators: a
caption is an extended positive of an image when its :class:`~xmodal.data.shapes.captions.Claim`
holds for that image's scene (see :func:`extended_positives`).
"""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

from xmodal.data.shapes.ambiguity import retrieval_item
from xmodal.data.shapes.captions import Claim, described_captions, distinct_captions, tokens
from xmodal.data.shapes.rendering import IMAGE_SIZE
from xmodal.data.shapes.scenes import PALE_BACKGROUNDS, Scene, random_scene
from xmodal.data.shapes.world import Counts, Out, WorldSize

#: Captions per test image in the extended-positive files (eccv_caption's 25,000 = 5 x 5,000; the
#: Karpathy test has 25,010: the 6th and 7th captions of a few images are in no ground truth).
CAPTIONS_PER_TEST_IMAGE = 5
#: Offset of the caption ids of captions_*2014.json: unlike real COCO, where Karpathy's sentids
#: are the annotation ids, the world's sentids are running numbers, so the loader has to match
#: captions by text (the path Karpathy-format files without COCO ids take).
ANNOTATION_ID_BASE = 1_000_000


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


@dataclass(frozen=True)
class _Image:
    """One COCO image of the world: its ids, scene and captions with their claims."""

    cocoid: int
    folder: str
    filename: str
    scene: Scene
    captions: list[str]
    claims: list[Claim]

    @property
    def caption_ids(self) -> list[int]:
        return [ANNOTATION_ID_BASE + 10 * self.cocoid + j for j in range(len(self.captions))]


def write_coco(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    splits = ("train", "restval", "val", "test")
    labels = _shuffled_splits(splits, size.coco, rng)
    cocoids = rng.sample(range(1, 600_000), len(labels))
    seen = dict.fromkeys(splits, 0)
    counts = {s: {"images": 0, "captions": 0} for s in splits}
    images, test, drawn, test_images = [], [], [], []
    sentid = 0
    rec = out.recorder("coco")  # the ambiguity world's per-item ambiguity (None: default world)
    for imgid, (split, cocoid) in enumerate(zip(labels, cocoids)):
        scene = random_scene(rng, background=rng.choice(PALE_BACKGROUNDS))
        captions, claims = zip(*described_captions(scene, rng, _n_captions(seen[split])))
        captions = list(captions)
        seen[split] += 1
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        degraded = None
        if rec is not None:  # claims of the ambiguity world's captions keep the positives true
            image_id = f"{folder}/{filename}"
            training = split in ("train", "restval")
            degraded, described = retrieval_item(
                rec, "coco", image_id, scene, len(captions), training
            )
            captions, claims = [c for c, _ in described], [c for _, c in described]
        data = out.image(f"coco/{folder}/{filename}", scene, degraded)
        entry = {"filepath": folder, "filename": filename, "split": split, "cocoid": cocoid}
        entry.update(_karpathy_entry(imgid, sentid, captions))
        images.append(entry)
        sentid += len(captions)
        counts[split]["images"] += 1
        counts[split]["captions"] += len(captions)
        image = _Image(cocoid, folder, filename, scene, captions, list(claims))
        drawn.append(image)
        if split == "test":
            test.append((data, captions))
            test_images.append(image)
    out.json("coco/dataset_coco.json", {"images": images, "dataset": "coco"})
    shards = _write_wds(out, "coco/wds/test", test, size.wds_shards)
    out.text("coco/wds/dataset_type.txt", "retrieval\n")
    _write_captions_json(out, drawn)
    positives = extended_positives(test_images)
    _write_eccv_caption(out, "coco/eccv_caption", positives, test_images)
    wds = {"images": len(test), "captions": counts["test"]["captions"], "shards": shards}
    extended = {
        name: {"i2t_queries": len(gt["i2t"]), "t2i_queries": len(gt["t2i"])}
        for name, gt in positives.items()
    }
    return {"coco": counts, "coco_wds": {"test": wds}, "coco_eccv_caption": extended}


def _write_captions_json(out: Out, drawn: Sequence[_Image]) -> None:
    """The official ``annotations/captions_<folder>.json`` (train2014: Karpathy train; val2014:
    restval, val and test), annotations listed caption slot by caption slot, not image by image,
    as no loader may assume they are grouped."""
    for folder in ("train2014", "val2014"):
        mine = [im for im in drawn if im.folder == folder]
        listed = [
            {"id": im.cocoid, "file_name": im.filename, "width": IMAGE_SIZE, "height": IMAGE_SIZE}
            for im in mine
        ]
        notes = [
            {"image_id": im.cocoid, "id": ann_id, "caption": caption, "slot": j}
            for im in mine
            for j, (ann_id, caption) in enumerate(zip(im.caption_ids, im.captions))
        ]
        notes.sort(key=lambda a: a["slot"])  # stable: image order within a slot
        annotations = [{k: a[k] for k in ("image_id", "id", "caption")} for a in notes]
        info = {"description": "xmodal shapes world, COCO 2014 captions format", "version": "1"}
        obj = {"info": info, "images": listed, "licenses": [], "annotations": annotations}
        out.json(f"coco/annotations/captions_{folder}.json", obj)


def extended_positives(test: Sequence[_Image]) -> dict[str, dict[str, dict[int, list[int]]]]:
    """The world's ground truth in the four sets of eccv_caption's format (protocol ->
    ``"i2t"``: image id -> caption ids, ``"t2i"``: caption id -> image ids), over the first
    ``CAPTIONS_PER_TEST_IMAGE`` captions of every test image:

    - ``original``: each image and its own captions (COCO's positives);
    - ``eccv``: every caption whose claim holds for the image's scene (ECCV Caption's positives
      are the captions annotators judged correct), for every other image and every other caption
      as queries (ECCV Caption covers a subset of the queries too);
    - ``cxc``: the original pairs plus captions whose claim holds and names every object of the
      image (the analogue of CxC's highly rated pairs), for every query;
    - ``pm``: images and captions of images with the same set of (colour, shape) objects
      (PCME's plausible matches share their object classes), for every query.
    """
    keep = CAPTIONS_PER_TEST_IMAGE
    captions = [
        (cid, claim, im)
        for im in test
        for cid, claim in list(zip(im.caption_ids, im.claims))[:keep]
    ]
    classes = {im.cocoid: frozenset((o.colour, o.shape) for o in im.scene.objects) for im in test}

    sets: dict[str, list[tuple[int, int]]] = {"original": [], "eccv": [], "cxc": [], "pm": []}
    for im in test:  # (image id, caption id) pairs, image-major
        for cid, claim, own in captions:
            pair = (im.cocoid, cid)
            true = claim.holds(im.scene)
            if own is im:
                sets["original"].append(pair)
            if true:
                sets["eccv"].append(pair)
            if own is im or (true and len(claim.mentions) == len(im.scene.objects)):
                sets["cxc"].append(pair)
            if classes[own.cocoid] == classes[im.cocoid]:
                sets["pm"].append(pair)
    image_queries = {im.cocoid for im in test}
    caption_queries = {cid for cid, _, _ in captions}
    eccv_images = {im.cocoid for im in test[::2]}
    eccv_captions = {cid for cid, _, _ in captions[::2]}
    out: dict[str, dict[str, dict[int, list[int]]]] = {}
    for name, found in sets.items():
        images = eccv_images if name == "eccv" else image_queries
        texts = eccv_captions if name == "eccv" else caption_queries
        i2t: dict[int, list[int]] = {}
        t2i: dict[int, list[int]] = {}
        for image_id, caption_id in found:
            if image_id in images:
                i2t.setdefault(image_id, []).append(caption_id)
            if caption_id in texts:
                t2i.setdefault(caption_id, []).append(image_id)
        out[name] = {"i2t": i2t, "t2i": dict(sorted(t2i.items(), key=lambda kv: kv[0]))}
    return out


def _write_eccv_caption(
    out: Out, rel: str, positives: dict[str, dict[str, dict[int, list[int]]]], test: list[_Image]
) -> None:
    """eccv_caption's data folder: ``<set>_image_to_caption.json`` and
    ``<set>_caption_to_image.json`` (string ids as keys, lists of int ids) for the sets
    original, cxc, eccv and pm (the plausible matches eccv_caption reads from ``extra_file_dir``),
    and ``coco_test_ids.npy`` (int64 caption ids, image by image: the order of the 1k folds)."""
    import numpy as np

    for name, gt in positives.items():
        for direction, file in (("i2t", "image_to_caption"), ("t2i", "caption_to_image")):
            out.json(f"{rel}/{name}_{file}.json", {str(k): v for k, v in gt[direction].items()})
    ids = [cid for im in test for cid in im.caption_ids[:CAPTIONS_PER_TEST_IMAGE]]
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int64))
    out.path(f"{rel}/coco_test_ids.npy").write_bytes(buf.getvalue())


def write_flickr30k(out: Out, rng: random.Random, size: WorldSize) -> Counts:
    splits = ("train", "val", "test")
    labels = _shuffled_splits(splits, size.flickr30k, rng)
    ids = rng.sample(range(10_000_000, 9_999_999_999), len(labels))
    counts = {s: {"images": 0, "captions": 0} for s in splits}
    images, rows = [], []
    rec = out.recorder("flickr30k")
    for imgid, (split, fid) in enumerate(zip(labels, ids)):
        scene = random_scene(rng, background=rng.choice(PALE_BACKGROUNDS))
        captions = distinct_captions(scene, rng, 5)
        filename = f"{fid}.jpg"
        degraded = None
        if rec is not None:
            image_id = f"flickr30k-images/{filename}"
            training = split == "train"
            degraded, described = retrieval_item(rec, "flickr30k", image_id, scene, 5, training)
            captions = [c for c, _ in described]
        out.image(f"flickr30k/flickr30k-images/{filename}", scene, degraded)
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
