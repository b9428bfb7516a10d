"""open_clip backbones: architecture + weights + QuickGELU + preprocessing, pinned together.

Weights come from an open_clip pretrained tag, a local checkpoint file, or an `hf-hub:` id. Two
silent failure modes of plain open_clip become errors here: a QuickGELU mismatch between the
config and the weights (open_clip only warns), and a download attempt when offline.
"""

from __future__ import annotations

import json
import os
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

from xmodal.backbones.config import (
    MODEL_CONFIG_DIR,
    BackboneConfig,
    check_activation,
    check_saved_config,
    hub_cache,
    hub_download_command,
    is_offline,
    offline_error,
    read_checkpoint,
)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # what a tag pins
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
    """Raise ValueError if `quick_gelu` disagrees with how open_clip weights `arch`/`tag` were
    trained (unknown tags pass); `allow_mismatch` turns the error into a warning."""
    trained = trained_with_quick_gelu(arch, tag)
    if trained is not None:
        check_activation(f"'{tag}' of {arch}", trained, quick_gelu, allow_mismatch)


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


def _tag_checkpoint(arch: str, tag: str, pcfg: dict[str, Any], cache_dir: str | None) -> str:
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


def _hf_hub_config(repo: str, cache_dir: str | None) -> dict[str, Any]:
    """Read `open_clip_config.json` of an `hf-hub:` model, from the cache when offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    path = try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=cache_dir)
    weights = [try_to_load_from_cache(repo, n, cache_dir=cache_dir) for n in HF_WEIGHT_FILES]
    if is_offline() and not (isinstance(path, str) and any(isinstance(w, str) for w in weights)):
        how = hub_download_command(repo, cache_dir)
        raise offline_error(f"open_clip model hf-hub:{repo}", hub_cache(cache_dir), how)
    if not isinstance(path, str):
        path = hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_path_like(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(CHECKPOINT_SUFFIXES)


def _hf_hub_weights(cfg: BackboneConfig) -> None:
    """Check an `hf-hub:` model: no separate `pretrained`, cached when offline, same activation."""
    if cfg.pretrained:
        raise ValueError(
            f"backbone.arch={cfg.arch} carries its own weights, so backbone.pretrained must be "
            f"null (found {cfg.pretrained!r})."
        )
    hub_cfg = _hf_hub_config(cfg.arch.removeprefix("hf-hub:"), cfg.cache_dir)
    trained = bool(hub_cfg.get("model_cfg", hub_cfg).get("quick_gelu", False))
    check_activation(cfg.arch, trained, cfg.quick_gelu, cfg.allow_quick_gelu_mismatch)


def _resolve_weights(cfg: BackboneConfig) -> tuple[str | None, dict[str, Any]]:
    """Check the config against the weights; return (local checkpoint or None, preprocessing)."""
    arch, tag = cfg.arch, cfg.pretrained
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(
            f"Unknown open_clip architecture backbone.arch={arch!r}. "
            f"Known: {', '.join(open_clip.list_models())}."
        )
    if model_cfg.get("quick_gelu") and not cfg.quick_gelu:
        raise ValueError(
            f"backbone.arch={arch} is a QuickGELU architecture but backbone.quick_gelu=false. "
            f"Fix: set backbone.quick_gelu=true (or use arch {_base_arch(arch)})."
        )
    own_length = model_cfg["text_cfg"].get("context_length", 77)
    if cfg.context_length not in (None, own_length):
        raise ValueError(
            f"backbone.context_length={cfg.context_length} but {arch} was built for "
            f"{own_length} tokens; open_clip text towers cannot change it. Set it to null."
        )
    if not tag:
        return None, {}
    pcfg = get_pretrained_cfg(arch, tag)
    if pcfg:  # a pretrained tag: its weights, its preprocessing
        check_quick_gelu(arch, tag, cfg.quick_gelu, cfg.allow_quick_gelu_mismatch)
        checkpoint = _tag_checkpoint(arch, tag, pcfg, cfg.cache_dir)
        return checkpoint, {k: pcfg[k] for k in PREPROCESS_KEYS if k in pcfg}
    path = Path(tag).expanduser()
    if not (path.is_file() or _is_path_like(tag)):
        known = list_pretrained_tags_by_model(arch)
        raise ValueError(
            f"backbone.pretrained={tag!r} is neither a pretrained tag of {arch} nor an "
            f"existing file. Tags of {arch}: {', '.join(known) or 'none'}."
        )
    _, meta = read_checkpoint(path)  # raises FileNotFoundError naming the file
    if meta is None:  # a foreign state dict: nothing to check, open_clip's default preprocessing
        return str(path), {}
    check_saved_config(path, meta, cfg)
    return str(path), dict(meta.get("preprocess") or {})


def build_open_clip(cfg: BackboneConfig) -> tuple[nn.Module, Callable, Callable]:
    """Build (model in eval mode, eval image transform, tokenizer) for an open_clip backbone."""
    register_model_configs()
    if cfg.arch.startswith("hf-hub:"):
        _hf_hub_weights(cfg)
        checkpoint, preprocess = None, {}  # open_clip reads both from the hub repo
    else:
        checkpoint, preprocess = _resolve_weights(cfg)
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        cfg.arch,
        pretrained=checkpoint,
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
    tokenizer = open_clip.get_tokenizer(cfg.arch, cache_dir=cfg.cache_dir)
    return model.eval(), preprocess_val, tokenizer
