"""One rule for weights: every format researchers hold loads through `backbone.pretrained`.

Each format is written from a seeded random-init tiny model and reloaded through the config; the
reloaded model must give exactly the original embeddings. Plus the LAVIS key converters, the
one-paragraph errors (file named, fix given) and CLIP4Cir's padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from xmodal.backbones import build, get_config, identity, lavis, save_checkpoint
from xmodal.backbones.blip import to_hf_names
from xmodal.backbones.config import WeightsMismatchError, WeightsNotFoundError
from xmodal.backbones.hf import FP32LayerNorm
from xmodal.backbones.openclip import MODEL_CONFIG_DIR, _file_quick_gelu
from xmodal.backbones.preprocess import SquarePad, TargetPad
from xmodal.errors import BrokenFileError, XmodalError

TEXTS = ["a small red circle on the left", "two blue squares at the top"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _embed(built, images=None) -> tuple[torch.Tensor, torch.Tensor]:
    model, preprocess, tokenizer = built
    pixels = torch.stack([preprocess(im) for im in (images or _images(2))])
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokenizer(TEXTS))


def _cfg(name: str, pretrained) -> object:
    cfg = get_config(name)
    cfg.pretrained = None if pretrained is None else str(pretrained)
    return cfg


def _reloads_exactly(name: str, reference, pretrained) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a plain state dict warns that it records no activation
        img, txt = _embed(build(_cfg(name, pretrained)))
    ref_img, ref_txt = _embed(reference)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(1)
    return build("tiny_clip")


@pytest.fixture(scope="module")
def tiny_blip2():
    torch.manual_seed(2)
    return build("tiny_blip2")


@pytest.fixture(scope="module")
def tiny_blip():
    torch.manual_seed(3)
    return build("tiny_blip")


# -- open_clip ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt",
    [
        "xmodal_pt",
        "xmodal_safetensors",
        "plain_pt",
        "plain_bin",
        "plain_safetensors",
        "lightning",
        "ddp",
        "open_clip_folder",
        "torchscript",
    ],
)
def test_open_clip_weight_formats_reload_exactly(fmt: str, tiny_clip, tmp_path) -> None:
    model = tiny_clip[0]
    state = model.state_dict()
    if fmt == "xmodal_pt":
        path = save_checkpoint(model, tmp_path / "w.pt", get_config("tiny_clip"))
    elif fmt == "xmodal_safetensors":
        path = save_checkpoint(model, tmp_path / "w.safetensors", get_config("tiny_clip"))
    elif fmt in ("plain_pt", "plain_bin"):
        path = tmp_path / ("w.pt" if fmt == "plain_pt" else "pytorch_model.bin")
        torch.save(state, path)
    elif fmt == "plain_safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "lightning":  # a training checkpoint: backbone under a prefix, heads, objects
        path = tmp_path / "epoch=3.ckpt"
        ckpt = {f"backbone.{k}": v for k, v in state.items()} | {"head.weight": torch.ones(2)}
        extra = {"epoch": 3, "hyper_parameters": {"args": argparse.Namespace(lr=1e-3)}}
        torch.save({"state_dict": ckpt, **extra}, path)
    elif fmt == "ddp":
        path = tmp_path / "ddp.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif fmt == "torchscript":  # like OpenAI's original ViT-B-32.pt
        path = tmp_path / "ViT-tiny.pt"
        _, _, tokenizer = tiny_clip
        pixels = torch.zeros(1, 3, 32, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, (pixels, tokenizer(["a"])), strict=False).save(str(path))
    else:
        path = tmp_path / "folder"
        path.mkdir()
        model_cfg = json.loads((MODEL_CONFIG_DIR / "xmodal-tiny-clip.json").read_text())
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(path / "open_clip_model.safetensors")
        )
    _reloads_exactly("tiny_clip", tiny_clip, path)


def test_missing_and_unexpected_keys_are_named_in_one_paragraph(tiny_clip, tmp_path) -> None:
    state = dict(tiny_clip[0].state_dict())
    state.pop("text_projection")
    state["visual.extra_head.weight"] = torch.zeros(3)
    state["logit_scale"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsMismatchError) as err:
        build(_cfg("tiny_clip", tmp_path / "bad.pt"))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "bad.pt") in msg
    assert "1 missing keys (text_projection)" in msg
    assert "1 unexpected keys (visual.extra_head.weight)" in msg
    assert "logit_scale [2, 2] vs []" in msg and "Fix:" in msg


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 10, b"PK\x03\x04broken"])
def test_garbage_checkpoint_names_the_file_and_never_advises_unsafe_loading(content, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(BrokenFileError) as err:
        build(_cfg("tiny_clip", path))
    msg = str(err.value)
    assert isinstance(err.value, XmodalError) and str(path) in msg
    assert "cannot be read as a PyTorch checkpoint" in msg and "fix:" in msg
    assert "weights_only" not in msg


def test_missing_tiny_clip_shapes_says_which_experiment_writes_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XMODAL_OUTPUT", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        build("tiny_clip_shapes")
    msg = str(err.value)
    assert str(tmp_path / "checkpoints" / "tiny_clip_shapes.pt") in msg
    assert "`xmodal-train experiment=shapes/clip_pretrain`" in msg
    assert "openai" not in msg  # no advice to use a pretrained tag for the tiny architecture
    cfg = _cfg("tiny_clip", tmp_path / "checkpoints" / "tiny_clip_shapes_seed3.pt")
    with pytest.raises(WeightsNotFoundError, match="experiment=uclip/shapes_ens_member"):
        build(cfg)


def test_plain_state_dict_gets_the_quick_gelu_check_from_its_config(tiny_clip, tmp_path) -> None:
    """A plain state dict beside an open_clip_config.json (a hub snapshot) is checked against it;
    one with nothing beside it builds as configured, with a warning."""
    torch.save(tiny_clip[0].state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model_cfg = json.loads((MODEL_CONFIG_DIR / "xmodal-tiny-clip.json").read_text())
    config = {"model_cfg": {**model_cfg, "quick_gelu": False}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError, match="QuickGELU mismatch.*open_clip_config.json"):
        build(_cfg("tiny_clip", tmp_path / "open_clip_pytorch_model.bin"))
    (tmp_path / "open_clip_config.json").unlink()
    with pytest.warns(UserWarning, match="plain state dict"):
        build(_cfg("tiny_clip", tmp_path / "open_clip_pytorch_model.bin"))


def test_plain_state_dict_in_a_tag_cache_is_checked_as_that_tag(tmp_path) -> None:
    snapshot = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"x")
    trained, why = _file_quick_gelu(snapshot / "open_clip_pytorch_model.bin", "ViT-B-32")
    assert trained is True and "openai" in why
    trained, _ = _file_quick_gelu(tmp_path / "elsewhere.bin", "ViT-B-32")
    assert trained is None


# -- BLIP-2 ---------------------------------------------------------------------------------------


def _hf_blip2(model) -> torch.nn.Module:
    from transformers import Blip2ForImageTextRetrieval

    hf = Blip2ForImageTextRetrieval(model.config)
    hf.load_state_dict(model.state_dict())
    return hf


@pytest.mark.parametrize("fmt", ["xmodal_pt", "save_pretrained", "lavis", "hug", "safetensors"])
def test_blip2_weight_formats_reload_exactly(fmt: str, tiny_blip2, tmp_path) -> None:
    model = tiny_blip2[0]
    state = model.state_dict()
    if fmt == "xmodal_pt":
        path = save_checkpoint(model, tmp_path / "w.pt", get_config("tiny_blip2"))
    elif fmt == "save_pretrained":
        path = tmp_path / "folder"
        _hf_blip2(model).save_pretrained(path)
    elif fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        lavis_state = lavis.to_lavis(state, "blip2")
        lavis_state |= {"temp": torch.tensor(0.07), "Qformer.cls.predictions.bias": torch.zeros(9)}
        if fmt == "lavis":  # blip2_pretrained.pth: {"model": ...}
            path = tmp_path / "blip2_pretrained.pth"
            torch.save({"model": lavis_state}, path)
        else:  # HUG's train.py: the LAVIS model under blip_backbone.blip_model., heads, args
            path = tmp_path / "hug_best.pt"
            inner = {f"blip_backbone.blip_model.{k}": v for k, v in lavis_state.items()}
            inner |= {
                "query_tokens": torch.zeros(1, 8, 64),
                "visual_uncertainty_estimator.w": torch.ones(3),
            }
            ckpt = {
                "epoch": 7,
                "model_state_dict": inner,
                "args": argparse.Namespace(num_queries=8),
            }
            torch.save(ckpt, path)
    _reloads_exactly("tiny_blip2", tiny_blip2, path)


def _randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}


def test_lavis_blip2_names_round_trip(tiny_blip2) -> None:
    """transformers -> LAVIS -> transformers is the identity (up to the EVA key bias, which LAVIS
    does not have), and the LAVIS names are those of blip2_pretrained.pth."""
    state = _randomised(tiny_blip2[0].state_dict(), 0)
    lavis_state = lavis.to_lavis(state, "blip2")
    for name in (
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.1.attn.q_bias",
        "visual_encoder.blocks.1.attn.v_bias",
        "visual_encoder.blocks.1.attn.proj.weight",
        "visual_encoder.blocks.0.norm2.bias",
        "visual_encoder.blocks.0.mlp.fc1.weight",
        "ln_vision.weight",
        "Qformer.bert.embeddings.LayerNorm.weight",
        "Qformer.bert.embeddings.word_embeddings.weight",
        "Qformer.bert.embeddings.position_embeddings.weight",
        "Qformer.bert.encoder.layer.0.attention.self.query.weight",
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
        "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight",
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
        "query_tokens",
        "vision_proj.weight",
        "text_proj.bias",
        "itm_head.weight",
    ):
        assert name in lavis_state, name
    assert len(lavis_state) == len(state) + 2  # each qkv bias became q_bias + v_bias
    back, ignored = lavis.from_lavis(lavis_state, "blip2")
    assert ignored == [] and back.keys() == state.keys()
    for key, value in state.items():
        if key.endswith("self_attn.qkv.bias"):
            q, k, v = value.chunk(3)
            assert torch.equal(back[key], torch.cat([q, torch.zeros_like(k), v]))
        else:
            assert torch.equal(back[key], value), key


def test_dropping_the_eva_key_bias_leaves_the_vit_unchanged(tiny_blip2) -> None:
    """LAVIS' EVA ViT has no key bias; a key bias shifts each softmax row by a constant, so the
    converted model computes the same features."""
    from transformers import Blip2ForImageTextRetrieval

    model = tiny_blip2[0]
    state = _randomised(model.state_dict(), 1)
    state = {k: v * 0.2 for k, v in state.items()}
    hf = Blip2ForImageTextRetrieval(model.config).eval()
    hf.load_state_dict(state)
    converted_state = lavis.from_lavis(lavis.to_lavis(state, "blip2"), "blip2")[0]
    converted = Blip2ForImageTextRetrieval(model.config).eval()
    converted.load_state_dict(converted_state)
    key = "vision_model.encoder.layers.0.self_attn.qkv.bias"
    assert not torch.equal(state[key], converted_state[key])  # the key bias was non-zero
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = hf.vision_model(pixel_values=pixels).last_hidden_state
        b = converted.vision_model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)


def test_lavis_checkpoint_of_another_model_is_refused_by_name(tiny_blip2, tmp_path) -> None:
    lavis_state = lavis.to_lavis(tiny_blip2[0].state_dict(), "blip2")
    lavis_state["opt_proj.weight"] = torch.zeros(4, 64)  # BLIP-2 OPT: not a retrieval model
    del lavis_state["itm_head.weight"]
    torch.save({"model": lavis_state}, tmp_path / "blip2_opt.pth")
    with pytest.raises(WeightsMismatchError) as err:
        build(_cfg("tiny_blip2", tmp_path / "blip2_opt.pth"))
    msg = str(err.value)
    assert "LAVIS BLIP2 checkpoint" in msg and "missing keys (itm_head.weight)" in msg
    assert "unexpected keys (opt_proj.weight)" in msg


def test_blip2_random_init_is_seeded() -> None:
    """Random weights come from ``init_seed`` alone, whatever the global RNG's state."""
    cfg = get_config("tiny_blip2")
    torch.manual_seed(1)
    a = build(dataclasses.replace(cfg, init_seed=5))[0].state_dict()
    torch.manual_seed(2)
    b = build(dataclasses.replace(cfg, init_seed=5))[0].state_dict()
    c = build(dataclasses.replace(cfg, init_seed=6))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["query_tokens"], c["query_tokens"])
    assert identity(dataclasses.replace(cfg, init_seed=5)) != identity(cfg)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_blip2_vit_low_precision_keeps_layernorm_fp32(precision: str, tiny_blip2, tmp_path) -> None:
    path = save_checkpoint(tiny_blip2[0], tmp_path / "w.pt", get_config("tiny_blip2"))
    cfg = _cfg("tiny_blip2", path)
    cfg.precision = precision
    model, preprocess, _ = build(cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, FP32LayerNorm) for m in norms)
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == dtype
    assert model.qformer.layernorm.weight.dtype == torch.float32  # the Q-Former stays fp32
    pixels = torch.stack([preprocess(im) for im in _images(2)])
    with torch.no_grad():
        low = model.image_embeds(pixels)
        ref = tiny_blip2[0].image_embeds(pixels)
    assert low.dtype == dtype and torch.allclose(low.float(), ref, atol=0.1, rtol=0.05)


# -- BLIP-1 ---------------------------------------------------------------------------------------


def _hf_blip(model) -> torch.nn.Module:
    from transformers import BlipForImageTextRetrieval

    hf = BlipForImageTextRetrieval(model.config)
    missing, unexpected = hf.load_state_dict(to_hf_names(model.state_dict()), strict=False)
    assert unexpected == [] and all(k.startswith("itm_head.") for k in missing)
    return hf.eval()


def test_blip_itc_matches_transformers(tiny_blip) -> None:
    model, preprocess, tokenizer = tiny_blip
    hf = _hf_blip(model)
    pixels = torch.stack([preprocess(im) for im in _images(3)])
    tokens = tokenizer(TEXTS)
    with torch.no_grad():
        theirs = hf(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixels,
            use_itm_head=False,
        ).itm_score
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    assert img.shape == (3, 64) and torch.allclose(img @ txt.T, theirs.reshape(3, -1), atol=1e-5)


@pytest.mark.parametrize("fmt", ["xmodal_pt", "save_pretrained", "lavis"])
def test_blip_weight_formats_reload_exactly(fmt: str, tiny_blip, tmp_path) -> None:
    model = tiny_blip[0]
    if fmt == "xmodal_pt":
        path = save_checkpoint(model, tmp_path / "w.pt", get_config("tiny_blip"))
    elif fmt == "save_pretrained":
        path = tmp_path / "folder"
        _hf_blip(model).save_pretrained(path)
    else:  # model_base_capfilt_large.pth: {"model": ...} with momentum encoders and queues
        state = lavis.to_lavis(to_hf_names(model.state_dict()), "blip")
        state |= {
            "temp": torch.tensor(0.07),
            "visual_encoder_m.cls_token": torch.zeros(1, 1, 64),
            "text_queue": torch.zeros(64, 8),
            "text_decoder.cls.predictions.bias": torch.zeros(9),
            "itm_head.weight": torch.zeros(2, 64),
        }
        path = tmp_path / "model_base_capfilt_large.pth"
        torch.save({"model": state}, path)
    _reloads_exactly("tiny_blip", tiny_blip, path)


def test_blip_towers_split_like_open_clip(tiny_blip) -> None:
    """RUIR trains towers by parameter prefix: the image tower is `visual.`, as in open_clip."""
    names = [n for n, _ in tiny_blip[0].named_parameters()]
    assert any(n.startswith("visual.vision_model.") for n in names)
    assert any(n.startswith("visual.vision_proj.") for n in names)
    assert all(n.startswith(("visual.", "text_encoder.", "text_proj.")) for n in names)
    frozen = {n for n, p in tiny_blip[0].named_parameters() if not p.requires_grad}
    assert frozen and all(".crossattention." in n for n in frozen)  # unused by ITC features


# -- padding and identity -------------------------------------------------------------------------


def test_targetpad_and_squarepad_match_clip4cir_by_hand() -> None:
    tall = Image.new("RGB", (100, 200), (255, 255, 255))
    padded = TargetPad(1.25)(tall)  # short side to 200 / 1.25 = 160: 30 black columns each side
    assert padded.size == (160, 200)
    arr = np.asarray(padded)
    assert (arr[:, :30] == 0).all() and (arr[:, 130:] == 0).all() and (arr[:, 30:130] == 255).all()
    near_square = Image.new("RGB", (110, 100), (255, 255, 255))
    assert TargetPad(1.25)(near_square).size == (110, 100)  # ratio 1.1 < 1.25: unchanged
    wide = Image.new("L", (200, 100), 255)
    square = SquarePad()(wide)
    assert square.size == (200, 200) and square.mode == "RGB"
    assert (np.asarray(square)[:50] == 0).all() and (np.asarray(square)[50:150] == 255).all()


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_blip2", "tiny_blip"])
def test_image_pad_is_in_the_transform_and_the_identity(name: str) -> None:
    cfg = get_config(name)
    plain = build(cfg)[1]
    cfg.image_pad = "targetpad"
    padded = build(cfg)[1]
    assert "TargetPad(ratio=1.25)" in repr(padded) and "Pad" not in repr(plain)
    assert identity(cfg) != identity(get_config(name))
    tall = Image.new("RGB", (20, 60), (255, 0, 0))
    assert not torch.equal(plain(tall), padded(tall))


def test_identity_of_random_folder_and_file_weights(tiny_blip2, tmp_path) -> None:
    assert identity("tiny_blip2")["pretrained"] == {"random_init": True, "seed": 0}
    folder = tmp_path / "folder"
    _hf_blip2(tiny_blip2[0]).save_pretrained(folder)
    first = identity(_cfg("tiny_blip2", folder))["pretrained"]
    assert first["size"] > 0 and first == identity(_cfg("tiny_blip2", folder))["pretrained"]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "note": 1}))
    assert identity(_cfg("tiny_blip2", folder))["pretrained"] != first


# -- full size ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_vit_b_32_in_every_format() -> None:
    """The real ViT-B/32 (151 M parameters, 224 px, 77 tokens), random weights, written in every
    format it accepts (the tag's cache included) and reloaded exactly; encoding and uCLIP's MC
    dropout at the real input size (what `make rehearse` does for every backbone)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import rehearse

    result = rehearse.rehearse_one("openclip_vit_b_32_openai", ["retrieval", "uclip"], batch=2)
    assert result["params_M"] == pytest.approx(151.3, abs=0.1)
    assert result["input"] == "224px x2, 77 tokens" and result["embed"] == "(512,) float32"
    assert len(result["formats"]) == 6 and "tag 'openai' (cache)" in result["formats"]
    assert any("MC-dropout passes differ" in w for w in result["workloads"])
