"""`BackboneConfig`: the schema of the `backbone` config group (conf/backbone/*.yaml), its errors.

One backbone config pins everything that decides what an embedding means: the architecture, the
weights, the activation (QuickGELU) and the preprocessing. Two runs with the same config produce
the same embeddings, which is what the embedding cache relies on.

This module is torch-free (composing a config must not import torch).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from xmodal.errors import ConfigError, XmodalError

KINDS = ("open_clip", "blip2", "blip")
PADS = ("targetpad", "squarepad")
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"  # architectures as data files
META_KEY = "xmodal_backbone"  # the backbone config (+ resolved preprocessing) inside a checkpoint


class WeightsNotFoundError(XmodalError, FileNotFoundError):
    """Backbone weights (a file, folder, pretrained tag or hub id) that are not on this machine.

    The message names what is missing, where it was looked for and the command that gets it.
    """


class WeightsMismatchError(ConfigError):
    """Weights that do not fit the configured backbone: other keys or shapes, another
    architecture, or an activation (QuickGELU) other than the one they were trained with."""


@dataclass
class BackboneConfig:
    """Which frozen (or fine-tuned) vision-language encoder to build, and how.

    One rule for every kind: `arch` names the architecture, `pretrained` the weights.

    Attributes:
        kind: "open_clip", "blip2" (BLIP-2 Q-Former) or "blip" (BLIP-1 ITC towers).
        name: short identity used in cache keys and run names, e.g. "openclip_vit_l_14_openai".
        arch: the architecture. open_clip: a model name ("ViT-L-14", "RN50", "xmodal-tiny-clip");
            blip2/blip: a file of `model_configs/` ("blip2-itm-vit-g", "blip-vit-b-16",
            "xmodal-tiny-blip2") or a folder holding a transformers `config.json`.
        pretrained: the weights, one of
            - null: the architecture with random weights, drawn from `init_seed`;
            - an open_clip pretrained tag ("openai", "laion2b_s32b_b82k");
            - a Hugging Face hub id ("Salesforce/blip2-itm-vit-g", "hf-hub:laion/CLIP-...");
            - a local file: xmodal/open_clip/state-dict `.pt`/`.pth`/`.bin`/`.safetensors`, a
              training checkpoint with a `state_dict` key (Lightning; DDP `module.` prefixes are
              stripped), OpenAI's TorchScript `.pt`, LAVIS `blip2_pretrained.pth` /
              `model_base_capfilt_large.pth`, HUG's released checkpoint;
            - a local folder written by `save_pretrained` (transformers) or open_clip's hub format.
        quick_gelu: build the towers with QuickGELU. Must match how the weights were trained.
        allow_quick_gelu_mismatch: build anyway when `quick_gelu` disagrees with the weights
            (only to reproduce uCLIP's official ensemble, which has this bug).
        image_size: input resolution; null = the architecture's own.
        image_mean: normalisation mean; null = the pretrained weights' own.
        image_std: normalisation std; null = the pretrained weights' own.
        image_pad: pad images before resizing: "targetpad" (CLIP4Cir: pad an image whose aspect
            ratio exceeds `image_pad_ratio` to that ratio), "squarepad" (pad to a square), or null.
        image_pad_ratio: the target aspect ratio of "targetpad" (CLIP4Cir: 1.25).
        context_length: text length in tokens; null = the model's own (77 for CLIP, 32 for
            the tiny models). Only BLIP/BLIP-2 may change it (their tokenizers pad/truncate to it).
        precision: "fp32", "fp16", "bf16" (open_clip also accepts "amp", "pure_fp16", ...). BLIP-2
            casts its frozen ViT only, keeping its LayerNorms in fp32 as LAVIS does.
        cache_dir: where weights are cached/downloaded; null = the library default.
        init_seed: the seed of random weights (`pretrained: null`); runs set it to their `seed`
            (train.yaml / eval.yaml), a backbone built on its own uses 0. It is part of the
            backbone's identity only for random weights.
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
    image_pad: str | None = None
    image_pad_ratio: float = 1.25
    context_length: int | None = None
    precision: str = "fp32"
    cache_dir: str | None = None
    init_seed: int | None = None


def as_config(cfg: BackboneConfig | DictConfig | Mapping[str, Any]) -> BackboneConfig:
    """Validate a DictConfig, dict or dataclass against the schema and return the dataclass."""
    if isinstance(cfg, (DictConfig, dict)) and "defaults" in cfg:  # a raw conf/backbone/*.yaml
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
        del cfg["defaults"]
    merged = OmegaConf.merge(OmegaConf.structured(BackboneConfig), cfg)
    out = OmegaConf.to_object(merged)
    assert isinstance(out, BackboneConfig)
    if out.kind not in KINDS:
        raise ConfigError(f"backbone.kind={out.kind!r} is not one of {KINDS}.")
    if out.image_pad not in (None, *PADS):
        raise ConfigError(
            f"backbone.image_pad={out.image_pad!r} is not one of {PADS} or null (no padding)."
        )
    if out.image_pad_ratio < 1:
        raise ConfigError(
            f"backbone.image_pad_ratio={out.image_pad_ratio} must be >= 1 (a max/min side ratio)."
        )
    return out


def is_offline() -> bool:
    """True when the environment forbids network access (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def check_saved_config(path: Path | str, meta: Mapping[str, Any], cfg: BackboneConfig) -> None:
    """Refuse an xmodal checkpoint saved from another architecture or activation."""
    if meta.get("kind") != cfg.kind or meta.get("arch") != cfg.arch:
        raise WeightsMismatchError(
            f"{path} was saved from backbone kind={meta.get('kind')} arch={meta.get('arch')}, but "
            f"the config asks for kind={cfg.kind} arch={cfg.arch}. Fix: set "
            f"backbone.arch={meta.get('arch')} (or use a config whose arch matches the file)."
        )
    if cfg.kind == "open_clip":
        saved = bool(meta.get("quick_gelu"))
        check_activation(str(path), saved, cfg.quick_gelu, cfg.allow_quick_gelu_mismatch)


def check_activation(weights: str, trained: bool, quick_gelu: bool, allow: bool) -> None:
    """Raise WeightsMismatchError when weights trained with (Quick)GELU would be built with the
    other one.

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
        raise WeightsMismatchError(msg)
    warnings.warn(msg + " (allowed by backbone.allow_quick_gelu_mismatch)", stacklevel=3)


def offline_error(what: str, where: str, how: str) -> WeightsNotFoundError:
    """The error for weights that are not cached while the environment is offline."""
    return WeightsNotFoundError(
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
