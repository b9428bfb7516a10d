"""The backbone factory: tiny models, QuickGELU pinning, checkpoints, identity, configs, BLIP-2.

Everything runs offline on random-init tiny models; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from PIL import Image

from xmodal.backbones import (
    BackboneConfig,
    build,
    check_quick_gelu,
    get_config,
    identity,
    list_backbones,
    save_checkpoint,
)
from xmodal.backbones.config import WeightsNotFoundError
from xmodal.backbones.openclip import MODEL_CONFIG_DIR
from xmodal.config import conf_dir
from xmodal.errors import ConfigError

TEXTS = ["a small red circle on the left", "two blue squares at the top", "a quokka zebra"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_clip():
    return build("tiny_clip")


@pytest.fixture(scope="module")
def tiny_blip2():
    torch.manual_seed(0)
    return build("tiny_blip2")


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_blip2"])
def test_tiny_backbones_embed(name: str, tiny_clip, tiny_blip2) -> None:
    model, preprocess, tokenizer = tiny_clip if name == "tiny_clip" else tiny_blip2
    images = torch.stack([preprocess(im) for im in _images(3)])
    assert images.shape == (3, 3, 32, 32)
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokenizer(TEXTS))
    assert img.shape == (3, 64) and txt.shape == (3, 64)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert not model.training


def test_quick_gelu_mismatch_raises_with_fix() -> None:
    with pytest.raises(ValueError) as err:
        check_quick_gelu("ViT-B-32", "openai", quick_gelu=False, allow_mismatch=False)
    msg = str(err.value)
    assert "'openai'" in msg and "backbone.quick_gelu=true" in msg
    assert "backbone.allow_quick_gelu_mismatch=true" in msg


def test_quick_gelu_mismatch_allowed_only_warns() -> None:
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):
        check_quick_gelu("ViT-B-32", "openai", quick_gelu=False, allow_mismatch=True)


def test_quick_gelu_on_gelu_weights_raises() -> None:
    with pytest.raises(ValueError, match="backbone.quick_gelu=false"):
        check_quick_gelu("ViT-L-14", "laion2b_s32b_b82k", quick_gelu=True)


@pytest.mark.parametrize(
    ("arch", "tag", "quick_gelu"),
    [
        ("ViT-L-14", "laion2b_s32b_b82k", False),
        ("ViT-L-14-quickgelu", "openai", True),
        ("ViT-L-14", "metaclip_400m", True),
        ("ViT-L-14", "dfn2b", True),
        ("ViT-L-14", "dfn2b_s39b", False),
        ("RN50", "cc12m", True),
        ("RN50", "yfcc15m", True),
        ("ViT-B-32", "not_a_known_tag", False),
    ],
)
def test_quick_gelu_matching_pairs_pass(arch: str, tag: str, quick_gelu: bool) -> None:
    check_quick_gelu(arch, tag, quick_gelu)


def test_build_checks_quick_gelu_before_any_download() -> None:
    cfg = get_config("openclip_vit_b_32_openai")
    cfg.quick_gelu = False
    with pytest.raises(ValueError, match="QuickGELU mismatch"):
        build(cfg)


def test_offline_uncached_tag_fails_naming_tag_and_cache(tmp_path) -> None:
    cfg = get_config("openclip_vit_b_32_openai")
    cfg.cache_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        build(cfg)
    assert "'openai'" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_blip2"])
def test_checkpoint_round_trip_is_exact(name: str, tmp_path, tiny_clip, tiny_blip2) -> None:
    model, preprocess, tokenizer = tiny_clip if name == "tiny_clip" else tiny_blip2
    path = save_checkpoint(model, tmp_path / "sub" / "backbone.pt", get_config(name))
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    cfg = get_config(name)
    cfg.pretrained = str(path)
    model2, preprocess2, tokenizer2 = build(cfg)
    images = torch.stack([preprocess(im) for im in _images(4)])
    assert torch.equal(images, torch.stack([preprocess2(im) for im in _images(4)]))
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model2.encode_image(images))
        text, text2 = model.encode_text(tokenizer(TEXTS)), model2.encode_text(tokenizer2(TEXTS))
    assert torch.equal(text, text2)


def test_checkpoint_of_another_arch_is_refused(tmp_path, tiny_clip) -> None:
    path = save_checkpoint(tiny_clip[0], tmp_path / "clip.pt", get_config("tiny_clip"))
    cfg = get_config("tiny_blip2")
    cfg.pretrained = str(path)
    with pytest.raises(ValueError, match="arch=xmodal-tiny-clip"):
        build(cfg)


def _fake_hub_repo(cache: Path, repo: str, files: dict[str, object]) -> Path:
    """A pre-filled Hugging Face cache entry (refs/main -> one snapshot) holding `files`."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        if isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
            torch.save(content, snapshot / name)
        else:
            (snapshot / name).write_text(json.dumps(content))
    return snapshot


def test_hf_hub_model_from_cache_pins_quick_gelu(tmp_path, tiny_clip) -> None:
    """Hub weights (`pretrained: hf-hub:org/repo`) load from a pre-filled cache with their
    preprocessing; the activation recorded in open_clip_config.json is enforced."""
    model_cfg = OmegaConf.to_container(OmegaConf.load(MODEL_CONFIG_DIR / "xmodal-tiny-clip.json"))
    preprocess_cfg = {"mean": [0.5] * 3, "std": [0.5] * 3}
    state = tiny_clip[0].state_dict()
    for repo, quick_gelu in (("xmodal/tiny", True), ("xmodal/tiny_gelu", False)):
        config = {"model_cfg": {**model_cfg, "quick_gelu": quick_gelu}}
        config["preprocess_cfg"] = preprocess_cfg
        files = {"open_clip_config.json": config, "open_clip_pytorch_model.bin": state}
        _fake_hub_repo(tmp_path, repo, files)
    cfg = {
        "name": "hub",
        "arch": "xmodal-tiny-clip",
        "quick_gelu": True,
        "cache_dir": str(tmp_path),
    }
    with pytest.raises(ConfigError, match="backbone.pretrained=hf-hub:xmodal/tiny"):
        build({**cfg, "arch": "hf-hub:xmodal/tiny"})
    with pytest.raises(ValueError, match="QuickGELU mismatch.*trained with GELU"):
        build({**cfg, "pretrained": "hf-hub:xmodal/tiny_gelu"})
    for pretrained in ("hf-hub:xmodal/tiny", "xmodal/tiny"):
        model, preprocess, _ = build({**cfg, "pretrained": pretrained})
        images = torch.stack([preprocess(im) for im in _images(2)])
        assert preprocess.transforms[-1].mean == [0.5] * 3
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), tiny_clip[0].encode_image(images))
    ident = identity({**cfg, "pretrained": "xmodal/tiny"})["pretrained"]
    assert ident == {"hub": "xmodal/tiny", "revision": "0" * 40}


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_blip2"])
def test_missing_checkpoint_file_names_the_file(name: str, tmp_path) -> None:
    cfg = get_config(name)
    cfg.pretrained = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build(cfg)


def test_identity_follows_file_content(tmp_path, tiny_clip) -> None:
    model = tiny_clip[0]
    cfg = get_config("tiny_clip")
    cfg.pretrained = str(save_checkpoint(model, tmp_path / "a.pt", cfg))
    first = identity(cfg)
    assert first == identity(cfg) and first["pretrained"]["size"] > 0
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    try:
        save_checkpoint(model, tmp_path / "a.pt", get_config("tiny_clip"))
    finally:
        with torch.no_grad():
            model.logit_scale.sub_(1.0)
    assert identity(cfg)["pretrained"] != first["pretrained"]
    tag = identity("openclip_vit_l_14_openai")
    assert tag["pretrained"] == "openai" and tag["quick_gelu"] is True


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_yaml_matches_the_schema(name: str) -> None:
    yaml = OmegaConf.load(conf_dir() / "backbone" / f"{name}.yaml")
    assert list(yaml.pop("defaults")) == ["_schema", "_self_"]  # Hydra checks it at compose time
    cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig), yaml)
    assert cfg.name == name and cfg.kind in ("open_clip", "blip2", "blip")
    assert set(yaml.keys()) <= set(cfg.keys())


@pytest.mark.parametrize("name", [n for n in list_backbones() if not n.startswith("tiny_")])
def test_real_backbone_configs_are_consistent(name: str, tmp_path) -> None:
    """Each real config passes the QuickGELU/arch checks and then stops at the empty cache (or the
    missing local file, with the command that downloads it)."""
    cfg = get_config(name)
    cfg.cache_dir = str(tmp_path)
    with pytest.raises(WeightsNotFoundError, match="offline|curl -L"):
        build(cfg)


def test_schema_rejects_typos_and_wrong_types() -> None:
    schema = OmegaConf.structured(BackboneConfig)
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"quick_gleu": True})
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"image_size": "big"})


def test_list_backbones(tmp_path, monkeypatch) -> None:
    assert list_backbones("*tiny*") == [
        "tiny_blip",
        "tiny_blip2",
        "tiny_clip",
        "tiny_clip_shapes",
        "tiny_clip_shapes_index",
    ]
    assert "openclip_vit_l_14_openai" in list_backbones("openclip_*")
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "mine.yaml").write_text("name: mine\narch: RN50\n")
    (tmp_path / "train.yaml").write_text("task: train\n")  # a config folder has its primaries
    monkeypatch.setenv("XMODAL_CONF_DIR", str(tmp_path))
    assert list_backbones() == ["mine"]


# --- BLIP-2 Q-Former passes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip2_inputs(tiny_blip2):
    model, preprocess, tokenizer = tiny_blip2
    pixels = torch.stack([preprocess(im) for im in _images(2, seed=1)])
    with torch.no_grad():
        image_embeds = model.image_embeds(pixels)
    return pixels, image_embeds, tokenizer(["a red circle", "a red circle"])


def test_blip2_joint_pass_depends_on_text_and_image(tiny_blip2, blip2_inputs) -> None:
    model, _, tokenizer = tiny_blip2
    _, image_embeds, tokens = blip2_inputs
    other = tokenizer(["a red circle", "two green stars at the bottom"])
    with torch.no_grad():
        joint = model.query_text_image(tokens["input_ids"], tokens["attention_mask"], image_embeds)
        new_text = model.query_text_image(other["input_ids"], other["attention_mask"], image_embeds)
        new_image = model.query_text_image(
            tokens["input_ids"], tokens["attention_mask"], image_embeds.flip(0)
        )
        no_image = model.query_text_image(tokens["input_ids"], tokens["attention_mask"], None)
    k, h = model.num_query_tokens, model.hidden_size
    assert joint.shape == (2, k, h) and no_image.shape == (2, k, h)
    assert torch.allclose(joint[0], new_text[0]) and not torch.allclose(joint[1], new_text[1])
    assert not torch.allclose(joint[0], joint[1])  # same text, different images
    assert torch.allclose(joint[0], new_image[1])
    assert torch.allclose(no_image[0], no_image[1])  # same text, no image: identical
    assert all(layer.has_cross_attention for layer in model.qformer.encoder.layer)


def test_blip2_image_only_and_text_only_passes(tiny_blip2, blip2_inputs) -> None:
    model, _, _ = tiny_blip2
    _, image_embeds, tokens = blip2_inputs
    with torch.no_grad():
        image_only = model.query_image(image_embeds)
        joint = model.query_text_image(tokens["input_ids"], tokens["attention_mask"], image_embeds)
        text_only = model.text(tokens["input_ids"], tokens["attention_mask"])
    assert image_only.shape == joint.shape and not torch.allclose(image_only, joint)
    assert torch.allclose(model.query_image(image_embeds[1:]), image_only[1:], atol=1e-6)
    assert text_only.shape == (2, tokens["input_ids"].shape[1], model.hidden_size)


def test_blip2_matches_transformers_itc_and_itm(tiny_blip2, blip2_inputs) -> None:
    from transformers import Blip2ForImageTextRetrieval

    model, _, _ = tiny_blip2
    pixels, image_embeds, tokens = blip2_inputs
    hf = Blip2ForImageTextRetrieval(model.config).eval()
    hf.load_state_dict(model.state_dict())
    with torch.no_grad():
        itc = hf(pixel_values=pixels, **tokens).logits_per_image
        itm = hf(pixel_values=pixels, **tokens, use_image_text_matching_head=True).logits_per_image
        text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        ours_itc = (model.encode_image_queries(pixels) @ text.T).max(dim=1).values
        joint = model.query_text_image(tokens["input_ids"], tokens["attention_mask"], image_embeds)
        ours_itm = model.itm_head(joint).mean(dim=1)
    assert torch.allclose(itc, ours_itc, atol=1e-5)
    assert torch.allclose(itm, ours_itm, atol=1e-5)


def test_blip2_vision_is_frozen_qformer_trainable(tiny_blip2) -> None:
    model = tiny_blip2[0]
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.qformer.parameters())
    assert model.query_tokens.requires_grad and model.query_tokens.shape[0] == 1
    model.train()
    try:
        assert model.qformer.training and not model.vision_model.training
    finally:
        model.eval()


def test_blip2_tokenizer_handles_unknown_words(tiny_blip2) -> None:
    tokenizer = tiny_blip2[2]
    out = tokenizer(["Quokka ZEBRA 42!", "red"])
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 32)
    assert tokenizer.tokenizer.unk_token_id not in out["input_ids"][0].tolist()
    assert out["attention_mask"][1].sum() == 3  # [CLS] red [SEP]
    assert tokenizer("red")["input_ids"].shape == (1, 32)
