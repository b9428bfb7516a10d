"""uCLIP ``evaluator.arithmetic=fp16_official``: the released code's float16 arithmetic, emulated
by rounding to float16 after each operation it does in float16, against the plain reference
(``tests/uclip_reference.py``) run on real float16 tensors on CPU (torch's half kernels compute in
float32 inside an op and round its output, as on the GPU). The float16 ties it creates must keep
bins and rejection curves well defined (the tie-averaging rule).
"""

from __future__ import annotations

import pytest
import torch

import uclip_reference as ref
from test_uclip import make_samples
from xmodal.evaluators.uclip import (
    ARITHMETICS,
    FP16_CONFIDENCES,
    METHODS,
    Posterior,
    UCLIPEvaluator,
    fp16_round,
)
from xmodal.metrics import confidence_bins, rejection_curve


def issue_case(num_images=300, per_image=5, dim=256, samples=5, seed=0):
    """The issue's size: 300 images x 1,500 captions, D = 256, 5 posterior samples (each caption
    its image's base vector + noise, each sample its own noise, as ``make_samples``)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_images, dim, generator=g)
    caption_image = torch.arange(num_images).repeat_interleave(per_image)
    captions = base[caption_image] + 0.9 * torch.randn(len(caption_image), dim, generator=g)
    text = [captions + 0.4 * torch.randn(captions.shape, generator=g) for _ in range(samples)]
    image = [base + 0.4 * torch.randn(base.shape, generator=g) for _ in range(samples)]
    scale = 1.5 / dim**0.5
    return scale * torch.stack(text), scale * torch.stack(image), caption_image


@pytest.fixture(scope="module")
def small():
    return make_samples()


@pytest.fixture(scope="module")
def large():
    text, image, caption_image = issue_case()
    return (
        Posterior(text, image, caption_image),
        Posterior(text, image, caption_image, arithmetic="fp16_official"),
    )


def test_scores_and_top1_similarity_equal_real_float16(small):
    text, image, caption_image = small
    p16 = Posterior(text, image, caption_image, arithmetic="fp16_official")
    official = ref.METHODS["top1_similarity"](list(text.half()), list(image.half()))
    for ours, theirs in zip(p16.confidence("top1_similarity"), official):
        assert ours.dtype == theirs.dtype == torch.float16
        assert torch.equal(ours, theirs)  # bitwise: S_k, their mean and the max in float16
    # S̄ in float16 (what every recall, bin and rejection curve ranks with), bitwise
    mean16 = ref.all_scores(list(text.half()), list(image.half())).mean(0)
    ours = p16.mean_scores(p16.text.transpose(0, 1), p16.image.transpose(0, 1))
    assert torch.equal(ours, mean16.float())
    ranks = p16.ranks()
    truth = caption_image[:, None] == torch.arange(image.shape[1])[None]
    assert torch.equal(ranks["t2i"] < 1, ref.hits_at_k(mean16.float(), truth, 1))


@pytest.mark.parametrize("method", METHODS)
def test_confidences_follow_real_float16(method, small):
    """Consistency methods are equal here; the adversarial ones are emulated (the official
    autograd rounds inside the cosine's backward, ours rounds the closed-form gradient): most
    queries are bitwise equal, where float32 gets none, and the rest are within one step."""
    text, image, caption_image = small
    p16 = Posterior(text, image, caption_image, arithmetic="fp16_official")
    official = ref.METHODS[method](list(text.half()), list(image.half()))
    in_fp32 = Posterior(text, image, caption_image).confidence(method)
    for ours, theirs, fp32 in zip(p16.confidence(method), official, in_fp32):
        expected = torch.float16 if method in FP16_CONFIDENCES else torch.float32
        assert ours.dtype == expected and not torch.isnan(ours).any()
        theirs = torch.nan_to_num(theirs.float(), nan=0.0).double()
        diff = (ours.double() - theirs).abs()
        if method in ("top1_consistency", "top5_consistency"):
            assert torch.equal(ours.double(), theirs)
        elif method == "adversarial":
            assert (diff == 0).double().mean() >= 0.45  # measured 0.50-0.88 (fp32: 0)
            assert (fp32.double() - theirs).abs().min() > 0  # float32 never lands on float16
            assert diff.max() <= 0.026  # at most one 0.025 step of tanh(r)
        elif method == "adversarial_linear":
            assert (diff == 0).double().mean() >= 0.65  # measured 0.71-0.85 (fp32: 0)
            assert diff.max() <= 2e-3  # a few float16 ulps
        else:
            assert torch.equal(diff, torch.zeros_like(diff))


def test_float16_ties_and_differences_at_the_issue_size(large):
    """300 x 1,500, D = 256: float16 collapses the caption queries' confidences into far fewer
    distinct values; measured (this generator): top1_similarity 1499 -> 274 distinct, max
    difference 6e-4; adversarial_linear 1500 -> 404, max difference 0.022."""
    p32, p16 = large
    t32, _ = p32.confidence("top1_similarity")
    t16, _ = p16.confidence("top1_similarity")
    assert t32.unique().numel() >= 1490 and t16.unique().numel() <= 300
    diff = (t32.double() - t16.double()).abs().max().item()
    assert 1e-4 < diff < 1e-3  # float16 rounding of cosines around 0.5: ulp 2**-11
    assert torch.equal(t16, fp16_round(t16.float()).half())  # exactly float16 values
    l32, _ = p32.confidence("adversarial_linear")
    l16, _ = p16.confidence("adversarial_linear")
    assert l32.unique().numel() == 1500 and l16.unique().numel() <= 450
    diff = (l32.double() - l16.double()).abs().max().item()
    assert 0.01 < diff < 0.04


def test_bins_and_rejection_stay_well_defined_with_float16_ties(large):
    p32, p16 = large
    ranks = p16.ranks()["t2i"]
    conf, _ = p16.confidence("top1_similarity")
    bins = confidence_bins(conf, ranks < 5, 10)
    assert 2 <= len(bins) <= 10 and all(0.0 <= b[3] <= 1.0 for b in bins)
    # the queries of the bins add up to all queries: count them through the bin means
    edges = [(b[0], b[1]) for b in bins]
    counted = sum(
        int(((conf >= lo) & ((conf < hi) if i < len(edges) - 1 else (conf <= hi))).sum())
        for i, (lo, hi) in enumerate(edges)
    )
    assert counted == len(conf)
    # ties=average: the curve depends on the confidences only, not on the storage order
    perm = torch.randperm(len(conf), generator=torch.Generator().manual_seed(0))
    hits = ranks < 1
    removed, recall = rejection_curve(conf, hits, 100)
    _, recall_perm = rejection_curve(conf[perm], hits[perm], 100)
    torch.testing.assert_close(recall, recall_perm, atol=1e-6, rtol=0)
    assert removed[-1] < len(conf) and torch.isfinite(recall).all()


def test_float16_bin_edges_are_compared_in_float16():
    """The official comparison of a float16 confidence with a Python float edge rounds the edge
    to float16. 3 bins over [0, 1]: edge 2 = 0.6666667 (float32), float16(edge 2) = 0.66650390625,
    so the float16 confidence 0.66650390625 is in the top bin in float16, the middle in float32."""
    conf16 = torch.tensor([0.0, 0.66650390625, 1.0], dtype=torch.float16)
    hits = torch.tensor([False, True, False])
    in16 = confidence_bins(conf16, hits, 3)
    in32 = confidence_bins(conf16.float(), hits, 3)
    assert [b[3] for b in in16] == [0.0, 0.5]  # the middle bin is empty and dropped
    assert in16[1][2] == pytest.approx((0.66650390625 + 1.0) / 2, abs=1e-3)  # a float16 mean
    assert [b[3] for b in in32] == [0.0, 1.0, 0.0]


def test_option_is_checked_and_fp32_is_the_default(small):
    text, image, _ = small
    assert ARITHMETICS == ("fp32", "fp16_official")
    with pytest.raises(ValueError, match="arithmetic"):
        Posterior(text, image, arithmetic="fp16")
    with pytest.raises(ValueError, match="evaluator.arithmetic"):
        UCLIPEvaluator(arithmetic="bf16")
    assert UCLIPEvaluator().arithmetic == "fp32"
    default = Posterior(text, image).confidence("top1_similarity")[0]
    assert default.dtype == torch.float32
    assert torch.equal(
        default, Posterior(text, image, arithmetic="fp32").confidence("top1_similarity")[0]
    )


def test_evaluator_scores_a_float16_posterior():
    text, image, caption_image = make_samples(num_images=40, caption_noise=2.5)
    scores = {}
    for arithmetic in ARITHMETICS:
        evaluator = UCLIPEvaluator(
            method="adversarial",
            compare=["top1_similarity"],
            arithmetic=arithmetic,
            rejection_step_t2i=20,
            rejection_step_i2t=5,
        )
        posterior = Posterior(text, image, caption_image, arithmetic=arithmetic)
        scores[arithmetic], _ = evaluator.score(posterior)
    fp16 = scores["fp16_official"]
    for d in ("t2i", "i2t"):
        for key in ("S", "R2", "AUROC", "AURC", "rejection/R@1", "top1_similarity/{d}/S"):
            key = f"test/{d}/{key}" if "{d}" not in key else "test/" + key.format(d=d)
            assert fp16[key] == fp16[key], key  # never NaN
    # the same problem: recalls agree to a few queries, the calibration numbers are close
    assert abs(fp16["test/t2i/R@1"] - scores["fp32"]["test/t2i/R@1"]) < 2.0
