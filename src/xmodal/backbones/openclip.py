"""open_clip backbones: architecture + weights + QuickGELU + preprocessing, pinned together.

`resolve` settles the weights once (where they are, the preprocessing and activation they were
trained with, the checks), then `build` creates the architecture and loads them. Two silent
failure modes of plain open_clip become errors here: a QuickGELU mismatch between the config and
the weights (open_clip only warns), and a download attempt when offline.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
from open_clip.pretrained import (
    download_pretrained,
    get_pretrained_cfg,
    list_pretrained_tags_by_model,
)
from torch import nn

from xmodal.backbones import preprocess as pre
from xmodal.backbones.config import (
    MODEL_CONFIG_DIR,
    BackboneConfig,
    WeightsMismatchError,
    check_activation,
    check_saved_config,
    hub_cache,
    hub_download_command,
    is_offline,
    offline_error,
)
from xmodal.backbones.weights import (
    Weights,
    construction,
    file_sha256,
    load_checked,
    locate,
    read_file,
    read_folder,
)
from xmodal.errors import ConfigError

PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # what a tag pins
HUB_PATTERNS = ("open_clip_config.json", "open_clip_model.safetensors")
HUB_FALLBACK = ("open_clip_config.json", "open_clip_pytorch_model.bin")
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# Tags trained with QuickGELU, for open_clip versions whose registry does not record it.
# (metaclip2_worldwide, metaclip_altogether and dfn2b_s39b are GELU.)
KNOWN_QUICK_GELU_TAGS = frozenset({"openai", "metaclip_400m", "metaclip_fullcc", "metaclip_2_5b"})
KNOWN_QUICK_GELU_TAGS |= {"dfn2b", "dfn5b"}
KNOWN_QUICK_GELU_RN_TAGS = frozenset({"yfcc15m", "cc12m"})  # the OpenCLIP ResNet-50/101 runs

_registered = False


def register_model_configs() -> None:
    """Register xmodal's architecture JSON files (e.g. `xmodal-tiny-clip`) with open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def _base_arch(arch: str) -> str:
    return arch.removesuffix("-quickgelu")


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")


def trained_with_quick_gelu(arch: str, tag: str) -> bool | None:
    """Whether open_clip weights `arch`/`tag` were trained with QuickGELU (None: unknown tag)."""
    tag = _clean_tag(tag)
    pcfg = get_pretrained_cfg(_base_arch(arch), tag)
    if pcfg.get("quick_gelu") or tag in KNOWN_QUICK_GELU_TAGS:
        return True
    if tag in KNOWN_QUICK_GELU_RN_TAGS and arch.startswith("RN"):
        return True
    return False if pcfg else None


def check_quick_gelu(arch: str, tag: str, quick_gelu: bool, allow_mismatch: bool = False) -> None:
    """Raise WeightsMismatchError (a ValueError) if `quick_gelu` disagrees with how open_clip
    weights `arch`/`tag` were trained (unknown tags pass); `allow_mismatch` only warns."""
    trained = trained_with_quick_gelu(arch, tag)
    if trained is not None:
        check_activation(f"'{tag}' of {arch}", trained, quick_gelu, allow_mismatch)


# -- the architecture --------------------------------------------------------------------------


def check_config(cfg: BackboneConfig) -> dict[str, Any]:
    """The architecture's open_clip model config, after the checks that need no weights."""
    register_model_configs()
    arch = cfg.arch
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"backbone.arch={arch}: the architecture is a model name and the weights go in "
            "backbone.pretrained. Fix: set backbone.arch to the repo's architecture (e.g. "
            f"ViT-B-32) and backbone.pretrained={arch.replace('local-dir:', '')}."
        )
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ConfigError(
            f"Unknown open_clip architecture backbone.arch={arch!r}. "
            f"Known: {', '.join(open_clip.list_models())}."
        )
    if model_cfg.get("quick_gelu") and not cfg.quick_gelu:
        raise WeightsMismatchError(
            f"backbone.arch={arch} is a QuickGELU architecture but backbone.quick_gelu=false. "
            f"Fix: set backbone.quick_gelu=true (or use arch {_base_arch(arch)})."
        )
    own_length = model_cfg["text_cfg"].get("context_length", 77)
    if cfg.context_length not in (None, own_length):
        raise ConfigError(
            f"backbone.context_length={cfg.context_length} but {arch} was built for "
            f"{own_length} tokens; open_clip text towers cannot change it. Set it to null."
        )
    return model_cfg


# -- the weights -------------------------------------------------------------------------------


def _cached_tag_file(pcfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The local file of a pretrained tag if it is already cached (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    if pcfg.get("hf_hub"):
        repo, filename = os.path.split(pcfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin"
        names = [filename] if filename else list(HF_WEIGHT_FILES)
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if pcfg.get("url"):
        clip_dir = Path(cache_dir or Path.home() / ".cache" / "clip")
        path = clip_dir / os.path.basename(pcfg["url"])
        if path.is_file():
            return str(path)
    return None


def _tag_file(arch: str, tag: str, pcfg: dict[str, Any], cache_dir: str | None) -> str:
    """Resolve a pretrained tag to a local file, downloading only when online."""
    cached = _cached_tag_file(pcfg, cache_dir)
    if cached:
        return cached
    if is_offline():
        if pcfg.get("hf_hub"):
            repo = os.path.split(pcfg["hf_hub"])[0]
            where, how = hub_cache(cache_dir), hub_download_command(repo, cache_dir)
        else:
            where = cache_dir or str(Path.home() / ".cache" / "clip")
            how = f"python -c \"import open_clip; open_clip.create_model('{arch}', '{tag}'"
            how += f", cache_dir='{cache_dir}')\"" if cache_dir else ')"'
        raise offline_error(f"open_clip weights {arch} / pretrained tag '{tag}'", where, how)
    return download_pretrained(pcfg, cache_dir=cache_dir)


def _architecture_fields(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The parts of an open_clip model config that decide the weights' shapes."""
    return {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg")}


def _file_quick_gelu(path: Path, arch: str) -> tuple[bool | None, str]:
    """How a plain state-dict file was trained, from what lies around it: (QuickGELU?, why).

    Looks for an open_clip_config.json beside it (hub snapshots, open_clip folders), a Hugging
    Face cache path of a registered tag, and OpenAI's original files (their URLs carry the
    file's sha256). None when nothing tells.
    """
    sibling = path.parent / "open_clip_config.json"
    if sibling.is_file():
        model_cfg = json.loads(sibling.read_text(encoding="utf-8")).get("model_cfg", {})
        return bool(model_cfg.get("quick_gelu", False)), f"{sibling.name} beside it"
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path.as_posix())
    tags = list_pretrained_tags_by_model(_base_arch(arch))
    if match:
        repo = f"{match.group(1)}/{match.group(2)}"
        for tag in tags:
            if get_pretrained_cfg(_base_arch(arch), tag).get("hf_hub", "").startswith(repo + "/"):
                return trained_with_quick_gelu(arch, tag), f"the cache of tag '{tag}'"
    for tag in tags:
        url = get_pretrained_cfg(_base_arch(arch), tag).get("url", "")
        parts = url.rstrip("/").split("/")
        if url and parts[-1] == path.name and len(parts) > 1 and len(parts[-2]) == 64:
            if file_sha256(path) == parts[-2]:
                return trained_with_quick_gelu(arch, tag), f"its sha256 (OpenAI tag '{tag}')"
    return None, ""


def resolve(cfg: BackboneConfig) -> Weights:
    """Settle the weights of an open_clip backbone: located, read, checked against the config."""
    model_cfg = check_config(cfg)
    tag = cfg.pretrained
    pcfg = get_pretrained_cfg(cfg.arch, tag) if tag else {}
    weights = locate(cfg, is_tag=bool(pcfg), hub_patterns=HUB_PATTERNS)
    if weights.random:
        return weights
    if weights.source == "tag":
        assert tag is not None
        check_quick_gelu(cfg.arch, tag, cfg.quick_gelu, cfg.allow_quick_gelu_mismatch)
        weights.path = Path(_tag_file(cfg.arch, tag, pcfg, cfg.cache_dir))
        weights.state_dict, _, weights.fmt = read_file(weights.path)
        weights.preprocess = {k: pcfg[k] for k in PREPROCESS_KEYS if k in pcfg}
        return weights
    assert weights.path is not None
    if weights.source == "hub" and not any((weights.path / n).is_file() for n in HF_WEIGHT_FILES):
        if not is_offline():  # a repo with .bin weights only
            weights.path = locate(cfg, hub_patterns=HUB_FALLBACK).path
    if weights.path.is_dir():
        weights.state_dict, config, name = read_folder(weights.path)
        if name != "open_clip_config.json" or "model_cfg" not in config:
            raise ConfigError(
                f"{weights.label} holds a {name}, not an open_clip model (open_clip_config.json "
                "with model_cfg). Fix: point backbone.pretrained at open_clip weights, or use a "
                "backbone kind that reads this folder."
            )
        stored = config["model_cfg"]
        if _architecture_fields(stored) != _architecture_fields(model_cfg):
            raise WeightsMismatchError(
                f"{weights.label} holds another architecture than backbone.arch={cfg.arch} "
                f"(its open_clip_config.json: embed_dim={stored.get('embed_dim')}, "
                f"vision_cfg={stored.get('vision_cfg')}). Fix: set backbone.arch to the "
                "architecture of these weights."
            )
        weights.fmt = "open_clip folder"
        weights.model_config = config
        weights.preprocess = {
            k: v for k, v in config.get("preprocess_cfg", {}).items() if k in PREPROCESS_KEYS
        }
        weights.trained_quick_gelu = bool(stored.get("quick_gelu", False))
        check_activation(
            weights.label,
            weights.trained_quick_gelu,
            cfg.quick_gelu,
            cfg.allow_quick_gelu_mismatch,
        )
        return weights
    weights.state_dict, weights.meta, weights.fmt = read_file(weights.path)
    if weights.meta is not None:
        check_saved_config(weights.path, weights.meta, cfg)
        weights.preprocess = dict(weights.meta.get("preprocess") or {})
        weights.trained_quick_gelu = bool(weights.meta.get("quick_gelu"))
        return weights
    trained, why = _file_quick_gelu(weights.path, cfg.arch)
    weights.trained_quick_gelu = trained
    if trained is not None:
        label = f"{weights.label} (identified by {why})"
        check_activation(label, trained, cfg.quick_gelu, cfg.allow_quick_gelu_mismatch)
    else:
        warnings.warn(
            f"The weights {weights.label} are a plain state dict: nothing records whether they "
            f"were trained with QuickGELU, so they are built with backbone.quick_gelu="
            f"{str(cfg.quick_gelu).lower()} as configured, and with open_clip's default "
            f"preprocessing unless backbone.image_mean/std are set. A mismatch would silently "
            "degrade every embedding; xmodal.backbones.save_checkpoint records both.",
            stacklevel=2,
        )
    return weights


# -- the model ---------------------------------------------------------------------------------


def _adapt(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """open_clip's own adjustments of foreign state dicts (old text-tower names, 1-d logit
    scale, position embeddings of another size), as its checkpoint loader does them."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import (
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            if own.numel() != state[key].numel():
                continue  # a real mismatch: load_checked reports it
            state[key] = state[key].reshape(own.shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    return state


def build(cfg: BackboneConfig, weights: Weights) -> tuple[nn.Module, Callable, Callable]:
    """Build (model in eval mode, eval image transform, tokenizer) from resolved weights."""
    preprocess = weights.preprocess
    with construction(weights):
        model, _, preprocess_val = open_clip.create_model_and_transforms(
            cfg.arch,
            pretrained=None,
            precision=cfg.precision,
            force_image_size=cfg.image_size,
            image_mean=tuple(cfg.image_mean) if cfg.image_mean else preprocess.get("mean"),
            image_std=tuple(cfg.image_std) if cfg.image_std else preprocess.get("std"),
            image_interpolation=preprocess.get("interpolation"),
            image_resize_mode=preprocess.get("resize_mode"),
            pretrained_text=False,  # never fetch a text tower's base weights behind the user's back
            cache_dir=cfg.cache_dir,
            quick_gelu=cfg.quick_gelu,
        )
    if not weights.random:
        assert weights.state_dict is not None
        weights.state_dict = _adapt(model, weights.state_dict)
        load_checked(model, weights, f"open_clip arch {cfg.arch}")
    tokenizer = open_clip.get_tokenizer(cfg.arch, cache_dir=cfg.cache_dir)
    return model.eval(), pre.with_pad(preprocess_val, cfg), tokenizer
