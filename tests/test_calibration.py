"""Edge cases of ``xmodal.metrics.calibration`` (issue 12, item 6): tied confidences in rejection
curves and AURC (the expected value over every order of the tied queries, so the stored query
order cannot move a number), infinite confidences in the bins, and ECE only for a probability.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from test_uclip import make_samples
from xmodal.evaluators.uclip import Posterior, UCLIPEvaluator, oracle_confidence
from xmodal.metrics import (
    calibration_scores,
    confidence_aurc,
    confidence_bins,
    rejection_area,
    rejection_curve,
    uncertainty_calibration,
)

# ------------------------------------------------------------------------------------------ ties


def test_tie_averaged_rejection_curve_hand_computed():
    conf = torch.tensor([0.2, 0.5, 0.5, 0.5, 0.9])
    hits = torch.tensor([False, True, False, False, True])
    removed, recall = rejection_curve(conf, hits, step=1)
    assert removed.tolist() == [0, 1, 2, 3, 4]
    # n = 2, 3 cut through the 0.5 tie (one hit in three): it loses 1/3 of a hit per query taken
    expected = [2 / 5, 2 / 4, (2 - 1 / 3) / 3, (2 - 2 / 3) / 2, 1 / 1]
    assert recall.tolist() == pytest.approx(expected, abs=1e-7)
    # index order removes the hit (index 1) first; storing it last removes it last
    index = rejection_curve(conf, hits, step=1, ties="index")[1]
    assert index.tolist() == pytest.approx([2 / 5, 2 / 4, 1 / 3, 1 / 2, 1.0])
    last = torch.tensor([0, 2, 3, 1, 4])
    index_last = rejection_curve(conf[last], hits[last], step=1, ties="index")[1]
    assert index_last.tolist() == pytest.approx([2 / 5, 2 / 4, 2 / 3, 2 / 2, 1.0])
    area = rejection_area(removed, recall)
    assert area == pytest.approx(sum((a + b) / 8 for a, b in zip(expected, expected[1:])))


def test_tie_averaging_is_the_mean_over_every_order_of_the_tied_queries():
    conf = torch.tensor([0.3, 0.7, 0.3, 0.7, 0.3, 0.1, 0.7, 0.3])
    hits = torch.tensor([True, False, False, True, True, False, False, False])
    tied = {c: [i for i in range(len(conf)) if conf[i] == c] for c in conf.unique().tolist()}
    curves, aurcs = [], []
    # every relabelling of the queries inside each tie group, in index order
    for orders in itertools.product(*(itertools.permutations(g) for g in tied.values())):
        perm = torch.arange(len(conf))
        for group, order in zip(tied.values(), orders):
            perm[group] = torch.tensor(order)
        curves.append(rejection_curve(conf[perm], hits[perm], step=1, ties="index")[1].double())
        aurcs.append(confidence_aurc(conf[perm], hits[perm], ties="index"))
    assert len(curves) == 1 * 24 * 6  # the 0.1 query, four at 0.3, three at 0.7
    mean_curve = torch.stack(curves).mean(0)
    torch.testing.assert_close(
        rejection_curve(conf, hits, step=1)[1].double(), mean_curve, atol=1e-7, rtol=0
    )
    assert confidence_aurc(conf, hits) == pytest.approx(sum(aurcs) / len(aurcs), abs=1e-12)


def test_query_order_leaves_rejection_and_aurc_unchanged_by_default():
    """COCO-like: 40 images, 3-6 captions each stored image by image, discrete k/5 confidences."""
    text, image, caption_image = make_samples(num_images=40, caption_noise=1.6, sample_noise=0.6)
    posterior = Posterior(text, image, caption_image)
    posterior.scan(1)
    ranks = posterior.ranks()
    confs = dict(zip(("t2i", "i2t"), posterior.confidence("top1_consistency")))
    moved = 0.0
    for d, step in (("t2i", 10), ("i2t", 3)):
        conf, r = confs[d], ranks[d]
        assert conf.unique().numel() < len(conf) / 4  # heavy ties
        perm = torch.randperm(len(conf), generator=torch.Generator().manual_seed(0))
        for k in (1, 5):
            hits = r < k
            removed, recall = rejection_curve(conf, hits, step)
            removed_p, recall_p = rejection_curve(conf[perm], hits[perm], step)
            assert torch.equal(removed, removed_p) and torch.equal(recall, recall_p)
            assert rejection_area(removed, recall) == rejection_area(removed_p, recall_p)
            index = rejection_area(*rejection_curve(conf, hits, step, ties="index"))
            index_p = rejection_area(*rejection_curve(conf[perm], hits[perm], step, ties="index"))
            moved = max(moved, abs(index - index_p))
        assert confidence_aurc(conf, r < 1) == confidence_aurc(conf[perm], r[perm] < 1)
    assert moved > 1e-3  # the index order does depend on how the queries are stored


def test_unknown_ties_mode_is_refused():
    with pytest.raises(ValueError, match="ties='random'"):
        rejection_curve(torch.rand(4), torch.rand(4) > 0.5, 1, ties="random")
    with pytest.raises(ValueError, match="evaluator.ties"):
        UCLIPEvaluator(ties="first")


# ----------------------------------------------------------------------------------- infinities


def test_infinite_confidences_get_end_bins_of_their_own():
    conf = torch.tensor([0.1, 0.2, 0.5, 0.5, math.inf, math.inf, math.inf])
    hits = torch.tensor([False, False, True, False, True, True, False])
    bins = confidence_bins(conf, hits)
    # 10 bins of width 0.04 over the finite [0.1, 0.5], then the +inf queries on their own
    assert [b[3] for b in bins] == pytest.approx([0.0, 0.0, 0.5, 2 / 3])
    assert bins[0][:3] == pytest.approx((0.1, 0.14, 0.1))
    assert bins[1][:3] == pytest.approx((0.18, 0.22, 0.2))
    assert bins[2][:3] == pytest.approx((0.46, 0.5, 0.5))
    assert bins[3][:3] == (math.inf, math.inf, math.inf)
    assert bins[:3] == confidence_bins(conf[:4], hits[:4])  # the finite bins are as without inf
    # x = 0..3, y = 0, 0, 0.5, 2/3: Spearman ranks 1.5, 1.5, 3, 4 -> rho = 0.9487; R^2 of the fit
    scores = calibration_scores(bins)
    assert scores["S"] == pytest.approx(-3 / math.sqrt(10))
    x, y = torch.arange(4.0).double(), torch.tensor([0, 0, 0.5, 2 / 3]).double()
    r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert scores["R2"] == pytest.approx(r**2)

    neg = confidence_bins(torch.tensor([-math.inf, 0.0, 1.0]), torch.tensor([False, False, True]))
    assert [b[3] for b in neg] == [0.0, 0.0, 1.0]
    assert neg[0] == (-math.inf, -math.inf, -math.inf, 0.0)
    assert neg[2][:2] == pytest.approx((0.9, 1.0))
    # equal finite values (one bin, as the official code) still stay apart from +inf
    same = confidence_bins(torch.tensor([1.0, 1.0, math.inf]), torch.tensor([False, False, True]))
    assert [(b[0], b[3]) for b in same] == [(1.0, 0.0), (math.inf, 1.0)]
    only = confidence_bins(torch.tensor([math.inf, -math.inf]), torch.tensor([True, False]))
    assert [(b[0], b[3]) for b in only] == [(-math.inf, 0.0), (math.inf, 1.0)]


def test_oracle_confidence_bins_give_finite_calibration():
    """The oracle's inf (a correct top-1) used to leave no bin at all: S and R² NaN."""
    text, image, caption_image = make_samples(num_images=40, caption_noise=1.6, sample_noise=0.6)
    ranks = Posterior(text, image, caption_image).ranks()
    for conf, r in zip(oracle_confidence(text, image, caption_image), ranks.values()):
        assert bool(torch.isinf(conf).any()) and bool(torch.isfinite(conf).any())
        bins = confidence_bins(conf, r < 1)
        # the oracle is perfect: recall 0 in every finite bin, 1 in the +inf one
        assert len(bins) >= 2 and bins[-1][0] == math.inf
        assert [b[3] for b in bins] == [0.0] * (len(bins) - 1) + [1.0]
        scores = calibration_scores(bins)
        assert math.isfinite(scores["S"]) and math.isfinite(scores["R2"]) and scores["S"] < 0


# ------------------------------------------------------------------------------------------- ECE


def test_ece_is_reported_for_the_probability_like_confidence_only():
    text, image, caption_image = make_samples()
    evaluator = UCLIPEvaluator(
        method="top1_similarity",
        compare=["top1_consistency", "adversarial_linear"],
        rejection_step_t2i=10,
        rejection_step_i2t=3,
    )
    metrics, _ = evaluator.score(Posterior(text, image, caption_image))
    for d in ("t2i", "i2t"):
        assert f"test/{d}/AURC" in metrics and f"test/{d}/ECE" not in metrics
        assert f"test/adversarial_linear/{d}/ECE" not in metrics
        assert 0 <= metrics[f"test/top1_consistency/{d}/ECE"] <= 1


# ------------------------------------------------------------- CIR per-query uncertainty


def test_uncertainty_calibration_hand_computed():
    uncertainty = torch.tensor([0.1, 0.2, 0.8, 0.9])
    ranks = torch.tensor([0, 0, 5, 20])  # the two surest queries are R@1 hits
    out = uncertainty_calibration(uncertainty, ranks)
    assert out["mean"] == pytest.approx(0.5)
    # bins of increasing confidence have recalls 0, 0, 1, 1
    assert out["k1/S"] == pytest.approx(-2 / math.sqrt(5))
    assert out["k1/R2"] == pytest.approx(0.8)
    assert out["k1/AUROC"] == pytest.approx(1.0)
    # accepting the surest first: risks 0, 0, 1/3, 2/4
    assert out["k1/AURC"] == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert out["k10/AUROC"] == pytest.approx(1.0)  # rank 5 is an R@10 hit, rank 20 is not
