"""COCO's extended-positive evaluation (ECCV Caption, CxC, PMRP, COCO 1k/5k).

Against the reference implementation (the ``eccv_caption`` package) on random rankings over its
own COCO ids, the chunked top-R pass against a dense reference, the Karpathy -> COCO id mapping,
the layout errors, the shapes world's ground truth and the shapes runs that report the keys.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmodal.data import coco, extended
from xmodal.data.base import DatasetLayoutError
from xmodal.data.extended import ExtendedPositives
from xmodal.data.shapes import Scene, SceneObject
from xmodal.data.shapes.captions import Claim, Mention, described_captions
from xmodal.evaluators.uclip import Posterior, UCLIPEvaluator, mean_cosine
from xmodal.metrics import positive_ranks, precision_at_r, ranked_hits
from xmodal.metrics.precision import ranked_positives_from_embeddings
from xmodal.protocols.extended import coco_extended_metrics

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "failed to import ujson"
    from eccv_caption import Metrics

KS = (1, 5, 10)
DIRS = ("i2t", "t2i")


# ------------------------------------------------------------------------------ reference


def eccv_reference(
    sets: dict, caption_order: list[int], image_ids, caption_ids, scores: torch.Tensor, keep
) -> dict[str, float]:
    """eccv_caption's own numbers (percent, xmodal's key names) on the rankings of ``scores``
    [I, T] (ties to the lower loaded index); captions outside ``keep`` are not in its lists."""

    def ranking(s: torch.Tensor, ids: list[int], ok: list[bool]) -> list[list[int]]:
        order = torch.sort(s, dim=1, descending=True, stable=True).indices.tolist()
        return [[ids[j] for j in row if ok[j]] for row in order]

    i2t = dict(zip(image_ids, ranking(scores, caption_ids, keep)))
    t2i = dict(zip(caption_ids, ranking(scores.T, image_ids, [True] * len(image_ids))))
    retrieved = {"i2t": i2t, "t2i": t2i}
    m = Metrics()
    m.coco_gts, m.cxc_gts, m.eccv_gts = sets["coco"], sets["cxc"], sets["eccv"]
    m.pm_gts = sets.get("pm", {})
    m.coco_ids = np.asarray(caption_order)
    out: dict[str, float] = {}
    for k in KS:
        for name, fn in (
            ("coco1k", m.coco_1k_recalls),
            ("coco5k", m.coco_5k_recalls),
            ("cxc", m.cxc_recalls),
            ("eccv", m.eccv_recalls),
        ):
            scores_k = fn(retrieved, "all", K=k)
            out.update({f"{name}/{d}/R@{k}": 100 * scores_k[d] for d in DIRS})
    eccv = m.eccv_metrics(retrieved, "all")
    for d in DIRS:
        out[f"eccv/{d}/mAP@R"] = 100 * eccv["eccv_map_at_r"][d]
        out[f"eccv/{d}/R-P"] = 100 * eccv["eccv_rprecision"][d]
        if m.pm_gts:
            out[f"pm/{d}/R-P"] = 100 * m.pmrp(retrieved, "all")[d]
    return out


def restricted(full: ExtendedPositives, n_images: int) -> tuple[dict, list[int]]:
    """The bundled ground truth's queries among its first ``n_images`` images (5 captions each);
    their lists keep positives outside them, which count in R but can never be retrieved (as
    ECCV Caption's 2 captions outside the 25,000)."""
    captions = full.caption_order[: 5 * n_images]
    cset = set(captions)
    images = {full.sets["coco"]["t2i"][c][0] for c in captions}

    def cut(s: dict) -> dict:
        return {
            "i2t": {i: v for i, v in s["i2t"].items() if i in images},
            "t2i": {c: v for c, v in s["t2i"].items() if c in cset},
        }

    return {name: cut(s) for name, s in full.sets.items()}, captions


@pytest.fixture(scope="module")
def bundled() -> ExtendedPositives:
    return extended.load("eccv_caption")


def test_bundled_ground_truth_is_read_from_the_package(bundled):
    counts = {name: (len(s["i2t"]), len(s["t2i"])) for name, s in bundled.sets.items()}
    # ECCV Caption: 1,261 image and 1,332 caption queries; CxC lists 24,972 of the captions
    assert counts == {"coco": (5000, 25000), "cxc": (5000, 24972), "eccv": (1261, 1332)}
    assert len(bundled.caption_order) == 25000 and len(bundled.image_ids) == 5000
    # folds: 5 x 1,000 images, each image's 5 captions in one fold
    t2i = bundled.sets["coco"]["t2i"]
    folds = [
        {t2i[c][0] for c in bundled.caption_order[f * 5000 : (f + 1) * 5000]} for f in range(5)
    ]
    assert [len(f) for f in folds] == [1000] * 5 and len(set().union(*folds)) == 5000


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_eccv_caption_on_its_own_ids(bundled, seed):
    """Random coarse embeddings (many tied scores) over the first 300 images of eccv_caption's
    ground truth, loaded in a shuffled order with 7 captions outside the protocol (like the
    Karpathy test's extra captions), plus random plausible matches: every key equals
    eccv_caption's own value on the same rankings."""
    rng = np.random.default_rng(seed)
    sets, order = restricted(bundled, 300)
    images = sorted(sets["coco"]["i2t"])
    outside = bundled.caption_order[-10:]  # plausible matches the split lacks count in R too
    sets["pm"] = {
        "i2t": {i: rng.choice(order, 30, replace=False).tolist() + outside[:2] for i in images},
        "t2i": {c: sorted(rng.choice(images, 6, replace=False).tolist()) for c in order},
    }
    unretrievable = sum(c not in set(order) for v in sets["cxc"]["i2t"].values() for c in v)
    assert unretrievable > 0  # CxC positives of images outside the 300
    gt = ExtendedPositives("test", sets, order)
    image_ids = [int(i) for i in rng.permutation(images)]
    caption_ids = [int(c) for c in rng.permutation(order + [10**9 + i for i in range(7)])]
    g = torch.Generator().manual_seed(seed)
    img = (F.normalize(torch.randn(len(image_ids), 6, generator=g), dim=1) * 3).round()
    txt = (F.normalize(torch.randn(len(caption_ids), 6, generator=g), dim=1) * 3).round()
    ours = coco_extended_metrics(img, txt, image_ids, caption_ids, gt, KS, chunk_size=97).metrics
    keep = [c < 10**9 for c in caption_ids]
    ref = eccv_reference(sets, order, image_ids, caption_ids, img @ txt.T, keep)
    assert set(ref) <= set(ours)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert ours["eccv/i2t/num_queries"] == len(sets["eccv"]["i2t"])
    assert ours["eccv/t2i/num_queries"] == len(sets["eccv"]["t2i"])


# ------------------------------------------------------------------------- the chunked pass


def test_chunked_pass_equals_the_dense_reference():
    """Several positive sets, items left out of the gallery, ties, chunks of every size: the
    ranks, AP@R and R-Precision equal the dense sort of the full score matrix."""
    g = torch.Generator().manual_seed(3)
    num_q, num_g = 70, 90
    queries = torch.randint(-2, 3, (num_q, 5), generator=g).float()
    gallery = torch.randint(-2, 3, (num_g, 5), generator=g).float()
    keep = torch.rand(num_g, generator=g) < 0.85
    sets = {}
    for name, p in (("sparse", 0.03), ("dense", 0.25)):
        positives = (torch.rand(num_q, num_g, generator=g) < p) & keep
        positives[0] = False  # a query without positives
        sets[name] = positives
    scores = (queries @ gallery.T).masked_fill(~keep, float("-inf"))
    for chunk, gallery_chunk in ((1, 7), (13, 90), (1024, 65536)):
        out = ranked_positives_from_embeddings(
            queries,
            gallery,
            {n: p.nonzero() for n, p in sets.items()},
            depth=10,
            keep=keep,
            chunk_size=chunk,
            gallery_chunk_size=gallery_chunk,
        )
        for name, positives in sets.items():
            res = out[name]
            assert res.depth == max(10, *(int(p.sum(1).max()) for p in sets.values()))
            ap, rp = precision_at_r(ranked_hits(scores, positives, res.depth), positives.sum(1))
            assert torch.equal(res.ap.isnan(), ap.isnan()) and torch.equal(
                res.num_positives, positives.sum(1)
            )
            assert torch.allclose(res.ap[~ap.isnan()], ap[~ap.isnan()], atol=0, rtol=0)
            assert torch.allclose(res.rp[~rp.isnan()], rp[~rp.isnan()], atol=0, rtol=0)
            assert torch.equal(res.rank, positive_ranks(scores, positives, res.depth))


def test_posterior_mean_scores_rank_like_the_dense_mean():
    """uCLIP's pass scores S̄ = mean_k cos(t_k, i_k) chunk by chunk (``mean_cosine``): its
    ECCV numbers equal eccv_caption's on the dense S̄ ranking; with N = 1 they equal the
    retrieval evaluator's cosine numbers."""
    g = torch.Generator().manual_seed(5)
    num_images, per_image, n, dim = 12, 5, 3, 8
    image_ids = list(range(100, 100 + num_images))
    caption_ids = [1000 + i for i in range(num_images * per_image)]
    caption_image = torch.arange(num_images).repeat_interleave(per_image)
    text = torch.randn(n, len(caption_ids), dim, generator=g)
    image = torch.randn(n, num_images, dim, generator=g)
    original = {
        "i2t": {
            i: caption_ids[k * per_image : (k + 1) * per_image] for k, i in enumerate(image_ids)
        },
        "t2i": {c: [image_ids[k // per_image]] for k, c in enumerate(caption_ids)},
    }
    eccv = {
        "i2t": {i: caption_ids[: 3 + k] for k, i in enumerate(image_ids[::2])},
        "t2i": {c: image_ids[: 1 + k % 4] for k, c in enumerate(caption_ids[::3])},
    }
    gt = ExtendedPositives("test", {"coco": original, "cxc": original, "eccv": eccv}, caption_ids)
    uclip = UCLIPEvaluator(sampler="single", block_size=200)
    posterior = Posterior(text, image, caption_image, block_size=200)
    ours = uclip.extended(posterior, image_ids, caption_ids, gt)
    mean = torch.stack(
        [F.normalize(image[k], dim=-1) @ F.normalize(text[k], dim=-1).T for k in range(n)]
    ).mean(0)
    ref = eccv_reference(
        gt.sets, caption_ids, image_ids, caption_ids, mean, [True] * len(caption_ids)
    )
    for key, value in ref.items():
        assert ours.metrics[key] == pytest.approx(value, abs=1e-9), key
    block = mean_cosine(posterior.text.transpose(0, 1)[:7], posterior.image.transpose(0, 1))
    assert torch.allclose(block, mean.T[:7], atol=1e-6)
    # per-query ECCV R-Precision: NaN exactly for the queries ECCV does not list
    listed = torch.tensor([c in eccv["t2i"] for c in caption_ids])
    assert torch.equal(~ours.eccv_rprecision["t2i"].isnan(), listed)
    single = Posterior(text[:1], image[:1], caption_image)
    cosine = coco_extended_metrics(
        F.normalize(image[0], dim=-1), F.normalize(text[0], dim=-1), image_ids, caption_ids, gt
    )
    assert uclip.extended(single, image_ids, caption_ids, gt).metrics == cosine.metrics


# ---------------------------------------------------------------------- the shapes world


def test_claims_are_true_of_their_scene_and_read_geometrically():
    import random

    rng = random.Random(0)
    red_left = SceneObject("circle", "red", "large", (0, 1))
    blue_right = SceneObject("star", "blue", "small", (2, 0))
    scene = Scene((red_left, blue_right), background="sky")
    for _ in range(200):  # every caption the generator writes holds for its own scene
        for _, claim in described_captions(scene, rng, 5):
            assert claim.holds(scene)
    left_of = Claim("plain", (Mention("circle", "red"), Mention("star")), relation="to the left of")
    above = Claim("plain", (Mention("circle", "red"), Mention("star")), relation="above")
    assert left_of.holds(scene) and not above.holds(scene)  # the star is higher (row 0)
    assert Claim("plain", (Mention("star", size="small"),), more=True).holds(scene)
    assert not Claim("plain", (Mention("star", size="large"),)).holds(scene)
    assert not Claim("plain", (Mention("star"),), count=1).holds(scene)
    assert not Claim("plain", (Mention("star"),), background="mint").holds(scene)
    assert not Claim("plain", (Mention("star"), Mention("star"))).holds(scene)  # two objects
    assert not Claim("sketch", (Mention("star"),)).holds(scene)


def test_shapes_world_ground_truth_is_eccv_caption_format(shapes_world):
    """The world's files load in xmodal and in eccv_caption alike; every COCO pair is an ECCV,
    CxC and plausible-match pair; ECCV lists half the queries; the fold ids are 5 per image."""
    folder = shapes_world / "coco" / "eccv_caption"
    gt = extended.load(folder, folder)
    test = coco.load(shapes_world / "coco", "test", ids=True)
    order = np.load(folder / "coco_test_ids.npy")
    assert order.dtype == np.int64 and len(order) == 5 * len(test.image_paths)
    assert gt.image_ids == set(test.image_ids) and set(order) <= set(test.caption_ids)
    for name in ("eccv", "cxc", "pm"):
        for d in DIRS:
            for query, own in gt.sets["coco"][d].items():
                if name != "eccv" or query in gt.sets[name][d]:
                    assert set(own) <= set(gt.sets[name][d][query]), (name, d, query)
    assert len(gt.sets["eccv"]["i2t"]) == (len(test.image_paths) + 1) // 2
    extra = [len(v) - 5 for v in gt.sets["eccv"]["i2t"].values()]
    assert sum(extra) > 0  # captions of other images that describe the image too
    m = Metrics(extra_file_dir=str(folder))
    m.set_coco_gts(
        folder / "original_image_to_caption.json", folder / "original_caption_to_image.json"
    )
    m.set_cxc_gts(folder / "cxc_image_to_caption.json", folder / "cxc_caption_to_image.json")
    m.set_eccv_gts(folder / "eccv_image_to_caption.json", folder / "eccv_caption_to_image.json")
    assert m.eccv_gts == gt.sets["eccv"] and m.pm_gts == gt.sets["pm"]


# ------------------------------------------------------------------------- COCO ids


def test_karpathy_split_maps_to_coco_ids(shapes_world):
    """Karpathy json and webdataset give the same ids; each caption's id is the annotation of
    its image with its text in the official captions_val2014.json."""
    root = shapes_world / "coco"
    kar = coco.load(root, "test", fmt="karpathy", ids=True)
    wds = coco.load(root, "test", fmt="wds", ids=True)
    assert kar.image_ids == wds.image_ids and kar.caption_ids == wds.caption_ids
    entries = [
        e
        for e in json.loads((root / "dataset_coco.json").read_text())["images"]
        if e["split"] == "test"
    ]
    assert kar.image_ids == [e["cocoid"] for e in entries]
    anns = {
        a["id"]: a
        for a in json.loads((root / "annotations/captions_val2014.json").read_text())["annotations"]
    }
    for caption, cid, image in zip(kar.captions, kar.caption_ids, kar.caption_image):
        assert anns[cid]["caption"] == caption and anns[cid]["image_id"] == kar.image_ids[image]
    assert len(set(kar.caption_ids)) == len(kar.captions)
    assert coco.load(root, "test").caption_ids is None  # ids only when asked


def _tiny_coco(root: Path, image: Path, sentids: list[int]) -> None:
    """A one-image COCO root whose image has two identical captions and one other."""
    (root / "val2014").mkdir(parents=True)
    shutil.copy(image, root / "val2014" / "COCO_val2014_000000000042.jpg")
    raws = ["A red circle.", "a red  circle", "A blue star"]
    sentences = [{"raw": r, "sentid": s, "tokens": []} for r, s in zip(raws, sentids)]
    entry = {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42}
    entry.update({"split": "test", "sentences": sentences, "imgid": 0, "sentids": sentids})
    (root / "dataset_coco.json").write_text(json.dumps({"images": [entry]}))
    annotations = [
        {"image_id": 42, "id": 907, "caption": "A blue star "},
        {"image_id": 42, "id": 905, "caption": "a red circle"},
        {"image_id": 42, "id": 903, "caption": "A red circle"},
        {"image_id": 7, "id": 1, "caption": "A red circle."},
    ]
    (root / "annotations").mkdir()
    (root / "annotations/captions_val2014.json").write_text(
        json.dumps({"annotations": annotations})
    )


def test_sentids_are_annotation_ids_when_they_are_and_text_decides_otherwise(
    shapes_world, tmp_path
):
    image = next((shapes_world / "coco" / "val2014").iterdir())
    # Karpathy's COCO file: sentids are the annotation ids (here in another order than the file)
    _tiny_coco(tmp_path / "a", image, [903, 905, 907])
    assert coco.load(tmp_path / "a", "test", ids=True).caption_ids == [903, 905, 907]
    # sentids that are no annotation of the image: by text, repeated texts in file order
    _tiny_coco(tmp_path / "b", image, [0, 1, 2])
    data = coco.load(tmp_path / "b", "test", ids=True)
    assert data.image_ids == [42] and data.caption_ids == [905, 903, 907]


def test_missing_captions_json_names_the_file_and_the_fix(shapes_world, tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    for child in (shapes_world / "coco").iterdir():
        if child.name != "annotations":
            (root / child.name).symlink_to(child, target_is_directory=child.is_dir())
    assert coco.load(root, "test").caption_ids is None  # without ids nothing is needed
    with pytest.raises(DatasetLayoutError) as err:
        coco.load(root, "test", ids=True)
    text = str(err.value)
    assert f"missing {root / 'annotations' / 'captions_val2014.json'}" in text
    for part in ("'annotations'", "'image_id', 'id', 'caption'", "annotations_trainval2014.zip"):
        assert part in text
    assert "data.extended_positives=null" in text and "prepare_coco.py" in text


def test_missing_ground_truth_file_names_it(shapes_world, tmp_path):
    folder = tmp_path / "gt"
    shutil.copytree(shapes_world / "coco" / "eccv_caption", folder)
    (folder / "cxc_caption_to_image.json").unlink()
    with pytest.raises(DatasetLayoutError, match="missing file .*cxc_caption_to_image.json"):
        extended.load(folder)
    (folder / "eccv_image_to_caption.json").write_text("[1, 2]")
    with pytest.raises(DatasetLayoutError, match="data.extended_positives=null"):
        extended.load(folder)


# ---------------------------------------------------------------------- shapes runs


def test_shapes_retrieval_run_reports_the_extended_keys(
    xmodal_env, shapes_world, tmp_path, monkeypatch
):
    """`xmodal-eval experiment=shapes/retrieval` (in process) on the small world reports every
    extended-positive key, each equal to eccv_caption's value on the ranking of the very
    embeddings whose CLIP_benchmark R@K the run reports (the Karpathy test's 5 extra captions
    take no part in the protocols), keyed by the split's COCO ids."""
    from xmodal import backbones
    from xmodal.config import compose
    from xmodal.pipeline import evaluate
    from xmodal.protocols import extended as protocol
    from xmodal.protocols.retrieval import image_text_retrieval_metrics

    seen, original = {}, protocol.coco_extended_metrics

    def spy(images, texts, image_ids, caption_ids, gt, *args, **kwargs):
        seen.update(images=images, texts=texts, image_ids=image_ids, caption_ids=caption_ids, gt=gt)
        return original(images, texts, image_ids, caption_ids, gt, *args, **kwargs)

    monkeypatch.setattr(protocol, "coco_extended_metrics", spy)

    torch.manual_seed(0)
    model, _, _ = backbones.build("tiny_clip")
    weights = backbones.save_checkpoint(model, tmp_path / "tiny.pt", "tiny_clip")
    overrides = [
        "experiment=shapes/retrieval",
        "data.shapes_world=small",
        f"backbone.pretrained={weights}",
        "trainer.enable_progress_bar=false",
    ]
    metrics = evaluate(compose("eval", overrides), overrides)
    for d in DIRS:
        for k in KS:
            for name in ("coco1k", "coco5k", "cxc", "eccv"):
                assert 0 <= metrics[f"test/{name}/{d}/R@{k}"] <= 100
        for key in ("eccv/{d}/mAP@R", "eccv/{d}/R-P", "pm/{d}/R-P"):
            assert 0 <= metrics["test/" + key.format(d=d)] <= 100
    assert metrics["test/eccv/i2t/num_queries"] == 15 and metrics["test/eccv/t2i/num_queries"] == 75
    split = coco.load(shapes_world / "coco", "test", ids=True)
    assert seen["image_ids"] == split.image_ids and seen["caption_ids"] == split.caption_ids
    images, texts, gt = seen["images"], seen["texts"], seen["gt"]
    assert texts.shape[0] == len(split.captions) == len(gt.caption_order) + 5
    # the same embeddings give the run's CLIP_benchmark R@K (over all 155 captions)
    clip = image_text_retrieval_metrics(images, texts, torch.tensor(split.caption_image), KS)
    for d in DIRS:
        for k in KS:
            assert metrics[f"test/{d}/R@{k}"] == pytest.approx(clip[f"{d}/R@{k}"], abs=1e-9)
    protocol_captions = set(gt.caption_order)
    keep = [c in protocol_captions for c in split.caption_ids]
    ref = eccv_reference(
        gt.sets, gt.caption_order, split.image_ids, split.caption_ids, images @ texts.T, keep
    )
    assert "pm/i2t/R-P" in ref
    for key, value in ref.items():
        assert metrics[f"test/{key}"] == pytest.approx(value, abs=1e-9), key


def test_ids_of_dropped_images_and_their_captions_are_dropped_too():
    from omegaconf import OmegaConf

    from xmodal.data.base import RetrievalSplit
    from xmodal.evaluators.retrieval import extended_positives, kept_ids

    split = RetrievalSplit("x", [Path("a"), Path("b"), Path("c")], list("pqrst"), [0, 0, 1, 2, 2])
    split.image_ids, split.caption_ids = [7, 8, 9], [70, 71, 80, 90, 91]
    assert kept_ids(split, torch.tensor([True, False, True])) == ([7, 9], [70, 71, 90, 91])
    cfg = OmegaConf.create({"extended_positives": None})
    assert extended_positives(cfg, split) is None  # off
    cfg = OmegaConf.create({"extended_positives": "eccv_caption", "plausible_matches": None})
    split.caption_ids = None
    assert extended_positives(cfg, split) is None  # a split without COCO ids (not the test)
