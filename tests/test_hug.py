"""HUG (methods/hug.md): losses against the released code's semantics and the paper's equations
summed by hand, uncertainty fusion, the model's passes on the tiny BLIP-2, ranking, CIRR files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xmodal.methods.hug import (
    HUG,
    HUGConfig,
    UncertaintyEstimator,
    coordination_loss,
    distance_score,
    fine_grained_contrast,
    fuse_uncertainty,
    fusion_weights,
    holistic_contrast,
    hug_loss,
)
from xmodal.probabilistic import expected_distance

LN2 = math.log(2)


# ------------------------------------------------------------------------------ fixtures


def spec_fixture() -> dict[str, torch.Tensor]:
    """methods/hug.md §9: float32, B=4, K=3, D=8, n = arange(96) as [4, 3, 8]."""
    n = torch.arange(96, dtype=torch.float32).reshape(4, 3, 8)
    return {
        "mu_q": torch.sin(0.37 * n),
        "mu_c": torch.cos(0.23 * n),
        "s_q": 0.10 + 0.05 * (n % 7),
        "s_c": 0.20 + 0.03 * (n % 5),
        "s_mm": 0.30 + 0.02 * (n % 11),
        "s_mx": 0.35 + 0.01 * (n % 13),
        "s_r": 0.50 + 0.04 * (n % 9),
        "s_t": 0.25 + 0.06 * (n % 6),
    }


def random_fixture(seed: int, b: int, k: int, d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(b, k, d, generator=g) for name in ("mu_q", "mu_c")}
    for name in ("s_q", "s_c", "s_mm", "s_mx"):
        out[name] = 0.05 + torch.rand(b, k, d, generator=g)
    return out


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _dist(f: dict[str, torch.Tensor], i: int, j: int) -> float:
    """Eq 15 written out: ||mu_q^i - mu_c^j||^2 + ||sigma_q^i||^2 + ||sigma_c^j||^2."""
    mq, mc = f["mu_q"][i].double(), f["mu_c"][j].double()
    sq, sc = f["s_q"][i].double(), f["s_c"][j].double()
    return float(((mq - mc) ** 2).sum() + (sq**2).sum() + (sc**2).sum())


# ---------------------------------------------------- the released code's losses, as plain loops


def official_reference(f: dict[str, torch.Tensor], tau: float = 0.07, margin: float = 0.2):
    """The released code's semantics (tanghme0w/AAAI26-HUG modules/losses.py, hug.md §8), loop by
    loop in float64: L_HC one-directional with log(S+1e-8), a=1, b=0, divided by B; L_FC InfoNCE
    per (i, k) against the other 2K-2 components of instance i plus a per-k in-batch InfoNCE,
    divided by B*K + K; L_Cord hinge on summed variances; total = HC + 0.5 FC + 0.1 Cord."""
    b, k, _ = f["mu_q"].shape
    hc = 0.0
    for i in range(b):
        hc += -math.log(_sig(-_dist(f, i, i)) + 1e-8)
        hc += sum(-math.log(_sig(_dist(f, i, j)) + 1e-8) for j in range(b) if j != i)
    hc /= b
    q = F.normalize(f["s_q"].double(), dim=-1)
    c = F.normalize(f["s_c"].double(), dim=-1)
    fc = 0.0
    for kk in range(k):
        for i in range(b):
            logits = [float(q[i, kk] @ c[i, kk]) / tau]
            logits += [float(q[i, kk] @ q[i, k2]) / tau for k2 in range(k) if k2 != kk]
            logits += [float(q[i, kk] @ c[i, k2]) / tau for k2 in range(k) if k2 != kk]
            fc += -logits[0] + math.log(sum(math.exp(x) for x in logits))
        inst = 0.0
        for i in range(b):
            row = [float(q[i, kk] @ c[j, kk]) / tau for j in range(b)]
            inst += -row[i] + math.log(sum(math.exp(x) for x in row))
        fc += inst / b
    fc /= b * k + k
    cord = 0.0
    for i in range(b):
        matched = float((f["s_mm"][i].double() ** 2).sum())
        mismatched = float((f["s_mx"][i].double() ** 2).sum())
        cord += max(0.0, margin + matched - mismatched)
    cord /= b
    return {"hc": hc, "fc": fc, "cord": cord, "total": hc + 0.5 * fc + 0.1 * cord}


def _losses(f: dict[str, torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    return hug_loss(f["mu_q"], f["s_q"], f["mu_c"], f["s_c"], f["s_mm"], f["s_mx"], **kw)


def test_official_losses_equal_the_released_code_on_the_spec_fixture():
    f = spec_fixture()
    expected_d = [
        [11.082103, 19.429342, 30.682060, 39.007195],
        [38.928837, 40.410767, 32.862175, 20.879534],
        [19.959703, 16.788456, 17.414732, 21.900202],
        [23.527458, 35.180706, 40.625305, 37.250095],
    ]
    d = expected_distance(f["mu_q"], f["s_q"], f["mu_c"], f["s_c"])
    torch.testing.assert_close(d, torch.tensor(expected_d), atol=1e-4, rtol=1e-6)
    got = _losses(f, variant="official")
    spec = {"hc": 16.256474, "fc": 1.486694, "cord": 0.058501, "total": 17.005671}
    for key, value in spec.items():
        assert abs(float(got[key]) - value) < 1e-5, (key, float(got[key]), value)
    ref = official_reference(f)
    for key in spec:
        assert abs(float(got[key]) - ref[key]) < 1e-5, key


@pytest.mark.parametrize(("seed", "b", "k", "d"), [(0, 2, 2, 3), (1, 5, 4, 6), (2, 7, 3, 16)])
def test_official_losses_equal_the_released_semantics_on_random_fixtures(seed, b, k, d):
    f = random_fixture(seed, b, k, d)
    got, ref = _losses(f, variant="official"), official_reference(f)
    for key in ("hc", "fc", "cord", "total"):
        assert float(got[key]) == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key


def test_official_dynamic_weighting_on_the_spec_fixture():
    f = spec_fixture()
    sigma_q = fuse_uncertainty(f["s_r"], f["s_t"], f["s_mm"], mode="dynamic", variant="official")
    torch.testing.assert_close(
        sigma_q[0, 0, :4], torch.tensor([0.357109, 0.394230, 0.432168, 0.470533]), atol=1e-5, rtol=0
    )
    assert float(sigma_q.sum()) == pytest.approx(46.429226, abs=1e-4)
    w_r, w_t, w_m = fusion_weights(f["s_r"], f["s_t"], f["s_mm"], eps=1e-6)
    torch.testing.assert_close(
        w_r[0, 0, :4], torch.tensor([0.295881, 0.292039, 0.288362, 0.284819]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(w_r + w_t + w_m, torch.ones_like(w_r), atol=1e-5, rtol=0)


def _released_fusion(sigma: float) -> float:
    """The released DynamicWeighting on three equal sigma, in float64: w = e^-s^2 / (3 e^-s^2 +
    1e-6), sigma_q = sqrt(3 w s^2 + 1e-6)."""
    e = math.exp(-(sigma**2))
    return math.sqrt(3 * e / (3 * e + 1e-6) * sigma**2 + 1e-6)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 5.0, 10.0, 100.0])
def test_paper_fusion_of_equal_sigmas_returns_sigma(sigma):
    """Eqs 10-11 with an exact softmax: equal sources get weights 1/3 and fuse to themselves at
    any scale; the released code's eps (variant=official) collapses them once sigma^2 >~ 14."""
    x = torch.full((2, 3, 4), sigma, requires_grad=True)
    fused = fuse_uncertainty(x, x, x)
    torch.testing.assert_close(fused, torch.full_like(fused, sigma), rtol=1e-6, atol=0)
    for w in fusion_weights(x, x, x):
        torch.testing.assert_close(w, torch.full_like(w, 1 / 3), rtol=1e-6, atol=0)
    fused.sum().backward()
    assert torch.isfinite(x.grad).all()
    official = fuse_uncertainty(x.detach(), x.detach(), x.detach(), variant="official")
    assert float(official[0, 0, 0]) == pytest.approx(_released_fusion(sigma), rel=1e-5)
    if sigma >= 5:  # the collapse the paper default avoids: 5 -> 0.032, 10 and 100 -> 0.001
        assert float(official[0, 0, 0]) < 0.04


def test_paper_fusion_weights_are_the_softmax_at_any_scale():
    g = torch.Generator().manual_seed(7)
    s = [torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 30 for _ in range(3)]
    expected = torch.softmax(torch.stack([-(x**2) for x in s]), dim=0)  # log-sum-exp inside
    torch.testing.assert_close(torch.stack(fusion_weights(*s)), expected)
    var = (expected * torch.stack(s) ** 2).sum(0)
    torch.testing.assert_close(fuse_uncertainty(*s), var.sqrt())
    assert torch.isfinite(var).all() and bool((var > 0).all())


# ------------------------------------------------------------ paper losses vs hand-summed equations


@pytest.mark.parametrize("neg_scale", ["batch", "sum"])
@pytest.mark.parametrize(("a", "b"), [(1.0, 0.0), (0.3, -2.0)])
def test_holistic_contrast_equals_eq13_summed_by_hand(neg_scale, a, b):
    f = spec_fixture()
    n = 4
    scale = n / (n - 1) if neg_scale == "batch" else 1.0
    expected = 0.0
    for i in range(n):
        expected += -math.log(_sig(-a * _dist(f, i, i) - b))
        for j in range(n):
            if j != i:
                expected += -scale * math.log(_sig(a * _dist(f, i, j) + b))
                expected += -scale * math.log(_sig(a * _dist(f, j, i) + b))
    expected /= n
    d = expected_distance(f["mu_q"], f["s_q"], f["mu_c"], f["s_c"])
    got = holistic_contrast(d, a, b, neg_scale)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    loss = _losses(f, a=a, b=b, hc_neg_scale=neg_scale)
    assert float(loss["hc"]) == pytest.approx(expected, rel=1e-5)


def fc_by_hand(f, negatives, a=1.0, b=0.0, on="std") -> float:
    """Eq 16 with the three negative sets of hug.md §3, loop by loop."""
    side = {"q": f["s_q"].double(), "c": f["s_c"].double()}
    if on == "var":
        side = {m: v**2 for m, v in side.items()}
    n, k, _ = side["q"].shape
    total = 0.0
    for i in range(n):
        for m, other in (("q", "c"), ("c", "q")):
            for kk in range(k):
                for kind in negatives:
                    terms = []
                    for j in range(n):
                        for k2 in range(k):
                            if k2 == kk or (kind == "component" and j != i):
                                continue
                            if kind == "instance" and j == i:
                                continue
                            partner = side[other if kind == "modality" else m]
                            dist = float(((side[m][i, kk] - partner[j, k2]) ** 2).sum())
                            terms.append(-math.log(_sig(a * dist + b)))
                    total += sum(terms) / len(terms)
    return total / n


@pytest.mark.parametrize(
    "negatives",
    [["component"], ["component", "instance"], ["component", "instance", "modality"], ["modality"]],
)
def test_fine_grained_contrast_equals_eq16_summed_by_hand(negatives):
    f = spec_fixture()
    got = fine_grained_contrast(f["s_q"], f["s_c"], 1.0, 0.0, negatives)
    assert float(got) == pytest.approx(fc_by_hand(f, negatives), rel=1e-5)
    got = fine_grained_contrast(f["s_q"], f["s_c"], 0.5, -0.2, negatives, on="var")
    assert float(got) == pytest.approx(fc_by_hand(f, negatives, 0.5, -0.2, "var"), rel=1e-5)


def test_coordination_loss_equals_eq9_and_ranks_the_right_way():
    f = spec_fixture()
    expected = 0.0
    for i in range(4):
        gap = float((f["s_mx"][i] ** 2).mean() - (f["s_mm"][i] ** 2).mean())
        expected += -math.log(_sig(gap))
    assert float(coordination_loss(f["s_mm"], f["s_mx"])) == pytest.approx(expected / 4, rel=1e-6)
    matched = torch.full((3, 2, 4), 0.2)
    assert float(coordination_loss(matched, matched + 0.5)) < LN2  # mismatched more uncertain
    assert float(coordination_loss(matched, matched)) == pytest.approx(LN2)
    assert float(coordination_loss(matched + 0.5, matched)) > LN2


def test_total_is_eq17_and_terms_switch_off():
    f = spec_fixture()
    loss = _losses(f, lambda_fc=0.5, lambda_cord=0.1)
    total = loss["hc"] + 0.5 * loss["fc"] + 0.1 * loss["cord"]
    assert float(loss["total"]) == pytest.approx(float(total), rel=1e-6)
    assert float(loss["fc"]) == pytest.approx(fc_by_hand(f, ["component", "instance", "modality"]))
    off = hug_loss(f["mu_q"], f["s_q"], f["mu_c"], f["s_c"], None, None, fc_neg=[])
    assert float(off["fc"]) == 0 and float(off["cord"]) == 0
    assert float(off["total"]) == pytest.approx(float(loss["hc"]), rel=1e-6)


def test_paper_losses_stay_finite_at_distance_1e4_and_variance_near_0():
    g = torch.Generator().manual_seed(0)
    mu_q = (3.0 * torch.randn(6, 8, 64, generator=g)).requires_grad_()
    mu_c = 3.0 * torch.randn(6, 8, 64, generator=g)
    tiny = torch.full((6, 8, 64), 1e-12, requires_grad=True)
    d = expected_distance(mu_q, tiny, mu_c, tiny)
    assert 5e3 < float(d.detach().min()) and float(d.detach().max()) < 2e4
    loss = hug_loss(mu_q, tiny, mu_c, tiny, tiny, tiny)
    loss["total"].backward()
    assert all(torch.isfinite(v) for v in loss.values())
    assert torch.isfinite(mu_q.grad).all() and torch.isfinite(tiny.grad).all()
    # log-sigmoid keeps the positive term linear in d (no saturation), unlike log(S + 1e-8)
    hc = holistic_contrast(d.detach().double())
    assert float(hc) > float(d.detach().diagonal().mean()) - 1
    far = {**spec_fixture(), "mu_q": 1e3 * spec_fixture()["mu_q"]}
    assert float(_losses(far)["hc"]) > 1e6
    saturated = float(_losses(far, variant="official")["hc"])  # every positive at -log(1e-8)
    assert saturated == pytest.approx(-math.log(1e-8), rel=1e-4)
    sigma = fuse_uncertainty(*(torch.zeros(2, 3, 4, requires_grad=True) for _ in range(3)))
    sigma.sum().backward()
    assert torch.isfinite(sigma).all()


def test_fusion_modes_and_errors():
    g = torch.Generator().manual_seed(3)
    s = [0.1 + torch.rand(2, 3, 4, generator=g) for _ in range(3)]
    static = fuse_uncertainty(*s, mode="static")
    torch.testing.assert_close(static, torch.sqrt((s[0] ** 2 + s[1] ** 2 + s[2] ** 2) / 3))
    two = fuse_uncertainty(s[0], s[1], None, mode="static")
    torch.testing.assert_close(two, torch.sqrt((s[0] ** 2 + s[1] ** 2) / 2))
    dynamic = fuse_uncertainty(*s)
    w = torch.softmax(torch.stack([-(x**2) for x in s]), dim=0)
    torch.testing.assert_close(dynamic, torch.sqrt((w * torch.stack(s) ** 2).sum(0)))
    with pytest.raises(ValueError, match="sigma_m"):
        fuse_uncertainty(s[0], s[1], None, mode="dynamic")
    with pytest.raises(ValueError, match="fusion mode"):
        fuse_uncertainty(*s, mode="mean")
    with pytest.raises(ValueError, match="variant"):
        fuse_uncertainty(*s, variant="code")


def test_bad_input_gives_clear_errors():
    f = spec_fixture()
    with pytest.raises(ValueError, match="mu_q's shape"):
        hug_loss(f["mu_q"], f["s_q"][:, :2], f["mu_c"], f["s_c"], None, None)
    with pytest.raises(ValueError, match="variant"):
        _losses(f, variant="released")
    with pytest.raises(ValueError, match="negatives"):
        fine_grained_contrast(f["s_q"], f["s_c"], negatives=["components"])
    with pytest.raises(ValueError, match="K >= 2"):
        fine_grained_contrast(f["s_q"][:, :1], f["s_c"][:, :1])
    with pytest.raises(ValueError, match="B >= 2"):
        holistic_contrast(torch.ones(1, 1))


# --------------------------------------------------------------------- the model on tiny BLIP-2


@pytest.fixture(scope="module")
def tiny():
    from xmodal import backbones

    torch.manual_seed(0)
    model, preprocess, tokenizer = backbones.build("tiny_blip2")
    pixels = torch.randn(4, 3, 32, 32)
    tokens = tokenizer(["make the circle red", "add a small blue square", "move it left", "x"])
    return model, tokenizer, pixels, tokens


def make_hug(model, **kw) -> HUG:
    import copy

    return HUG(copy.deepcopy(model).train(), HUGConfig(**kw))


def test_estimator_is_the_specified_block():
    est = UncertaintyEstimator(64, num_heads=4, dropout=0.1)
    layer = est.transformer_layer
    assert (layer.self_attn.num_heads, layer.linear1.out_features) == (4, 256)
    assert not layer.norm_first and layer.activation_relu_or_gelu == 2  # post-LN, GELU
    head = [type(m).__name__ for m in est.uncertainty_head]
    assert head == ["Linear", "GELU", "Dropout", "Linear", "Softplus"]
    # the released code's state-dict names, so its weights load as they are
    assert {k.split(".")[0] for k in est.state_dict()} == {"transformer_layer", "uncertainty_head"}
    out = est.eval()(torch.randn(2, 8, 64))
    assert out.shape == (2, 8, 64) and bool((out > 0).all())


@pytest.mark.parametrize("text_pass", ["skip", "zero_token", "cls"])
def test_query_and_target_passes(tiny, text_pass):
    model, _, pixels, tokens = tiny
    hug = make_hug(model, text_pass=text_pass).eval()
    k, h = model.num_query_tokens, model.hidden_size
    with torch.no_grad():
        q = hug.encode_query(pixels, tokens)
        mu_c, sigma_c = hug.encode_target(pixels)
        text_states = hug._text_only(tokens["input_ids"], tokens["attention_mask"])
    for x in (q.mu, q.sigma, q.sigma_r, q.sigma_t, q.sigma_m, mu_c, sigma_c):
        assert x.shape == (4, k, h)
    # the shared g_V: the reference's sigma_r equals the target side's sigma_c of the same image
    torch.testing.assert_close(q.sigma_r, sigma_c)
    torch.testing.assert_close(q.sigma, fuse_uncertainty(q.sigma_r, q.sigma_t, q.sigma_m))
    same_over_k = torch.allclose(text_states, text_states[:, :1].expand_as(text_states))
    assert same_over_k == (text_pass == "cls")  # option (c) broadcasts one [CLS] state


def test_skip_and_zero_token_text_passes_differ(tiny):
    model, _, _, tokens = tiny
    a = make_hug(model, text_pass="skip").eval()
    b = make_hug(model, text_pass="zero_token").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        assert not torch.allclose(a._text_only(ids, mask), b._text_only(ids, mask))


def test_paper_trains_qformer_and_a_b_official_trains_only_the_estimators(tiny):
    model, _, pixels, tokens = tiny
    batch = {"reference": pixels, "target": pixels.flip(0), "text": tokens}
    paper = make_hug(model)
    paper.log = lambda *a, **k: None
    paper.training_step(batch, 0).backward()
    assert paper.backbone.query_tokens.grad is not None
    assert paper.backbone.qformer.encoder.layer[0].attention.attention.query.weight.grad is not None
    assert all(p.grad is not None for p in (paper.hc_a, paper.hc_b, paper.fc_a, paper.fc_b))
    assert all(p.grad is None for p in paper.backbone.vision_model.parameters())

    official = make_hug(model, variant="official")
    official.log = lambda *a, **k: None
    assert official.text_pass == "cls" and official.mismatch == "randperm"
    assert not any(p.requires_grad for p in official.backbone.parameters())
    assert not hasattr(official, "hc_a")  # a, b fixed at 1, 0 as in the released code
    official.training_step(batch, 0).backward()
    assert all(p.grad is not None for p in official.g_m.parameters() if p.requires_grad)
    assert all(p.grad is None for p in official.backbone.parameters())


@pytest.mark.parametrize(
    "flags",
    [
        {"prob": False, "fc_neg": [], "use_sigma_m": False, "fusion": "static", "lambda_cord": 0},
        {"granularity": "global", "fc_neg": [], "use_sigma_m": False, "fusion": "static"},
        {"fc_neg": ["component"], "use_sigma_m": False, "fusion": "static", "lambda_cord": 0},
        {"use_sigma_m": True, "fusion": "static", "lambda_cord": 0.1},
    ],
    ids=["row0", "row1", "row2", "row6"],
)
def test_ablation_rows_train_and_use_every_parameter(tiny, flags):
    model, _, pixels, tokens = tiny
    hug = make_hug(model, **flags)
    hug.log = lambda *a, **k: None
    hug.training_step({"reference": pixels, "target": pixels.flip(0), "text": tokens}, 0).backward()
    unused = [n for n, p in hug.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused  # DDP without find_unused_parameters needs every parameter used
    with torch.no_grad():
        mu_c, sigma_c = hug.eval().encode_target(pixels)
    pooled = not flags.get("prob", True) or flags.get("granularity") == "global"
    assert mu_c.shape[1] == (1 if pooled else model.num_query_tokens)


def test_checkpoints_leave_out_the_frozen_vit_and_load_strictly(tiny):
    model = tiny[0]
    checkpoint = {"state_dict": make_hug(model).state_dict()}
    make_hug(model).on_save_checkpoint(checkpoint)
    assert not any(k.startswith("backbone.vision_model.") for k in checkpoint["state_dict"])
    make_hug(model).load_state_dict(checkpoint["state_dict"], strict=True)
    without_g_m = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("g_m.")}
    with pytest.raises(RuntimeError, match="Missing key"):  # anything else must be there
        make_hug(model).load_state_dict(without_g_m)


def test_config_checks():
    from xmodal.errors import ConfigError

    with pytest.raises(ConfigError, match="variant=official"):
        HUGConfig(variant="official", fusion="static").check()
    with pytest.raises(ConfigError, match="fc_neg"):
        HUGConfig(granularity="global").check()
    with pytest.raises(ConfigError, match="method.text_pass='none' is not one of"):
        HUGConfig(text_pass="none").check()
    with pytest.raises(ConfigError, match="use_sigma_m"):
        HUGConfig(use_sigma_m=False).check()


def test_ranking_uses_the_expected_distance_chunked():
    from xmodal.retrieval.search import rank_of, topk

    g = torch.Generator().manual_seed(5)
    queries = torch.stack([torch.randn(9, 12, generator=g), torch.rand(9, 12, generator=g)], 1)
    gallery = torch.stack([torch.randn(30, 12, generator=g), torch.rand(30, 12, generator=g)], 1)
    dense = expected_distance(queries[:, 0], queries[:, 1], gallery[:, 0], gallery[:, 1])
    target = torch.arange(9) * 3
    kw = {"score_fn": distance_score, "largest": False, "chunk_size": 4}
    ranks = rank_of(queries, gallery, target, gallery_chunk_size=7, **kw)
    expected = (dense < dense.gather(1, target[:, None])).sum(1)
    assert torch.equal(ranks, expected)
    _, idx = topk(queries, gallery, 5, **kw)
    assert torch.equal(idx, dense.argsort(1)[:, :5])


def test_blip_caption_text():
    from xmodal.data.base import CIRSplit
    from xmodal.data.cir import blip_caption, query_texts, training_texts

    assert blip_caption("a  b;c") == "a b c"
    assert blip_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    split = CIRSplit(
        name="fiq",
        protocol="clip4cir",
        reference=["r"],
        text=["is red and has long sleeves"],
        target=["t"],
        gallery=["r", "t"],
        name_to_path={},
        remove_reference=False,
        captions=[["Is Red.", "has (long) sleeves!"]],
    )
    # HUG trains and queries with the same cleaned text; max_words cuts it
    assert query_texts(split, "blip_caption") == ["is red , has long sleeves"]
    assert training_texts(split, "blip_caption", max_words=3) == [(0, "is red ,")]
    assert query_texts(split, "both_orders") == split.text


# ------------------------------------------------------------------------ runs on the shapes world


def _train_in_process(overrides: list[str]) -> tuple[dict, Path]:
    from xmodal.config import compose
    from xmodal.pipeline import train

    cfg = compose("train", overrides)
    return train(cfg, overrides), Path(cfg.run_dir)


SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]


def test_cirr_run_writes_val_metrics_and_test1_submission(xmodal_env, shapes_world):
    from xmodal.data.cirr import load

    metrics, run = _train_in_process(
        ["experiment=hug/shapes_cirr", *SMALL, "trainer.max_epochs=1", "data.split=test1"]
    )
    for key in ("val/R@1", "val/R@5", "val/R@50", "val/Rs@1", "val/Rs@3", "val/avg"):
        assert 0 <= metrics[key] <= 100, key
    assert metrics["val/avg"] == pytest.approx((metrics["val/R@5"] + metrics["val/Rs@1"]) / 2)
    split = load(shapes_world / "cirr", "test1")
    recall = json.loads((run / "submission" / "recall_submission_cirr_test1.json").read_text())
    subset = json.loads(
        (run / "submission" / "recall_subset_submission_cirr_test1.json").read_text()
    )
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    assert set(recall) == set(subset) == {str(p) for p in split.pair_ids}
    for i, pair in enumerate(split.pair_ids):
        ranked, top3 = recall[str(pair)], subset[str(pair)]
        assert len(ranked) == min(50, len(split.gallery) - 1) == len(set(ranked))
        assert split.reference[i] not in ranked and split.reference[i] not in top3
        others = [m for m in split.members[i] if m != split.reference[i]]
        assert top3 == sorted(others, key=ranked.index)[:3]  # the same ranking, restricted


def test_cli_fashioniq_run_writes_metrics_and_uncertainties(xmodal_env, shapes_world):
    import csv
    import os
    import subprocess
    import sys

    from xmodal.config import compose
    from xmodal.pipeline import load_run
    from xmodal.runs import read_metrics

    overrides = ["experiment=hug/shapes_fashioniq", *SMALL, "trainer.max_epochs=1"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **xmodal_env, "PYTHONPATH": str(repo / "src")}
    cmd = [sys.executable, "-m", "xmodal.cli.train", *overrides]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = Path(compose("train", overrides).run_dir)
    metrics = read_metrics(run)
    for cat in ("dress", "shirt", "toptee"):
        assert 0 <= metrics[f"test/{cat}/R@10"] <= metrics[f"test/{cat}/R@50"] <= 100
        assert metrics[f"test/{cat}/protocol"] == "clip4cir"
    avg10 = sum(metrics[f"test/{c}/R@10"] for c in ("dress", "shirt", "toptee")) / 3
    assert metrics["test/avg/R@10"] == pytest.approx(avg10)
    assert metrics["test/ms_per_query"] > 0 and "val/avg" in metrics
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # per category: the protocol's uncertainty file (docs/cir.md) with HUG's sources beside it
    from xmodal.metrics.calibration import confidence_auroc
    from xmodal.protocols.cir import UNCERTAINTY_COLUMNS

    for cat in ("dress", "shirt", "toptee"):
        rows = list(csv.DictReader((run / "uncertainty" / f"test_{cat}.csv").open()))
        extras = ["sigma_r2", "sigma_t2", "sigma_m2"]
        assert list(rows[0]) == [*UNCERTAINTY_COLUMNS, *extras]
        assert len(rows) == metrics[f"test/{cat}/num_queries"]
        assert all(float(r["uncertainty"]) > 0 and int(r["target_rank"]) >= 0 for r in rows)
        # the exported target ranks reproduce the logged recalls and calibration exactly
        ranks = torch.tensor([int(r["target_rank"]) for r in rows])
        for k in (1, 5, 10, 50):
            recall = 100 * (ranks < k).double().mean().item()
            assert metrics[f"test/{cat}/R@{k}"] == pytest.approx(recall, abs=1e-4), (cat, k)
        confidence = -torch.tensor([float(r["uncertainty"]) for r in rows], dtype=torch.float64)
        auroc = confidence_auroc(confidence, ranks < 10)
        assert metrics[f"test/{cat}/uncertainty/k10/AUROC"] == pytest.approx(
            auroc, rel=1e-5, nan_ok=True
        )
    module = load_run(run)  # the checkpoint alone rebuilds the model (its ViT left out)
    assert isinstance(module, HUG) and not module.training
    # the uCLIP calibration metrics on HUG's query uncertainty, hits at R@1 and R@10
    for name in ("S", "R2", "-SR2", "AUROC", "AURC"):
        assert {f"test/dress/uncertainty/k{k}/{name}" for k in (1, 10)} <= set(metrics)


@pytest.mark.slow
def test_shapes_training_beats_the_untrained_model(xmodal_env):
    """The medium shapes world (as in the demo): trained HUG clearly above the untrained one."""
    # measured: FashionIQ format 12.8 -> 58.1, CIRR format 7.0 -> 25.5 ((R@10+R@50)/2, (R@5+Rs@1)/2)
    for exp, margin in (("hug/shapes_fashioniq", 30), ("hug/shapes_cirr", 12)):
        common = [f"experiment={exp}", "trainer.enable_progress_bar=false"]
        untrained, _ = _train_in_process([*common, "trainer.max_epochs=0"])
        trained, _ = _train_in_process(common)
        gain = trained["test/avg"] - untrained["test/avg"]
        assert gain > margin, (exp, trained["test/avg"], untrained["test/avg"])
