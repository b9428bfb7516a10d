"""uCLIP (``evaluator=uclip``): the five confidences, the oracle, recalls, bins, calibration
scores and rejection curves against a plain per-query reference of the official semantics
(``tests/uclip_reference.py``), hand-computed metric cases, the MC-dropout sampler, the ensemble
configs, and one end-to-end ``xmodal-eval`` run on the small shapes world.

"Exact" means bitwise equal, except top-1 similarity values, which are means of N float32 scores
summed in a different order (equal to 1e-6).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import uclip_reference as ref
from xmodal.evaluators.uclip import (
    METHODS,
    Posterior,
    UCLIPEvaluator,
    confidence,
    mc_dropout,
    oracle_confidence,
    pass_seed,
)
from xmodal.metrics import (
    binned_recall,
    calibration_scores,
    confidence_aurc,
    confidence_auroc,
    confidence_bins,
    confidence_ece,
    rejection_area,
    rejection_curve,
)

REPO = Path(__file__).resolve().parents[1]


def make_samples(num_images=24, dim=32, samples=5, seed=0, caption_noise=0.9, sample_noise=0.4):
    """uclip.md §8(a): each caption is its image's base vector + noise, each posterior sample adds
    its own noise; 3-6 captions per image (never assume 5). Norm ~1.5, so a 0.025 step matters."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_images, dim, generator=g)
    per_image = torch.randint(3, 7, (num_images,), generator=g)
    caption_image = torch.arange(num_images).repeat_interleave(per_image)
    captions = base[caption_image] + caption_noise * torch.randn(
        len(caption_image), dim, generator=g
    )
    scale = 1.5 / dim**0.5
    text = torch.stack(
        [captions + sample_noise * torch.randn(captions.shape, generator=g) for _ in range(samples)]
    )
    image = torch.stack(
        [base + sample_noise * torch.randn(base.shape, generator=g) for _ in range(samples)]
    )
    return scale * text, scale * image, caption_image


def truth_of(caption_image, num_images):
    return caption_image[:, None] == torch.arange(num_images)[None]


def assert_matches(method, ours, official):
    for a, b in zip(ours, official):
        assert not torch.isnan(a).any()
        if method == "top1_similarity":
            torch.testing.assert_close(a, b.float(), atol=1e-6, rtol=0)
        elif method.startswith("adversarial"):
            torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=0)
        else:
            assert torch.equal(a, b.float())


@pytest.fixture(scope="module")
def synthetic():
    return make_samples()


@pytest.mark.parametrize("method", METHODS)
def test_confidence_matches_official_semantics(method, synthetic):
    text, image, _ = synthetic
    ours = confidence(method, text, image)
    assert_matches(method, ours, ref.METHODS[method](list(text), list(image)))
    assert ours[0].shape == (text.shape[1],) and ours[1].shape == (image.shape[1],)


def test_discrete_and_bounded_values(synthetic):
    text, image, _ = synthetic
    n = text.shape[0]
    for conf in confidence("top1_consistency", text, image):
        assert torch.equal(conf * n, (conf * n).round()) and conf.min() >= 1 / n
    for method in ("top5_consistency", "adversarial", "adversarial_linear"):
        for conf in confidence(method, text, image):
            assert 0 <= conf.min() and conf.max() <= 1
    # the walk takes at least one step (unless it stops at a zero gradient) and at most 50
    for conf in confidence("adversarial", text, image):
        radius = torch.atanh(conf.double())
        assert radius.min() > 0.02 and radius.max() <= 50 * 0.025 + 1e-4


def test_duplicate_gallery_rows_give_zero_never_nan():
    text, image, _ = make_samples(seed=1)

    def mean_cosine():  # the adversarial methods rank with the cosine of the mean embeddings
        return F.normalize(text.mean(0), dim=-1) @ F.normalize(image.mean(0), dim=-1).T

    # copy a query's top-1 into another row, in every sample: two identical gallery items tie
    top_image, top_caption = int(mean_cosine()[0].argmax()), int(mean_cosine()[:, 0].argmax())
    copies = torch.tensor([top_image, (top_image + 1) % image.shape[1]])
    caption_copies = torch.tensor([top_caption, (top_caption + 1) % text.shape[1]])
    image[:, copies[1]] = image[:, top_image]
    text[:, caption_copies[1]] = text[:, top_caption]
    on_duplicate = torch.isin(mean_cosine().argmax(1), copies)  # caption queries (t2i)
    on_duplicate_caption = torch.isin(mean_cosine().T.argmax(1), caption_copies)  # i2t
    ours = {m: confidence(m, text, image) for m in METHODS}
    # top-5 sets of tied duplicates depend on torch.topk's unspecified tie order in the official
    # code; ours break ties by the lower index everywhere, so only the others compare exactly
    for method in (m for m in METHODS if m != "top5_consistency"):
        assert_matches(method, ours[method], ref.METHODS[method](list(text), list(image)))
    assert all(0 <= c.min() and c.max() <= 1 for c in ours["top5_consistency"])
    for method in ("adversarial", "adversarial_linear"):
        text_conf, image_conf = ours[method]
        assert torch.equal(text_conf[on_duplicate], torch.zeros(int(on_duplicate.sum())))
        assert torch.equal(
            image_conf[on_duplicate_caption], torch.zeros(int(on_duplicate_caption.sum()))
        )
        assert (text_conf[~on_duplicate] > 0).all() and (
            image_conf[~on_duplicate_caption] > 0
        ).all()


def test_single_sample():
    text, image, _ = make_samples(samples=1, seed=2)
    for method in METHODS:
        ours = confidence(method, text, image)
        assert_matches(method, ours, ref.METHODS[method](list(text), list(image)))
    for conf in confidence("top1_consistency", text, image) + confidence(
        "top5_consistency", text, image
    ):
        assert torch.equal(conf, torch.ones_like(conf))


def test_oracle_matches_official_and_ranks_of_the_mean(synthetic):
    text, image, caption_image = synthetic
    truth = truth_of(caption_image, image.shape[1])
    one = oracle_confidence(text[:1], image[:1], caption_image)
    for a, b in zip(one, ref.oracle(list(text[:1]), list(image[:1]), truth)):
        assert torch.equal(a, b)
    # N > 1: 1 / (0-based rank of the first positive in S̄)
    mean = ref.all_scores(list(text), list(image)).mean(0)
    for conf, scores, pos in zip(
        oracle_confidence(text, image, caption_image), (mean, mean.T), (truth, truth.T)
    ):
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = pos.gather(1, order).int().argmax(1)
        assert torch.equal(conf, 1.0 / rank.float())
        assert torch.isinf(conf).any() and (conf[~torch.isinf(conf)] <= 1).all()


def test_recall_ranks_use_the_mean_score(synthetic):
    text, image, caption_image = synthetic
    truth = truth_of(caption_image, image.shape[1])
    mean = ref.all_scores(list(text), list(image)).mean(0)
    ranks = Posterior(text, image, caption_image).ranks()
    for k in (1, 5, 10):
        assert torch.equal(ranks["t2i"] < k, ref.hits_at_k(mean, truth, k))
        assert torch.equal(ranks["i2t"] < k, ref.hits_at_k(mean.T, truth.T, k))
    single = Posterior(text[:1], image[:1], caption_image).ranks()
    assert not torch.equal(single["t2i"], ranks["t2i"])  # R@1 comes from S̄, not sample 0


def test_streaming_blocks_do_not_change_results(synthetic):
    """One caption row per block exercises every cross-block merge (image tops, ranks, oracle)."""
    text, image, caption_image = synthetic
    whole = Posterior(text, image, caption_image)
    tiny = Posterior(text, image, caption_image, block_size=1)
    assert torch.equal(whole.scan(5).image_top, tiny.scan(5).image_top)
    assert torch.equal(whole.scan(5).text_top, tiny.scan(5).text_top)
    for d in ("t2i", "i2t"):
        assert torch.equal(whole.ranks()[d], tiny.ranks()[d])
    for a, b in zip(whole.oracle(), tiny.oracle()):
        assert torch.equal(a, b)
    for method in METHODS:
        for a, b in zip(whole.confidence(method), tiny.confidence(method)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bins_match_official_with_empty_bins(synthetic):
    text, image, caption_image = synthetic
    truth = truth_of(caption_image, image.shape[1])
    mean = ref.all_scores(list(text), list(image)).mean(0)
    for method in ("top1_consistency", "adversarial"):
        text_conf, image_conf = confidence(method, text, image)
        for scores, pos, conf in ((mean, truth, text_conf), (mean.T, truth.T, image_conf)):
            official = ref.bins(scores, pos, conf)
            ours = binned_recall(scores, pos, conf)
            assert ours == [(lo, hi, c, r) for (lo, hi), c, r in official]
            assert method != "top1_consistency" or len(ours) < 10  # k/5 values: empty bins
            s, r2, neg = ref.calibration([r for *_, r in official])
            got = calibration_scores(ours)
            assert (got["S"], got["R2"], got["-SR2"]) == pytest.approx(
                (s, r2, neg), abs=1e-12, nan_ok=True
            )
    # 10 bins over [0.2, 1.0] of width 0.08: only three are occupied
    discrete = confidence_bins(torch.tensor([0.2, 0.2, 0.4, 1.0, 1.0]), [0, 1, 1, 1, 0])
    assert [c for _, _, c, _ in discrete] == pytest.approx([0.2, 0.4, 1.0])
    assert [r for *_, r in discrete] == [0.5, 1.0, 0.5]
    assert discrete[-1][:2] == pytest.approx((0.92, 1.0))


def test_rejection_curves_match_official(synthetic):
    text, image, caption_image = synthetic
    truth = truth_of(caption_image, image.shape[1])
    mean = ref.all_scores(list(text), list(image)).mean(0)
    ranks = Posterior(text, image, caption_image).ranks()
    text_conf, image_conf = confidence("top1_consistency", text, image)  # many ties
    for scores, pos, conf, rank, step in (
        (mean, truth, text_conf, ranks["t2i"], 10),
        (mean.T, truth.T, image_conf, ranks["i2t"], 3),
    ):
        for k in (1, 5, 10):
            official = ref.rejection(scores, pos, conf, step, k)  # ties in query-index order
            removed, recall = rejection_curve(conf, rank < k, step, ties="index")
            assert [(n, r) for n, r in zip(removed.tolist(), recall.tolist())] == official
            assert rejection_area(removed, recall) == ref.rejection_area(official)


def test_calibration_scores_hand_computed():
    perfect = calibration_scores([0.5, 0.7, 0.9])  # recall rises with confidence
    assert perfect == pytest.approx({"S": -1.0, "R2": 1.0, "-SR2": 1.0})
    # ranks of y = 1,3,2,4: rho = 1 - 6*2/(4*15) = 0.8; r = cov/sd = 0.8/sqrt(5*0.2) = 0.8
    mixed = calibration_scores([(0, 0, 0, 0.2), (0, 0, 0, 0.6), (0, 0, 0, 0.4), (0, 0, 0, 0.8)])
    assert mixed == pytest.approx({"S": -0.8, "R2": 0.64, "-SR2": 0.512})
    assert all(math.isnan(v) for v in calibration_scores([0.4]).values())
    assert all(math.isnan(v) for v in calibration_scores([0.3, 0.3, 0.3]).values())


def test_rejection_auroc_aurc_ece_hand_computed():
    conf = torch.tensor([0.1, 0.9, 0.5, 0.3])
    hits = torch.tensor([False, True, True, False])
    removed, recall = rejection_curve(conf, hits, step=1)
    assert removed.tolist() == [0, 1, 2, 3]
    assert recall.tolist() == pytest.approx([0.5, 2 / 3, 1.0, 1.0])
    area = (0.5 + 2 / 3) / 6 + (2 / 3 + 1) / 6 + (1 + 1) / 6  # trapezoids on x = n / 3
    assert rejection_area(removed, recall) == pytest.approx(area)
    assert math.isnan(rejection_area(*rejection_curve(conf, hits, step=10)))
    conf = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    correct = torch.tensor([True, False, True, False, False])
    # positive-negative pairs won: 0.9 beats 3, 0.8 beats 2 and ties 1 -> 5.5 / 6
    assert confidence_auroc(conf, correct) == pytest.approx(5.5 / 6)
    assert confidence_auroc(-conf, correct) == pytest.approx(0.5 / 6)  # any sign, no sigmoid
    # risks at coverages 1..5: 0, then the 0.8 tie (one error in two) in either order:
    # 1/2 on average at coverage 2 (0.25), 1/3, 2/4, 3/5; index order takes the error first
    assert confidence_aurc(conf, correct) == pytest.approx((0 + 0.25 + 1 / 3 + 0.5 + 0.6) / 5)
    assert confidence_aurc(conf, correct, ties="index") == pytest.approx(
        (0 + 0.5 + 1 / 3 + 0.5 + 0.6) / 5
    )
    ece = confidence_ece(torch.tensor([0.9, 0.9, 0.2, 0.2]), torch.tensor([1, 0, 0, 0]))
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.2)
    assert math.isnan(confidence_ece(torch.tensor([-0.1, 0.5]), torch.tensor([1, 0])))
    assert math.isnan(confidence_auroc(conf, torch.ones(5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="NaN"):
        confidence_bins(torch.tensor([0.1, float("nan")]), torch.tensor([1, 0]))


def test_bad_inputs_have_clear_errors(synthetic):
    text, image, _ = synthetic
    with pytest.raises(ValueError, match="expected one of"):
        confidence("top2_similarity", text, image)
    with pytest.raises(TypeError, match="step_size"):
        confidence("adversarial", text, image, stepsize=0.1)
    with pytest.raises(ValueError, match="share N"):
        confidence("top1_similarity", text, image[:2])
    with pytest.raises(ValueError, match="evaluator.method"):
        UCLIPEvaluator(method="adversarial_pgd")
    with pytest.raises(ValueError, match="evaluator.members"):
        UCLIPEvaluator(sampler="ensemble")


# ---------------------------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def tiny_clip():
    from xmodal import backbones

    torch.manual_seed(0)
    return backbones.build("tiny_clip")


def test_mc_dropout_is_seeded_active_in_eval_mode_and_removable(tiny_clip):
    model, _, tokenizer = tiny_clip
    images = torch.randn(4, 3, 32, 32)
    tokens = tokenizer(["a red circle", "two blue squares", "a small green star", "nothing"])

    def encode(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():  # what trainer.predict does, after model.eval()
            return torch.cat([model.encode_image(images), model.encode_text(tokens)])

    model.eval()
    with mc_dropout(model, 0.2) as blocks:
        assert blocks == 4  # 2 residual blocks in each tower of the tiny CLIP
        first = encode(pass_seed(0, 0, "image"))
        again = encode(pass_seed(0, 0, "image"))
        other = encode(pass_seed(0, 1, "image"))
    assert torch.equal(first, again)  # reproducible with a seed
    assert (first - other).abs().max() > 1e-3  # a different pass differs, in eval mode
    assert not model.training
    plain = encode(0)
    assert torch.equal(plain, encode(1))  # hooks removed: deterministic again
    assert all(b.attn.dropout == 0.0 for b in model.transformer.resblocks)
    assert len({pass_seed(0, i, k, r) for i in range(3) for k in "ab" for r in range(2)}) == 12


def test_mc_dropout_refuses_models_without_attention_blocks():
    with pytest.raises(ValueError, match="sampler=ensemble"):
        with mc_dropout(torch.nn.Linear(2, 2)):
            pass


def test_ensemble_members_pin_quick_gelu_and_official_reproduces_the_mismatch():
    from xmodal import backbones

    cfg = OmegaConf.load(REPO / "conf" / "evaluator" / "uclip.yaml")
    assert len(cfg.members) == 12
    corrected = UCLIPEvaluator(sampler="ensemble", members=cfg.members)
    official = UCLIPEvaluator(sampler="ensemble", members=cfg.members, variant="official")
    mismatched = []
    for member in corrected.members:
        b = corrected.member_config(member)
        backbones.check_quick_gelu(b.arch, b.pretrained, b.quick_gelu)  # raises on a mismatch
        o = official.member_config(member)
        assert o.quick_gelu is False and o.allow_quick_gelu_mismatch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbones.check_quick_gelu(o.arch, o.pretrained, o.quick_gelu, True)
        if caught:
            mismatched.append(member.pretrained)
        assert backbones.identity(b) != backbones.identity(o) or not member.quick_gelu
    assert mismatched == ["openai", "metaclip_400m", "metaclip_fullcc", "dfn2b"]


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shapes_mcd_run(xmodal_env, shapes_world, tmp_path_factory):
    """`xmodal-eval experiment=uclip/shapes_mcd` on the small world with a saved tiny CLIP."""
    from xmodal import backbones
    from xmodal.config import compose

    torch.manual_seed(0)
    model, _, _ = backbones.build("tiny_clip")
    weights = tmp_path_factory.mktemp("uclip") / "tiny.pt"
    backbones.save_checkpoint(model, weights, "tiny_clip")
    overrides = [
        "experiment=uclip/shapes_mcd",
        "data.shapes_world=small",
        f"backbone.pretrained={weights}",
        "evaluator.passes=4",
        "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, **xmodal_env, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "xmodal.cli.eval", *overrides]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return Path(compose("eval", overrides).run_dir), cmd, env


def test_xmodal_eval_shapes_mcd_end_to_end(shapes_mcd_run, xmodal_env):
    """metrics.json with both directions' S, R², −S·R², AUROC, AURC, rejection areas (ECE for
    top1_consistency only: the one probability-like confidence); PNGs."""
    from xmodal.runs import read_metrics

    run, _, _ = shapes_mcd_run
    metrics = read_metrics(run)
    for d in ("t2i", "i2t"):
        for key in ("S", "R2", "-SR2", "AUROC", "AURC"):
            assert f"test/{d}/{key}" in metrics and f"test/top1_similarity/{d}/{key}" in metrics
        assert 0 <= metrics[f"test/top1_consistency/{d}/ECE"] <= 1
        assert f"test/{d}/ECE" not in metrics and f"test/top1_similarity/{d}/ECE" not in metrics
        for k in (1, 5, 10):
            ours, oracle = (
                metrics[f"test/{d}/rejection/R@{k}"],
                metrics[f"test/{d}/oracle_rejection/R@{k}"],
            )
            assert 0 <= ours <= oracle <= 100
        s, r2, neg = (metrics[f"test/{d}/{key}"] for key in ("S", "R2", "-SR2"))
        assert math.isnan(s) or (-1 <= s <= 1 and 0 <= r2 <= 1 and neg == -s * r2)
        assert 0 <= metrics[f"test/{d}/AURC"] <= 1
    assert (
        metrics["test/num_samples"] == 4 and metrics["test/num_texts"] > metrics["test/num_images"]
    )
    # the shapes world's extended positives (eccv_caption format): S̄'s ECCV / CxC / PMRP numbers,
    # and every method calibrated against the ECCV R-Precision of its queries as well
    for d in ("t2i", "i2t"):
        for key in ("coco1k/{d}/R@1", "coco5k/{d}/R@5", "cxc/{d}/R@10", "eccv/{d}/mAP@R"):
            assert 0 <= metrics["test/" + key.format(d=d)] <= 100
        assert 0 <= metrics[f"test/eccv/{d}/R-P"] <= 100 and 0 <= metrics[f"test/pm/{d}/R-P"] <= 100
        for prefix in ("test", "test/top1_similarity", "test/top1_consistency"):
            s, r2 = metrics[f"{prefix}/{d}/eccv_R-P/S"], metrics[f"{prefix}/{d}/eccv_R-P/R2"]
            assert math.isnan(s) or (-1 <= s <= 1 and 0 <= r2 <= 1)
            assert metrics[f"{prefix}/{d}/eccv_R-P/num_bins"] >= 1
    assert metrics["test/eccv/i2t/num_queries"] == 15 and metrics["test/eccv/t2i/num_queries"] == 75
    for name in ("calibration.png", "rejection.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((run / "curves.json").read_text())
    assert set(curves["methods"]) == set(METHODS)
    # each pass is cached under its index and seed (images and captions); other tests' MCD runs
    # share the cache folder, so keep the entries of this run's world and weights
    cfg = OmegaConf.load(run / "config.yaml")
    digest = hashlib.sha256(Path(cfg.backbone.pretrained).read_bytes()).hexdigest()
    keys = [
        json.loads(p.read_text()) for p in Path(xmodal_env["XMODAL_OUTPUT"], "cache").glob("*.json")
    ]
    keys = [
        k
        for k in keys
        if k.get("sampler") == "mcd"
        and k["root"] == cfg.data.root
        and k["backbone"]["pretrained"]["sha256"] == digest
    ]
    passes = sorted((k["kind"], k["pass"]) for k in keys)
    assert passes == sorted((kind, i) for kind in ("image", "text") for i in range(4))
    assert {k["seed"] for k in keys} == {0}


@pytest.mark.slow
def test_forced_rerun_reuses_the_cached_passes(shapes_mcd_run):
    from xmodal.runs import read_metrics

    run, cmd, env = shapes_mcd_run
    before = json.dumps(read_metrics(run), sort_keys=True)
    entries = {p: p.stat().st_mtime_ns for p in Path(env["XMODAL_OUTPUT"], "cache").glob("*.pt")}
    res = subprocess.run([*cmd, "force=true"], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.dumps(read_metrics(run), sort_keys=True) == before
    assert {p: p.stat().st_mtime_ns for p in entries} == entries  # nothing re-encoded


def test_ensemble_sampler_in_process(xmodal_env, shapes_world, tmp_path):
    """`sampler=ensemble` through the pipeline: one sample per member file, cached per member."""
    from xmodal import backbones
    from xmodal.config import compose
    from xmodal.pipeline import evaluate

    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, _, _ = backbones.build("tiny_clip")
        files.append(backbones.save_checkpoint(model, tmp_path / f"m{seed}.pt", "tiny_clip"))

    def member(path):
        return f"{{arch: xmodal-tiny-clip, pretrained: '{path}', quick_gelu: true}}"

    overrides = [
        "experiment=uclip/shapes_ens",
        "data.shapes_world=small",
        f"backbone.pretrained={files[0]}",
        f"evaluator.members=[{member(files[0])},{member(files[1])}]",
        "evaluator.method=top1_consistency",
        "evaluator.compare=[]",
        "evaluator.plots=false",
    ]
    metrics = evaluate(compose("eval", overrides), overrides)
    assert metrics["test/num_samples"] == 2 and "test/t2i/S" in metrics
    missing = [*overrides[:3], f"evaluator.members=[{member(tmp_path / 'nope.pt')}]"]
    with pytest.raises(FileNotFoundError, match=r"evaluator.members\[0\].pretrained"):
        evaluate(compose("eval", missing), missing)
