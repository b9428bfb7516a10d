"""`BackboneConfig`: the schema of the `backbone` config group (conf/backbone/*.yaml).

One backbone config pins everything that decides what an embedding means: the architecture, the
weights, the activation (QuickGELU) and the preprocessing. Two runs with the same config produce
the same embeddings, which is what the embedding cache relies on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

KINDS = ("open_clip", "blip2")
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"  # architectures as data files
META_KEY = "xmodal_backbone"  # the backbone config (+ resolved preprocessing) inside a checkpoint


@dataclass
class BackboneConfig:
    """Which frozen (or fine-tuned) vision-language encoder to build, and how.

    Attributes:
        kind: "open_clip" or "blip2".
        name: short identity used in cache keys and run names, e.g. "openclip_vit_l_14_openai".
        arch: open_clip architecture ("ViT-L-14", "RN50", "xmodal-tiny-clip", "hf-hub:org/repo"),
            or for blip2 a Hugging Face id ("Salesforce/blip2-itm-vit-g") or "xmodal-tiny-blip2".
        pretrained: open_clip tag ("openai", "laion2b_s32b_b82k"), a local checkpoint file, or
            null (open_clip: random init; blip2: the Hugging Face weights of `arch`).
        quick_gelu: build the towers with QuickGELU. Must match how the weights were trained.
        allow_quick_gelu_mismatch: build anyway when `quick_gelu` disagrees with the weights
            (only to reproduce uCLIP's official ensemble, which has this bug).
        image_size: input resolution; null = the architecture's own.
        image_mean: normalisation mean; null = the pretrained weights' own.
        image_std: normalisation std; null = the pretrained weights' own.
        context_length: text length in tokens; null = the model's own (77 for CLIP, 32 for
            the tiny models). Only BLIP-2 may change it (its tokenizer pads/truncates to it).
        precision: "fp32", "fp16", "bf16" (open_clip also accepts "amp", "pure_fp16", ...).
        cache_dir: where weights are cached/downloaded; null = the library default.
    """

    kind: str = "open_clip"
    name: str = MISSING
    arch: str = MISSING
    pretrained: str | None = None
    quick_gelu: bool = False
    allow_quick_gelu_mismatch: bool = False
    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    context_length: int | None = None
    precision: str = "fp32"
    cache_dir: str | None = None


def as_config(cfg: BackboneConfig | DictConfig | Mapping[str, Any]) -> BackboneConfig:
    """Validate a DictConfig, dict or dataclass against the schema and return the dataclass."""
    if isinstance(cfg, (DictConfig, dict)) and "defaults" in cfg:  # a raw conf/backbone/*.yaml
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
        del cfg["defaults"]
    merged = OmegaConf.merge(OmegaConf.structured(BackboneConfig), cfg)
    out = OmegaConf.to_object(merged)
    assert isinstance(out, BackboneConfig)
    if out.kind not in KINDS:
        raise ValueError(f"backbone.kind={out.kind!r} is not one of {KINDS}.")
    return out


def is_offline() -> bool:
    """True when the environment forbids network access (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a checkpoint file safely (`weights_only=True`): (state_dict, xmodal metadata or None).

    Accepts files written by `save_checkpoint` and plain state dicts (optionally under
    "state_dict", as open_clip and Lightning write them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Backbone checkpoint file not found: {path.resolve()}. Expected a file written by "
            "xmodal.backbones.save_checkpoint (or an open_clip/state-dict .pt file); fix "
            "backbone.pretrained, or set it to a pretrained tag such as 'openai'."
        )
    try:  # mmap: reading the metadata of a large file costs nothing
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}.")
    meta = obj.get(META_KEY)
    state_dict = obj.get("state_dict", obj)
    return state_dict, meta


def check_saved_config(path: Path, meta: dict[str, Any], cfg: BackboneConfig) -> None:
    """Refuse an xmodal checkpoint saved from another architecture or activation."""
    if meta.get("kind") != cfg.kind or meta.get("arch") != cfg.arch:
        raise ValueError(
            f"{path} was saved from backbone kind={meta.get('kind')} arch={meta.get('arch')}, but "
            f"the config asks for kind={cfg.kind} arch={cfg.arch}. Fix: set "
            f"backbone.arch={meta.get('arch')} (or use a config whose arch matches the file)."
        )
    saved = bool(meta.get("quick_gelu"))
    check_activation(str(path), saved, cfg.quick_gelu, cfg.allow_quick_gelu_mismatch)


def check_activation(weights: str, trained: bool, quick_gelu: bool, allow: bool) -> None:
    """Raise ValueError when weights trained with (Quick)GELU would be built with the other one.

    A mismatch loads without any error but silently degrades every embedding, so it is refused
    unless `allow` (reproducing uCLIP's official ensemble) is set, which only warns.
    """
    if trained == quick_gelu:
        return
    trained_act, built_act = ("QuickGELU", "GELU") if trained else ("GELU", "QuickGELU")
    msg = (
        f"QuickGELU mismatch: the weights {weights} were trained with {trained_act}, but "
        f"backbone.quick_gelu={str(quick_gelu).lower()} builds the model with {built_act}; they "
        "would load without error and every embedding would be silently degraded. Fix: set "
        f"backbone.quick_gelu={str(trained).lower()}. To reproduce the mismatch on purpose "
        "(uCLIP's official ensemble), set backbone.allow_quick_gelu_mismatch=true."
    )
    if not allow:
        raise ValueError(msg)
    warnings.warn(msg + " (allowed by backbone.allow_quick_gelu_mismatch)", stacklevel=3)


def offline_error(what: str, where: str, how: str) -> FileNotFoundError:
    """The error for weights that are not cached while the environment is offline."""
    return FileNotFoundError(
        f"{what} is not in the local cache ({where}) and the environment is offline "
        "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE), so nothing is downloaded. Fix: on a machine with "
        f"internet run `{how}`, then copy that cache here or point backbone.cache_dir at it."
    )


def hub_cache(cache_dir: str | None) -> str:
    """The Hugging Face cache directory actually used for `cache_dir`."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return cache_dir or HF_HUB_CACHE


def hub_download_command(repo: str, cache_dir: str | None) -> str:
    """The shell command that pre-downloads a Hugging Face repo into `cache_dir`."""
    return f"hf download {repo}" + (f" --cache-dir {cache_dir}" if cache_dir else "")
