"""The PCME++ calibration protocol (naver-ai/pcmepp ``eval_uncertainty`` /
``eval_coco_uncertainty``): equal-count bins by uncertainty and the Pearson correlation between
the bin's uncertainty level and its score; hand-computed cases, ``scipy.stats.pearsonr`` and a
numpy restatement of the PCME++ loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from xmodal.metrics import equal_count_bins, pearson_calibration


def pcmepp_reference(uncertainty: np.ndarray, hits: np.ndarray, n_bins: int) -> list[float]:
    """PCME++'s loop restated: sort by increasing uncertainty, bins of n // n_bins, remainder
    dropped, per-bin mean of the hits (the score of its queries)."""
    inds = np.argsort(uncertainty, kind="stable")
    size = len(inds) // n_bins
    return [float(hits[inds[b * size : (b + 1) * size]].mean()) for b in range(n_bins)]


def test_hand_computed_bins_and_pearson():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    hits = torch.tensor([1, 1, 0, 1, 0, 0, 1]).bool()
    bins = equal_count_bins(conf, hits, 3)  # bins of 2; the least confident (0.3) dropped
    assert [b[3] for b in bins] == [0.0, 0.5, 1.0]  # increasing confidence
    edges = [edge for b in bins for edge in b[:2]]
    assert edges == pytest.approx([0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert bins[1][2] == pytest.approx(0.65)
    # uncertainty levels (2, 1, 0) against (0, 0.5, 1): a perfect negative correlation
    assert pearson_calibration(bins)["pearson"] == pytest.approx(-1.0)
    assert pearson_calibration([0.2, 0.6, 0.4])["pearson"] == pytest.approx(-0.5)  # by hand


def test_ties_average_takes_the_expected_share():
    conf = torch.tensor([0.5, 0.5, 0.5, 0.1])
    hits = torch.tensor([True, False, False, True])
    # most confident bin takes 2 of the 3 tied queries (1 hit among them): 2/3 hit in 2 queries
    average = equal_count_bins(conf, hits, 2)
    assert [b[3] for b in average] == pytest.approx([(1 / 3 + 1) / 2, 1 / 3])
    index = equal_count_bins(conf, hits, 2, ties="index")  # queries 0, 1 then 2, 3
    assert [b[3] for b in index] == [0.5, 0.5]
    perm = torch.tensor([2, 3, 1, 0])
    assert equal_count_bins(conf[perm], hits[perm], 2) == average  # storage order is irrelevant


def test_unlisted_queries_are_left_out_of_a_bin_mean():
    conf = torch.tensor([4.0, 3.0, 2.0, 1.0])
    values = torch.tensor([1.0, math.nan, 0.5, 0.0], dtype=torch.float64)  # e.g. ECCV mAP@R
    bins = equal_count_bins(conf, values, 2)
    assert [b[3] for b in bins] == [0.25, 1.0]
    none_listed = equal_count_bins(conf, torch.tensor([math.nan, math.nan, 1.0, 0.0]), 2)
    assert math.isnan(none_listed[1][3]) and none_listed[0][3] == 0.5
    assert math.isnan(pearson_calibration(none_listed)["pearson"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_pcmepp_loop_and_scipy_pearsonr(seed):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(1003, generator=g, dtype=torch.float64)  # no ties; 3 queries dropped
    hits = torch.rand(1003, generator=g, dtype=torch.float64) < conf  # calibrated-ish
    bins = equal_count_bins(conf, hits, 10)
    expected = pcmepp_reference(-conf.numpy(), hits.numpy(), 10)  # uncertainty = -confidence
    assert [b[3] for b in bins][::-1] == pytest.approx(expected, abs=1e-12)
    levels = np.arange(10)
    reference = np.corrcoef(levels, expected)[0, 1]  # PCME++'s unc_linear
    assert pearson_calibration(bins)["pearson"] == pytest.approx(reference, abs=1e-12)
    assert pearson_calibration(bins)["pearson"] == pytest.approx(
        pearsonr(levels, expected).statistic, abs=1e-12
    )
    assert pearson_calibration(bins)["pearson"] < 0  # higher confidence, more hits


def test_degenerate_cases():
    assert equal_count_bins(torch.tensor([0.1, 0.2]), torch.tensor([True, False]), 3) == []
    assert math.isnan(pearson_calibration([0.5])["pearson"])
    assert math.isnan(pearson_calibration([0.5, 0.5, 0.5])["pearson"])  # constant: undefined
    with pytest.raises(ValueError, match="num_bins"):
        equal_count_bins(torch.tensor([0.1]), torch.tensor([True]), 0)
    with pytest.raises(ValueError, match="NaN"):
        equal_count_bins(torch.tensor([math.nan, 0.1]), torch.tensor([True, False]), 1)


def test_the_option_adds_pcmepp_keys_to_uclip_and_probvlm_reports():
    """``evaluator.pcmepp`` / ``method.pcmepp``: the shared calibration report adds
    ``<d>/pcmepp/pearson`` (the PCME++ loop on R@1) for every method and direction, and leaves
    every other key as it was."""
    from xmodal.evaluators.uclip import Posterior, UCLIPEvaluator
    from xmodal.metrics.calibration import calibration_report

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=-1)
    caption_image = torch.arange(30).repeat_interleave(3)
    texts = images[caption_image] + 0.9 * torch.randn(90, 16, generator=g)
    ranks = Posterior(texts[None], images[None], caption_image).ranks()
    conf = (torch.rand(90, generator=g), torch.rand(30, generator=g))
    steps = {"t2i": 10, "i2t": 5}
    plain, _ = calibration_report({"m": conf}, ranks, steps=steps)
    both, _ = calibration_report({"m": conf}, ranks, steps=steps, pcmepp=True)
    assert set(both) - set(plain) == {"test/t2i/pcmepp/pearson", "test/i2t/pcmepp/pearson"}
    assert all(both[k] == v or (math.isnan(v) and math.isnan(both[k])) for k, v in plain.items())
    for d, c in zip(("t2i", "i2t"), conf):
        hits = (ranks[d] < 1).numpy()
        reference = pcmepp_reference(-c.numpy(), hits, 10)[::-1]  # increasing confidence
        level = np.arange(10)[::-1]
        assert both[f"test/{d}/pcmepp/pearson"] == pytest.approx(pearsonr(level, reference)[0])
    # the evaluator passes its option through
    evaluator = UCLIPEvaluator(pcmepp=True, rejection_step_t2i=10, rejection_step_i2t=5)
    posterior = Posterior(texts[None], images[None], caption_image)
    metrics, _ = evaluator.score(posterior)
    for d, c in zip(("t2i", "i2t"), posterior.confidence(evaluator.methods[0])):
        reference = pcmepp_reference(-c.numpy(), (ranks[d] < 1).numpy(), 10)[::-1]
        expected = pearsonr(np.arange(10)[::-1], reference)[0]
        assert metrics[f"test/{d}/pcmepp/pearson"] == pytest.approx(expected, nan_ok=True)


def test_eccv_rprecision_calibration_by_hand():
    """uCLIP calibrated against each query's ECCV Caption R-Precision (NaN = not listed): the
    equal-width bins span the listed queries only and average their R-P; PCME++'s bins take every
    query and average over the listed ones."""
    from xmodal.evaluators.uclip import UCLIPEvaluator

    nan = math.nan
    conf = torch.tensor([-1.0, 0.0, 0.2, 0.5, 0.9, 1.0, 0.95])
    rp = torch.tensor([nan, 0.0, 0.2, 0.4, nan, 1.0, 0.8], dtype=torch.float64)
    evaluator = UCLIPEvaluator(num_bins=3, pcmepp=True)
    scalars, bins = evaluator.eccv_calibration(conf, rp)
    # listed confidences span [0, 1]: bins [0, 1/3) {0, 0.2}, [1/3, 2/3) {0.5}, [2/3, 1] {1, 0.95}
    assert [b[3] for b in bins] == pytest.approx([0.1, 0.4, 0.9])
    assert [b[2] for b in bins] == pytest.approx([0.1, 0.5, 0.975])
    assert scalars["num_bins"] == 3 and scalars["S"] == pytest.approx(-1.0)
    # least squares of (0.1, 0.4, 0.9) on (0, 1, 2): slope 0.4, residuals (1, -2, 1) / 30
    r2 = 1 - (6 / 900) / (0.98 / 3)
    assert scalars["R2"] == pytest.approx(r2) and scalars["-SR2"] == pytest.approx(r2)
    # PCME++: bins of 7 // 3 = 2 by decreasing confidence, -1.0 dropped; {1, .95} -> 0.9,
    # {.9 (unlisted), .5} -> 0.4, {.2, 0} -> 0.1; Pearson of levels (2, 1, 0) with (0.1, 0.4, 0.9)
    assert scalars["pcmepp/pearson"] == pytest.approx(-0.8 / math.sqrt(2 * 0.98 / 3))
    empty, none = evaluator.eccv_calibration(conf, torch.full((7,), nan, dtype=torch.float64))
    assert math.isnan(empty["S"]) and empty["num_bins"] == 0 and none == []


def test_score_reports_the_eccv_calibration_of_every_method():
    """``score`` with an extended-positive result: every method's ``eccv_R-P`` keys (the first
    method under ``test/<d>``, the others under ``test/<method>/<d>``) are those of its own
    confidences, and the protocols' metrics pass through under ``test/``."""
    from test_uclip import make_samples
    from xmodal.evaluators.uclip import Posterior, UCLIPEvaluator
    from xmodal.protocols.extended import ExtendedResult

    text, image, caption_image = make_samples()
    posterior = Posterior(text, image, caption_image)
    g = torch.Generator().manual_seed(0)
    rp = {}
    for d, n in (("t2i", text.shape[1]), ("i2t", image.shape[1])):
        rp[d] = torch.rand(n, generator=g, dtype=torch.float64)
        rp[d][::4] = math.nan
    extended = ExtendedResult({"eccv/t2i/R-P": 12.5}, rp)
    evaluator = UCLIPEvaluator(
        method="top1_similarity",
        compare=["top1_consistency"],
        num_bins=4,
        rejection_step_t2i=10,
        rejection_step_i2t=4,
    )
    metrics, curves = evaluator.score(posterior, extended)
    assert metrics["test/eccv/t2i/R-P"] == 12.5
    prefixes = {"top1_similarity": "test", "top1_consistency": "test/top1_consistency"}
    for method, prefix in prefixes.items():
        for d, conf in zip(("t2i", "i2t"), posterior.confidence(method)):
            scalars, bins = evaluator.eccv_calibration(conf, rp[d])
            assert bins and curves["methods"][method][d]["eccv_bins"] == bins
            for key, value in scalars.items():
                assert metrics[f"{prefix}/{d}/eccv_R-P/{key}"] == pytest.approx(value, nan_ok=True)
            # not the top-1 hits' numbers: the R-P target changes the bins
            assert bins != curves["methods"][method][d]["bins"]
