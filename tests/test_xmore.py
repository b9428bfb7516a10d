"""X-MoRe's ensemble against a per-sample sequential definition, and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal.evaluators.xmore import (
    NORMALIZERS,
    XMoReEvaluator,
    caption_probs,
    dedup,
    ensemble,
    fuse,
    modal_weights,
    weight_ratio_by_case,
    weight_ratio_metrics,
)
from xmodal.metrics.classification import entropy_confidence

# ------------------------------------------------------------------------------------------
# The reference: one sample at a time, as the paper describes the test stream (and the released
# code loops over it), with Python floats for the running statistics.
# ------------------------------------------------------------------------------------------


def sequential(image_logits, caption_logits, normalizer):
    """Per-sample X-MoRe (methods/xmore.md §3-§7), written independently of the module."""
    history_image, history_text = [], []
    out = {k: [] for k in ("pred", "conf_image", "conf_text", "w_image", "w_text")}
    for t in range(image_logits.shape[0]):
        p_image = torch.softmax(image_logits[t], dim=-1)  # eq. image-modal probability
        p_text = torch.softmax(caption_logits[t], dim=-1).mean(dim=0)  # mean of k softmaxes
        alpha = entropy_confidence(p_image).item()  # 1 - H / ln C
        beta = entropy_confidence(p_text).item()
        history_image.append(alpha)
        history_text.append(beta)
        if normalizer == "equal":
            w_image, w_text = 0.5, 0.5
        elif normalizer == "none":
            w_image, w_text = alpha, beta
        elif normalizer == "l1":
            w_image = alpha / max(running_sum(history_image), 1e-12)
            w_text = beta / max(running_sum(history_text), 1e-12)
        else:  # minmax over the history including the current sample
            w_image = minmax_current(history_image)
            w_text = minmax_current(history_text)
            if w_image == 0.0 and w_text == 0.0:
                w_image, w_text = 0.5, 0.5
        fused = w_image * p_image.double() + w_text * p_text.double()
        out["pred"].append(int(fused.argmax()))
        for key, value in zip(
            ("conf_image", "conf_text", "w_image", "w_text"), (alpha, beta, w_image, w_text)
        ):
            out[key].append(value)
    return out


def running_sum(history):
    total = 0.0
    for value in history:
        total += value
    return total


def minmax_current(history):
    low, high = min(history), max(history)
    if high == low:  # the first sample, or a constant history: 0/0
        return 0.5
    return (history[-1] - low) / (high - low)


def assert_exactly_equal(ours, reference):
    assert ours["pred"].tolist() == reference["pred"]
    for key in ("conf_image", "conf_text", "w_image", "w_text"):
        assert ours[key].dtype == torch.float64
        assert ours[key].tolist() == reference[key], key  # bit-for-bit, not approximately


def random_stream(seed, samples=300, k=5, classes=11):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(samples, 1, generator=gen) * 8  # confident and unsure samples
    image = torch.randn(samples, classes, generator=gen) * scale
    captions = torch.randn(samples, k, classes, generator=gen) * scale[:, :, None]
    return image, captions


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ensemble_equals_sequential_definition(normalizer, seed):
    image, captions = random_stream(seed)
    assert_exactly_equal(
        ensemble(image, captions, normalizer), sequential(image, captions, normalizer)
    )


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_ensemble_exact_with_ties_and_constant_histories(normalizer):
    image, captions = random_stream(7, samples=40)
    # a constant prefix (every range 0), repeated samples (tied minima and maxima), a uniform
    # image prediction (confidence 0) and logits tied between classes (argmax tie rule)
    image[:6], captions[:6] = image[0], captions[0]
    image[10:20:3], captions[10:20:3] = image[9], captions[9]
    image[25] = 0.0
    image[30], captions[30] = 0.0, 0.0
    image[30, :3], captions[30, :, :3] = 5.0, 5.0
    ours = ensemble(image, captions, normalizer)
    assert_exactly_equal(ours, sequential(image, captions, normalizer))
    if normalizer == "minmax":
        assert ours["w_image"][:6].tolist() == [0.5] * 6  # first sample + constant history
    assert ours["pred"][30].item() == 0  # three tied classes: the lowest index


def test_constant_stream_falls_back_to_equal_weights():
    image = torch.tensor([[2.0, 0.0, 0.0]]).repeat(5, 1)
    captions = torch.tensor([[[0.0, 1.0, 0.0]]]).repeat(5, 2, 1)
    out = ensemble(image, captions, "minmax")
    assert out["w_image"].tolist() == [0.5] * 5 and out["w_text"].tolist() == [0.5] * 5


def test_hand_computed_weights():
    # C = 2: uniform (conf 0), one-hot-ish, and p = (0.9, 0.1): conf = 1 - H / ln 2
    conf_09 = 1 - (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))) / math.log(2)
    p_image = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]], dtype=torch.float64)
    p_text = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    conf = entropy_confidence(p_image)
    assert conf.tolist() == pytest.approx([0.0, 1.0, conf_09], abs=1e-12)
    minmax = fuse(p_image, p_text, "minmax")
    # image: t1 0/0 -> 0.5; t2 (1-0)/(1-0) = 1; t3 (c-0)/(1-0) = c.
    # text: t1, t2 constant -> 0.5; t3 is the new minimum -> 0 (image weight is not 0, kept)
    assert minmax["w_image"].tolist() == pytest.approx([0.5, 1.0, conf_09])
    assert minmax["w_text"].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert p_image[0].tolist() == [0.5, 0.5]  # the inputs are never modified
    l1 = fuse(p_image, p_text, "l1")
    assert l1["w_image"].tolist() == pytest.approx([0.0, 1.0, conf_09 / (1 + conf_09)])
    assert l1["w_text"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    # predictions: t1 image uniform -> text decides (class 0); t3 text weight 0 -> image (0)
    assert minmax["pred"].tolist() == [0, 0, 0]


def test_both_minmax_weights_zero_fall_back_to_equal():
    conf_image = torch.tensor([0.8, 0.3, 0.1], dtype=torch.float64)  # the running minimum
    conf_text = torch.tensor([0.6, 0.4, 0.2], dtype=torch.float64)  # ... for both
    w_image, w_text = modal_weights(conf_image, conf_text, "minmax")
    assert w_image.tolist() == [0.5, 0.5, 0.5] and w_text.tolist() == [0.5, 0.5, 0.5]
    w_image, _ = modal_weights(conf_image, conf_text * 0 + torch.tensor([0.1, 0.9, 0.5]), "minmax")
    assert w_image.tolist() == [0.5, 0.0, 0.0]  # text is not at its minimum: image keeps 0


def test_caption_probability_is_mean_of_softmaxes():
    logits = torch.tensor([[[10.0, 0.0], [0.0, 10.0], [0.0, 10.0]]])
    p = caption_probs(logits)[0]
    per_caption = torch.softmax(logits[0], dim=-1)
    assert p.tolist() == pytest.approx(per_caption.mean(0).tolist())
    assert p[1].item() == pytest.approx(2 / 3, abs=1e-4)  # not softmax of the mean logit (0.96)
    assert torch.softmax(logits[0].mean(0), -1)[1].item() > 0.96


def test_equal_normalizer_is_plain_average_and_none_uses_raw_confidences():
    image, captions = random_stream(3, samples=50)
    p_image, p_text = torch.softmax(image, -1), caption_probs(captions)
    equal = fuse(p_image, p_text, "equal")
    assert equal["pred"].tolist() == (p_image + p_text).argmax(1).tolist()
    raw = fuse(p_image, p_text, "none")
    assert raw["w_image"].tolist() == raw["conf_image"].tolist()


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="normalizer"):
        modal_weights(torch.ones(2), torch.ones(2), "softmax")
    with pytest.raises(ValueError, match=r"\[S, k, C\]"):
        ensemble(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k <= evaluator.coarse_k"):
        XMoReEvaluator(index={"folder": "x"}, coarse_k=8, k=16)
    with pytest.raises(ValueError, match="normalizer"):
        XMoReEvaluator(index={"folder": "x"}, normalizer="max")


def test_dedup_keeps_first_occurrence_in_rank_order():
    assert dedup(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


# ------------------------------------------------------------------------------------------
# Paper Table 8: the ratio of the adjusted confidences per correctness case
# ------------------------------------------------------------------------------------------


def test_weight_ratio_by_case_by_hand():
    w_image = torch.tensor([0.5, 1.0, 0.2, 0.3, 0.9, 0.6], dtype=torch.float64)
    w_text = torch.tensor([0.25, 0.0, 0.4, 0.0, 0.3, 0.2], dtype=torch.float64)
    image_ok = torch.tensor([True, True, False, False, False, True])
    text_ok = torch.tensor([False, False, True, False, False, True])
    xmore_ok = torch.tensor([True, True, True, True, False, True])
    out = weight_ratio_by_case(w_image, w_text, image_ok, text_ok, xmore_ok)
    # case 1 (image right, text wrong, X-MoRe right): samples 0 (2.0) and 1 (beta-hat = 0)
    assert out["case1"] == {"sum": 2.0, "num": 2, "beta_zero": 1}
    # case 2 (image wrong, text right, X-MoRe right): sample 2 (0.5)
    assert out["case2"] == {"sum": 0.5, "num": 1, "beta_zero": 0}
    # case 3 (both wrong, X-MoRe right): sample 3 only, whose beta-hat is 0; sample 4 (X-MoRe
    # wrong) and sample 5 (both right) are in no case
    assert out["case3"] == {"sum": 0.0, "num": 1, "beta_zero": 1}
    metrics = weight_ratio_metrics([out, out])  # two seeds' streams, pooled
    assert metrics["test/weight_ratio/case1"] == 2.0  # (2 + 2) / (4 - 2): inf never enters
    assert metrics["test/weight_ratio/case1/num"] == 4
    assert metrics["test/weight_ratio/case1/beta_zero"] == 2
    assert metrics["test/weight_ratio/case2"] == 0.5
    # no sample of case 3 has a defined ratio: no value (an empty table cell), only the counts
    assert "test/weight_ratio/case3" not in metrics
    assert (
        metrics["test/weight_ratio/case3/num"] == metrics["test/weight_ratio/case3/beta_zero"] == 2
    )
    assert all(math.isfinite(v) for v in metrics.values())


def test_minmax_beta_hat_is_zero_when_the_text_confidence_is_the_running_minimum():
    """The stated definition on a real min-max stream: the second sample's text confidence is
    the running minimum (w_txt = 0) while its image one is the running maximum (w_img = 1)."""
    conf_image = torch.tensor([0.25, 0.75, 0.5], dtype=torch.float64)
    conf_text = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    w_image, w_text = modal_weights(conf_image, conf_text, "minmax")
    assert w_image.tolist() == [0.5, 1.0, 0.5] and w_text.tolist() == [0.5, 0.0, 1.0]
    ok = torch.tensor([True, True, True])
    out = weight_ratio_by_case(w_image, w_text, ok, ~ok, ok)  # all three in case 1
    assert out["case1"] == {"sum": 1.0 + 0.5, "num": 3, "beta_zero": 1}
    assert weight_ratio_metrics([out])["test/weight_ratio/case1"] == 0.75
    # both weights 0 never happens: they fall back to 0.5 each (ratio 1)
    w_image, w_text = modal_weights(torch.tensor([0.5, 0.1]), torch.tensor([0.5, 0.1]), "minmax")
    assert w_image.tolist() == w_text.tolist() == [0.5, 0.5]


# ------------------------------------------------------------------------------------------
# The paper tables' configs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("xmore_fs", 10),
        ("xmore_imagenet", 10),
        ("xmore_ablation_retrieval", 5),
        ("xmore_ablation_confidence", 4),
        ("xmore_entropy", 10),
        ("xmore_weight_ratio", 6),
        ("xmore_k", 14),
    ],
)
def test_paper_tables_name_real_experiments_and_columns(name, rows):
    """Every cell of the X-MoRe paper tables is an X-MoRe experiment, each table has an Avg.
    column over all its datasets, and every paper number is a percentage (or, Tables 6 and 8,
    an entropy in nats and a ratio)."""
    from xmodal.config import list_configs
    from xmodal.tables import average_columns, table_config

    table = table_config(name)
    experiments = set(list_configs("experiment", "xmore/*"))
    averages = average_columns(table)
    datasets = [c.key for c in table.columns if c.key not in averages]
    assert averages["avg"] == datasets
    assert len(table.rows) == rows
    for row in table.rows:
        assert row.metric.startswith("test/"), row.label
        for ds in datasets:
            assert row.experiment.format(column=ds) in experiments, (row.label, ds)
        assert set(row.get("paper") or {}) <= {c.key for c in table.columns}
        assert all(0 < v < 100 for v in (row.get("paper") or {}).values())


# ------------------------------------------------------------------------------------------
# Retrieval results: null captions are dropped, short results skip the sample and are counted
# ------------------------------------------------------------------------------------------


def _index_with_null_captions(tmp_path, factory="Flat", n=40):
    """An index of n items (the test_xmore_index fake encoder) whose odd items' captions are
    null; returns its folder, the gallery and the captions."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from test_xmore_index import ENCODER, FakeEncoder, gallery_of
    from xmodal.data.collection import read_collection
    from xmodal.retrieval import clip_index

    (tmp_path / "c" / "images").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "c" / "images" / f"{i}.jpg")
    captions = [None if i % 2 else f"caption {i}" for i in range(n)]
    table = pa.table({"image_path": [f"images/{i}.jpg" for i in range(n)], "caption": captions})
    pq.write_table(table, tmp_path / "c" / "metadata.parquet")
    collection = read_collection(tmp_path / "c" / "metadata.parquet")
    folder = tmp_path / "index"
    options = clip_index.IndexOptions(factory=factory, tune_k=8)
    clip_index.build(folder, collection, FakeEncoder(), ENCODER, options=options)
    return folder, gallery_of(folder), captions, np


@pytest.mark.parametrize(("factory", "nprobe", "K"), [("Flat", None, 3), ("IVF4,Flat", 1, 10)])
def test_coarse_drops_null_captions_and_flags_short_results(tmp_path, factory, nprobe, K):
    from types import SimpleNamespace

    from xmodal.retrieval.clip_index import ClipIndex
    from xmodal.retrieval.search import topk

    folder, gallery, captions, _ = _index_with_null_captions(tmp_path, factory)
    noise = torch.randn(30, gallery.shape[1], generator=torch.Generator().manual_seed(0))
    queries = gallery[:30] + 0.3 * noise
    valid = torch.ones(30, dtype=torch.bool)
    valid[7] = False  # an undecodable test image
    encoder = SimpleNamespace(images=lambda ctx, paths: (queries, valid))
    split = SimpleNamespace(image_paths=[f"q{i}" for i in range(30)])
    evaluator = XMoReEvaluator(index={"folder": str(folder), "nprobe": nprobe}, coarse_k=K, k=1)
    out = evaluator.coarse(None, split, encoder)

    if nprobe is None:  # exact: the top-K of every query, nulls dropped in rank order
        ids = topk(torch.nn.functional.normalize(queries, dim=-1), gallery, K)[1]
    else:
        ids = ClipIndex(folder, nprobe=nprobe).search(
            torch.nn.functional.normalize(queries, dim=-1), K
        )[1]
    for i in range(30):
        row = [captions[j] for j in ids[i].tolist() if j >= 0]
        kept = [c for c in row if c is not None]
        short = len(row) < K
        assert out["short"][i] == (valid[i].item() and short)
        assert out["nulls"][i] == (len(row) - len(kept) if valid[i] else 0)
        expected = kept if valid[i] and not short and kept else None
        assert out["captions"][i] == expected, i
    kept = [i for i in range(30) if valid[i] and not out["short"][i]]
    if nprobe is None:  # a null caption never skips a sample, only one with nothing else left
        assert any(0 < out["nulls"][i] < K for i in kept)
        assert any(out["captions"][i] is None for i in kept)
        assert not any(out["short"])
    else:  # one cell of 4 (10 items on average) often holds fewer than K = 10
        assert sum(out["short"]) > 0


def test_stream_metrics_count_skipped_samples_and_keep_denominators_honest():
    from types import SimpleNamespace

    from xmodal.data.base import ClassificationSplit

    # 8 samples, 3 classes: 0-3 evaluated, 4 short results, 5 only null captions, 6 corrupt,
    # 7 evaluated with 2 null captions dropped
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    logits = torch.full((8, 3), 0.0)
    image_pred = [0, 1, 0, 1, 1, 0, 0, 1]  # image-only: right on 0, 1, 4, 6, 7
    logits[torch.arange(8), torch.tensor(image_pred)] = 5.0
    valid = torch.tensor([True] * 6 + [False, True])
    captions = [["a"], ["b"], ["c"], ["d"], None, None, None, ["e"]]
    p_text = torch.full((8, 3), float("nan"))
    text_pred = {0: 0, 1: 2, 2: 2, 3: 0, 7: 1}  # text-only: right on 0, 2, 3, 7
    for i, c in text_pred.items():
        p_text[i] = torch.tensor([0.1, 0.1, 0.1])
        p_text[i, c] = 0.8
    retrieved = {
        "captions": captions,
        "short": [False, False, False, False, True, False, False, False],
        "nulls": [0, 0, 0, 1, 0, 3, 0, 2],  # 5: K=3 results, all null
    }
    split = ClassificationSplit("t", [f"{i}.jpg" for i in range(8)], labels, ["x", "y", "z"])
    ctx = SimpleNamespace(cfg=SimpleNamespace(seed=0), is_rank_zero=False)
    evaluator = XMoReEvaluator(index={"folder": "x"}, coarse_k=3, k=1, save_stream=False)
    m = evaluator.stream_metrics(ctx, split, logits, valid, retrieved, p_text)
    assert m["test/num_samples"] == 7 and m["test/num_corrupt"] == 1
    assert m["test/num_evaluated"] == 5 and m["test/num_skipped"] == 2
    assert m["test/short_results"] == 1 and m["test/no_captions"] == 1
    assert m["test/null_captions"] == 1 + 3 + 2  # over the valid samples
    evaluated = [0, 1, 2, 3, 7]
    assert m["test/acc/image"] == pytest.approx(100 * 3 / 5)  # 0, 1, 7 of the evaluated
    assert m["test/acc/text"] == pytest.approx(100 * 4 / 5)  # 0, 2, 3, 7
    assert m["test/acc/image_all"] == pytest.approx(100 * 4 / 7)  # 0, 1, 4, 7 of the valid
    # xmore_all: the evaluated samples' X-MoRe predictions + the skipped ones' image-only
    xmore_hits = m["test/acc/xmore"] * len(evaluated) / 100
    skipped_image_hits = 1  # sample 4 right, 5 wrong
    assert m["test/acc/xmore_all"] == pytest.approx(100 * (xmore_hits + skipped_image_hits) / 7)
