"""ProbVLM (method=probvlm): the loss against the paper's equations and the released code's formula,
the uncertainties, training on cached embeddings only, and the CLI end to end on the shapes world
with uCLIP's calibration protocol."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xmodal.methods.probvlm import (
    GG,
    BayesCapAdapter,
    aleatoric_variance,
    distribution,
    mc_dropout,
    official_likelihood,
    probvlm_loss,
    resolve_config,
)
from xmodal.methods.schemas import ProbVLMConfig
from xmodal.probabilistic import generalized_gaussian_nll

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes_world=small", "trainer.enable_progress_bar=false"]


def _gg_nll_by_hand(z, mu, alpha, beta):
    """Eq 3 plus its constant log 2, in float64: (|mu - z| / alpha)^beta - log(beta / alpha) +
    log Gamma(1 / beta) + log 2."""
    z, mu, alpha, beta = (t.double() for t in (z, mu, alpha, beta))
    return (
        ((mu - z).abs() / alpha) ** beta
        - torch.log(beta / alpha)
        + torch.lgamma(1 / beta)
        + math.log(2)
    )


def _batch(seed=0, n=8, d=16):
    g = torch.Generator().manual_seed(seed)
    z_v, z_t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)

    def gg():
        mu = torch.randn(n, d, generator=g)
        return GG(mu, torch.rand(n, d, generator=g) + 0.2, torch.rand(n, d, generator=g) * 2 + 0.5)

    return z_v, z_t, gg(), gg()


def test_paper_loss_is_eq_8_of_eq_3_and_eq_7():
    """Paper variant: L = L_rec(z_V|V) + L_rec(z_T|T) + lambda (L(z_T|V) + L(z_V|T)), each a mean
    over batch and dimensions of the generalized-Gaussian NLL."""
    cfg = resolve_config(ProbVLMConfig(lambda_cross=0.3))
    z_v, z_t, image, text = _batch()
    loss, parts = probvlm_loss(z_v, z_t, image, text, cfg)

    def nll(z, gg):
        return _gg_nll_by_hand(z, gg.mu, gg.alpha, gg.beta).mean()

    expected = nll(z_v, image) + nll(z_t, text) + 0.3 * (nll(z_t, image) + nll(z_v, text))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["rec_image"].double(), nll(z_v, image), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        parts["cross"].double(), nll(z_t, image) + nll(z_v, text), rtol=1e-5, atol=1e-5
    )


def test_official_loss_is_the_released_formula():
    """Official variant: every term is T1 |mu - z| + T2 [clamp(|mu - z| (1/alpha) beta, 1e-4, 1e3)
    - log(1/alpha) + lgamma(1/beta) - log beta] (means), T1 = 1, T2 = 5e-2, lambda = 1e-4."""
    cfg = resolve_config(ProbVLMConfig(variant="official"))
    assert (cfg.l1_weight, cfg.nll_weight, cfg.lambda_cross) == (1.0, 5e-2, 1e-4)
    z_v, z_t, image, text = _batch(1)
    image.mu[0, 0] = z_v[0, 0] + 1e6  # a residual past the upper clamp

    def term(z, gg):
        z, mu, a, b = (t.double() for t in (z, gg.mu, gg.alpha, gg.beta))
        resid = ((mu - z).abs() / a * b).clamp(1e-4, 1e3)
        lik = resid - torch.log(1 / a) + torch.lgamma(1 / b) - torch.log(b)
        return (mu - z).abs().mean() + 5e-2 * lik.mean()

    expected = term(z_v, image) + term(z_t, text) + 1e-4 * (term(z_t, image) + term(z_v, text))
    loss, _ = probvlm_loss(z_v, z_t, image, text, cfg)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    clamped = official_likelihood(z_v, image)[0, 0] - official_likelihood(z_v, image)[0, 0].detach()
    assert clamped == 0  # the clamp saturates: no gradient, as in the released code


def test_adapter_heads_distribution_and_aleatoric_variance():
    torch.manual_seed(0)
    adapter = BayesCapAdapter(32, hidden=8, dropout=0.0)
    z = torch.randn(5, 32)
    mu, inv_alpha, beta = adapter(z)
    assert mu.shape == inv_alpha.shape == beta.shape == (5, 32)
    assert (inv_alpha >= 0).all() and (beta >= 0).all()
    gg = distribution((mu, inv_alpha, beta), 1e-4, 1e-4)
    torch.testing.assert_close(gg.alpha, 1 / (inv_alpha + 1e-4))
    torch.testing.assert_close(gg.beta, beta + 1e-4)
    paper = resolve_config(ProbVLMConfig())
    var = aleatoric_variance((mu, inv_alpha, beta), paper)
    a, b = gg.alpha.double(), gg.beta.double()
    by_hand = a**2 * torch.exp(torch.lgamma(3 / b) - torch.lgamma(1 / b))
    fits = by_hand < torch.finfo(torch.float32).max  # float32 overflows where the truth does
    assert fits.any() and (~fits).any()  # both happen at init: relu heads at 0 give beta ~ 1e-4
    # exp of a difference of lgammas ~ 1e2 in float32: relative rounding ~ 1e2 x 6e-8
    torch.testing.assert_close(var.double()[fits], by_hand[fits], rtol=1e-4, atol=0)
    assert torch.isinf(var[~fits]).all()
    # the released get_GGuncer: alpha = 1 / (head + 1e-5) in [1e-4, 5], beta = head + 0.1 in
    # [0.1, 5]: finite where the exact variance overflows (beta -> beta_eps)
    official = resolve_config(ProbVLMConfig(variant="official"))
    heads = (mu, torch.zeros(5, 32), torch.zeros(5, 32))
    assert torch.isinf(aleatoric_variance(heads, paper)).all()
    clamped = aleatoric_variance(heads, official)
    expected = 25 * math.gamma(30) / math.gamma(10)
    torch.testing.assert_close(
        clamped.double(), torch.full((5, 32), expected).double(), rtol=1e-4, atol=0
    )


def test_mc_dropout_passes_differ_and_modes_are_restored():
    torch.manual_seed(0)
    adapter = BayesCapAdapter(16, hidden=32, dropout=0.1).eval()
    z = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(adapter(z)[0], adapter(z)[0])  # eval: deterministic
        with mc_dropout(adapter, 0.3):
            drop = next(m for m in adapter.modules() if isinstance(m, torch.nn.Dropout))
            assert drop.training and drop.p == 0.3
            assert not torch.equal(adapter(z)[0], adapter(z)[0])
    assert not drop.training and drop.p == 0.1


def test_config_checks_and_variant_defaults():
    paper = resolve_config(ProbVLMConfig())
    assert (paper.likelihood, paper.input_norm, paper.l1_weight) == ("exact", "unit", 0.0)
    off = resolve_config(ProbVLMConfig(variant="official", l1_weight=0.5))
    assert (off.likelihood, off.input_norm, off.l1_weight) == ("official", "official", 0.5)
    with pytest.raises(ValueError, match="method.variant"):
        resolve_config(ProbVLMConfig(variant="nope"))
    with pytest.raises(ValueError, match="mc_passes"):
        resolve_config(ProbVLMConfig(mc_passes=0))
    assert resolve_config(ProbVLMConfig(mc_passes=0, compare=[])).mc_passes == 0
    with pytest.raises(ValueError, match="rank_with"):
        resolve_config(replace(ProbVLMConfig(), rank_with="both"))


def test_more_than_one_device_is_refused_with_the_way_out(xmodal_env):
    from xmodal.config import compose
    from xmodal.methods.probvlm import ProbVLM

    cfg = compose("train", ["experiment=probvlm/shapes", "trainer=ddp"])
    with pytest.raises(ValueError, match="evaluator=retrieval trainer=ddp"):
        ProbVLM.from_config(cfg)


# ---------------------------------------------------------------------- on the shapes world


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A random-init tiny CLIP saved as a checkpoint (the pretrained one comes from the demo)."""
    from xmodal import backbones

    torch.manual_seed(0)
    model, _, _ = backbones.build("tiny_clip")
    path = tmp_path_factory.mktemp("probvlm") / "tiny.pt"
    return backbones.save_checkpoint(model, path, "tiny_clip")


def test_fit_on_a_warm_cache_never_calls_the_encoder(
    xmodal_env, shapes_world, tiny_weights, tmp_path, monkeypatch
):
    """The test split shares the retrieval evaluator's cache entries; once every split is cached,
    a second training run (another config, so not skipped) encodes nothing: the encoders raise."""
    import open_clip

    from xmodal.config import compose
    from xmodal.pipeline import evaluate, train

    monkeypatch.setenv("XMODAL_OUTPUT", str(tmp_path / "out"))
    backbone = ["backbone=tiny_clip_shapes", f"backbone.pretrained={tiny_weights}"]
    retrieval = ["experiment=shapes/retrieval", *backbone, *SMALL]
    evaluate(compose("eval", retrieval), retrieval)
    cache = tmp_path / "out" / "cache"
    after_eval = set(cache.glob("*.pt"))
    assert len(after_eval) == 2  # the test split's images and captions

    base = ["experiment=probvlm/shapes", *backbone, *SMALL, "trainer.max_epochs=1"]
    base += ["method.mc_passes=2", "method.plots=false"]
    train(compose("train", base), base)
    after_fit = set(cache.glob("*.pt"))
    assert after_eval < after_fit and len(after_fit) == 6  # + train and val, test reused

    def refuse(*args, **kwargs):
        raise AssertionError("the frozen encoder was called although every split is cached")

    monkeypatch.setattr(open_clip.CLIP, "encode_image", refuse)
    monkeypatch.setattr(open_clip.CLIP, "encode_text", refuse)
    again = [*base, "trainer.max_epochs=2", "method.lr=3e-4"]
    metrics = train(compose("train", again), again)
    assert set(cache.glob("*.pt")) == after_fit
    assert "test/t2i/S" in metrics and metrics["test/num_images"] == 30


def test_initial_adapters_do_not_depend_on_the_cache_state(
    xmodal_env, shapes_world, tiny_weights, tmp_path, monkeypatch
):
    """Encoding on a cache miss draws from the global RNG (the loaders' base seeds); the adapters
    are drawn after it from the run seed, so a cold and a warm cache give the same run."""
    from xmodal.config import compose
    from xmodal.methods.probvlm import ProbVLM

    monkeypatch.setenv("XMODAL_OUTPUT", str(tmp_path / "out"))
    overrides = ["experiment=probvlm/shapes", f"backbone.pretrained={tiny_weights}", *SMALL]
    states = []
    for _ in ("cold", "warm"):
        torch.manual_seed(0)  # the pipeline's seed_everything(cfg.seed)
        module, _ = ProbVLM.from_config(compose("train", overrides))
        states.append(module.state_dict())
        states.append(torch.rand(3))  # the RNG that training's dropout continues from
    assert len(list((tmp_path / "out" / "cache").glob("*.pt"))) == 6
    cold, cold_rng, warm, warm_rng = states
    assert cold.keys() == warm.keys()
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    assert torch.equal(cold_rng, warm_rng)


@pytest.fixture(scope="module")
def shapes_run(xmodal_env, shapes_world, tiny_weights):
    """`xmodal-train experiment=probvlm/shapes` on the small world, through the CLI."""
    from xmodal.config import compose

    overrides = [
        "experiment=probvlm/shapes",
        f"backbone.pretrained={tiny_weights}",
        *SMALL,
        "trainer.max_epochs=3",
    ]
    env = {**os.environ, **xmodal_env, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "xmodal.cli.train", *overrides]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return Path(compose("train", overrides).run_dir)


def test_xmodal_train_probvlm_shapes_writes_uclip_protocol_metrics(shapes_run):
    """metrics.json under uCLIP's keys for both directions and every uncertainty; the ranking is
    the frozen model's (uCLIP's single-model R@K); plots; the trained adapters explain the frozen
    embeddings better than the untrained ones (reconstruction likelihood)."""
    from xmodal.runs import read_metrics

    metrics = read_metrics(shapes_run)
    for d in ("t2i", "i2t"):
        for prefix in ("test", "test/epistemic", "test/total"):
            for key in ("S", "R2", "-SR2", "AUROC", "AURC", "num_bins", "rejection/R@1"):
                assert f"{prefix}/{d}/{key}" in metrics, f"{prefix}/{d}/{key}"
            assert f"{prefix}/{d}/ECE" not in metrics  # a variance is no probability
        for k in (1, 5, 10):
            assert 0 <= metrics[f"test/{d}/R@{k}"] <= 100
            assert (
                metrics[f"test/{d}/rejection/R@{k}"] <= metrics[f"test/{d}/oracle_rejection/R@{k}"]
            )
        s, r2, neg = (metrics[f"test/total/{d}/{k}"] for k in ("S", "R2", "-SR2"))
        assert math.isnan(s) or (-1 <= s <= 1 and 0 <= r2 <= 1 and neg == -s * r2)
    assert metrics["test/num_images"] == 30 and metrics["test/num_texts"] > 30
    for kind in ("image", "text"):
        assert metrics[f"test/{kind}/recon_nll"] < metrics[f"test/{kind}/recon_nll_untrained"]
    assert "val/MAE" in metrics and "val/NLL" in metrics
    for name in ("calibration.png", "rejection.png"):
        assert (shapes_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((shapes_run / "curves.json").read_text())
    assert list(curves["methods"]) == ["aleatoric", "epistemic", "total"]
    assert set(curves["oracle"]) == {"t2i", "i2t"}


def test_softplus_heads_cannot_die_where_relu_heads_do():
    """A beta unit whose input is negative for every embedding: the released ReLU head outputs 0
    (beta = beta_eps, lgamma(1/beta_eps) ~ 8e4 nats under eq 3) and gets no gradient, forever;
    the softplus head (the paper variant's default) still learns."""
    torch.manual_seed(0)
    z = torch.randn(16, 8)
    for positive, moves in (("relu", False), ("softplus", True)):
        adapter = BayesCapAdapter(8, hidden=16, dropout=0.0, positive=positive)
        last = adapter.beta_head[2]
        with torch.no_grad():
            last.bias[0] = -20.0  # unit 0 is negative for every input
        gg = distribution(adapter(z), 1e-4, 1e-4)
        assert (gg.beta[:, 0] < 1e-4 + 1e-8).all()  # beta ~ beta_eps either way
        nll = generalized_gaussian_nll(z, gg.mu, gg.alpha, gg.beta)
        assert nll[:, 0].min() > 8e4
        nll.mean().backward()
        # softplus: tiny slope (sigmoid(-20) ~ 2e-9) times the huge pull of lgamma(1/beta)
        assert (last.bias.grad[0] < -1e-3) == moves and (last.bias.grad[0] == 0) != moves


def test_train_fraction_keeps_whole_images_with_all_their_captions():
    """method.train_fraction: round(f x images) images drawn by seed, in their order, each with
    every one of its captions (image-major order kept); 1 is the split itself; 0 is refused."""
    from xmodal.data.base import RetrievalSplit
    from xmodal.methods.probvlm import subset_split

    counts = [5, 6, 7, 5, 5, 6, 5, 7, 5, 6]  # captions per image, as COCO
    images = [Path(f"img{i}.jpg") for i in range(10)]
    captions = [f"img{i} caption {j}" for i, n in enumerate(counts) for j in range(n)]
    owner = [i for i, n in enumerate(counts) for _ in range(n)]
    split = RetrievalSplit("train", images, captions, owner)
    assert subset_split(split, 1.0, seed=0) is split
    sub = subset_split(split, 0.3, seed=0)
    kept = [int(p.stem[3:]) for p in sub.image_paths]
    assert len(kept) == 3 and kept == sorted(kept)
    assert sub.captions == [c for c, i in zip(captions, owner) if i in kept]
    assert all(
        c.startswith(sub.image_paths[i].stem + " ") for c, i in zip(sub.captions, sub.caption_image)
    )
    assert subset_split(split, 0.3, seed=0).image_paths == sub.image_paths  # by seed
    others = {tuple(subset_split(split, 0.3, seed=s).image_paths) for s in range(1, 6)}
    assert len(others | {tuple(sub.image_paths)}) > 1
    assert len(subset_split(split, 0.01, seed=0).image_paths) == 1  # at least one image
    with pytest.raises(ValueError, match="train_fraction"):
        subset_split(split, 0.0, seed=0)


def test_uclip_vs_learned_table_renders_the_shapes_runs(shapes_run, tiny_weights, tmp_path):
    """`xmodal-table table=uclip_vs_learned` on shapes-world runs: ProbVLM's three uncertainties
    and uCLIP's MC-dropout confidences read from their runs (prefixed keys per method, the run's
    R@1 unprefixed); the ensemble rows and every real-data row stay empty (no run); no paper
    cell is invented."""
    from xmodal.config import compose
    from xmodal.pipeline import evaluate
    from xmodal.runs import read_metrics
    from xmodal.tables import build, table_config

    extra = [f"backbone.pretrained={tiny_weights}", *SMALL, "trainer.max_epochs=3"]
    mcd = ["experiment=uclip/shapes_mcd", *extra]
    own_cache = [*mcd, f"paths.cache_dir={tmp_path / 'cache'}"]  # paths: same run directory
    evaluate(compose("eval", own_cache), own_cache)
    built, written = build("uclip_vs_learned", tmp_path, extra_overrides=extra)  # xmodal-table's
    printed = written["markdown"].read_text()
    table = table_config("uclip_vs_learned")
    rows = {r.label: r for r in built}
    found = {
        "Shapes ProbVLM aleatoric (paper variant)": (read_metrics(shapes_run), "test"),
        "Shapes ProbVLM epistemic (paper variant)": (read_metrics(shapes_run), "test/epistemic"),
        "Shapes ProbVLM total (paper variant)": (read_metrics(shapes_run), "test/total"),
    }
    uclip = read_metrics(compose("eval", mcd).run_dir)
    for method in ("top1_similarity", "top1_consistency", "top5_consistency", "adversarial"):
        prefix = "test" if method == "adversarial" else f"test/{method}"  # the run's main method
        found[f"Shapes uCLIP {method} (MCD)"] = (uclip, prefix)
    for label, (metrics, prefix) in found.items():
        row = rows[label]
        assert row.finished, label
        for col in table.columns:
            key = col.key if col.get("shared") else f"{prefix}/{col.key.split('/', 1)[1]}"
            assert row.ours[col.key] == pytest.approx(metrics[key], nan_ok=True), (label, key)
    assert rows["Shapes ProbVLM total (paper variant)"].run_dir == str(shapes_run)
    total = found["Shapes ProbVLM total (paper variant)"][0]
    assert f"{total['test/total/t2i/AURC']:.2f}" in printed
    finished = {label for label, row in rows.items() if row.finished}
    assert finished == {*found, "Shapes uCLIP adversarial_linear (MCD)"}
    for label, row in rows.items():
        if label not in finished:  # the ensemble (no members trained here) and every real row
            assert set(row.ours.values()) == {None}, label
        assert row.paper == {}  # no paper cell until someone checks it against the paper
    assert printed.count("no run") == len(rows) - len(finished)
