"""The one backbone factory: `build(cfg) -> (model, preprocess, tokenizer)` for every kind.

One rule for weights, every kind: `backbone.arch` names the architecture, `backbone.pretrained`
the weights (null = random; a tag, hub id, local file or folder; see `BackboneConfig`). `build`
resolves the weights once (`xmodal.backbones.weights`: located, read, converted, checked against
the config), then builds the architecture and loads them. Kinds: open_clip, blip2 (BLIP-2), blip
(BLIP-1).

Every model exposes `encode_image(images) -> [B, D]` and `encode_text(tokenizer(texts)) -> [B, D]`
(unnormalised), so retrieval code does not care which backbone it runs on. Backbones are named by
the files in `conf/backbone/*.yaml` (`list_backbones`, `get_config`).

    model, preprocess, tokenizer = build(get_config("tiny_clip"))
    save_checkpoint(model, "tiny.pt", cfg)          # later: pretrained: tiny.pt reloads it exactly
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from xmodal.backbones.config import META_KEY, BackboneConfig, as_config
from xmodal.config import conf_dir

if TYPE_CHECKING:  # torch is imported when a backbone is built: composing a config stays cheap
    from torch import nn

    from xmodal.backbones.weights import Weights

log = logging.getLogger("xmodal")

__all__ = [
    "BackboneConfig",
    "build",
    "check_quick_gelu",
    "get_config",
    "identity",
    "list_backbones",
    "resolve",
    "save_checkpoint",
]

ConfigLike = BackboneConfig | DictConfig | Mapping[str, Any] | str


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of the backbone configs (`conf/backbone/<name>.yaml`) matching a glob pattern."""
    names = (p.stem for p in (conf_dir() / "backbone").glob("*.yaml"))
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_config(name: str) -> BackboneConfig:
    """Load and validate `conf/backbone/<name>.yaml` (`${paths.*}` resolved with the default
    paths, i.e. `$XMODAL_OUTPUT` / `$XMODAL_DATA`)."""
    path = conf_dir() / "backbone" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"No backbone config {path}. Available: {', '.join(list_backbones()) or 'none'}."
        )
    yaml = OmegaConf.load(path)
    if "defaults" in yaml:
        del yaml["defaults"]
    paths = OmegaConf.load(conf_dir() / "paths" / "default.yaml")  # for ${paths.*} in pretrained
    if "defaults" in paths:
        del paths["defaults"]
    with_paths = OmegaConf.merge({"paths": paths}, {"backbone": yaml})
    return as_config(OmegaConf.to_container(with_paths, resolve=True)["backbone"])


def _to_config(cfg: ConfigLike) -> BackboneConfig:
    return get_config(cfg) if isinstance(cfg, str) else as_config(cfg)


def resolve(cfg: ConfigLike) -> tuple[BackboneConfig, Any, Weights]:
    """Settle a backbone's weights without building it: (config, architecture spec, weights).

    Everything that needs no model is checked here (architecture, activation, preprocessing,
    offline cache); a hub id is downloaded into the cache when online.
    """
    cfg = _to_config(cfg)
    if cfg.kind == "open_clip":
        from xmodal.backbones import openclip

        return cfg, None, openclip.resolve(cfg)
    from xmodal.backbones import blip, blip2

    spec, weights = (blip2 if cfg.kind == "blip2" else blip).resolve(cfg)
    return cfg, spec, weights


def build(cfg: ConfigLike) -> tuple[nn.Module, Callable, Callable]:
    """Build (model in eval mode, eval image transform, tokenizer) from a backbone config.

    `cfg` may be a BackboneConfig, a DictConfig/dict with its fields, or a config name. With
    `pretrained: null` the weights are random, drawn from `cfg.init_seed` alone (0 when unset),
    whatever state torch's global RNG is in: the embedding cache keys them on that seed.
    """
    import torch

    cfg, spec, weights = resolve(cfg)
    log.info("backbone %s: %s arch %s, weights: %s", cfg.name, cfg.kind, cfg.arch, weights.label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_init_seed(cfg))
        if cfg.kind == "open_clip":
            from xmodal.backbones import openclip

            return openclip.build(cfg, weights)
        from xmodal.backbones import blip, blip2

        return (blip2 if cfg.kind == "blip2" else blip).build(cfg, spec, weights)


def _init_seed(cfg: BackboneConfig) -> int:
    return int(cfg.init_seed or 0)


def check_quick_gelu(arch: str, tag: str, quick_gelu: bool, allow_mismatch: bool = False) -> None:
    """Raise ValueError if `quick_gelu` disagrees with how open_clip weights `tag` were trained."""
    from xmodal.backbones import openclip

    openclip.check_quick_gelu(arch, tag, quick_gelu, allow_mismatch)


def _preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    found = getattr(model, "preprocess_cfg", None) or getattr(
        getattr(model, "visual", None), "preprocess_cfg", {}
    )
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(found).items()}


def save_checkpoint(model: nn.Module, path: str | Path, cfg: ConfigLike) -> Path:
    """Write the model's state dict + its backbone config, atomically (temp file, os.replace).

    `build` with `pretrained: <path>` (same arch) reloads it exactly, preprocessing included. A
    `.safetensors` path writes safetensors (the config in its metadata), anything else torch.save.
    """
    cfg = _to_config(cfg)
    meta = dataclasses.asdict(cfg)
    meta["preprocess"] = _preprocess_cfg(model)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = model.state_dict()
    try:
        if path.suffix == ".safetensors":
            import json

            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        else:
            import torch

            torch.save({"state_dict": state, META_KEY: meta}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_identity(path: str | Path) -> dict[str, Any]:
    """Identity of weights by content (sha256 + size of a file, or of a folder's files)."""
    from xmodal.backbones.weights import content_identity

    return content_identity(path)


def identity(cfg: ConfigLike) -> dict[str, Any]:
    """What decides the embeddings of a backbone; the embedding cache keys on it.

    The weights are named by content whenever they are local: a file or folder by the sha256 of
    its bytes (a moved copy keeps its key, any changed byte changes it), a hub id by the commit of
    its cached snapshot. A pretrained tag is named by the tag. Random weights
    (`pretrained: null`) by the seed they are drawn from: `{"random_init": True, "seed": s}`.
    Never touches the network.
    """
    cfg = _to_config(cfg)
    pretrained: Any = cfg.pretrained
    if not pretrained:
        pretrained = {"random_init": True, "seed": _init_seed(cfg)}
    elif Path(pretrained).expanduser().exists():
        from xmodal.backbones.weights import content_identity

        pretrained = content_identity(pretrained)
    elif cfg.kind != "open_clip" or not _is_tag(cfg):
        pretrained = _hub_identity(cfg) or pretrained
    return {
        "kind": cfg.kind,
        "arch": cfg.arch,
        "pretrained": pretrained,
        "quick_gelu": cfg.quick_gelu,
        "image_size": cfg.image_size,
        "image_mean": cfg.image_mean,
        "image_std": cfg.image_std,
        "image_pad": cfg.image_pad and [cfg.image_pad, cfg.image_pad_ratio],
        "context_length": cfg.context_length,
        "precision": cfg.precision,
    }


def _is_tag(cfg: BackboneConfig) -> bool:
    from open_clip.pretrained import get_pretrained_cfg

    return bool(get_pretrained_cfg(cfg.arch, cfg.pretrained or ""))


def _hub_identity(cfg: BackboneConfig) -> dict[str, Any] | None:
    """{"hub": repo, "revision": commit of the cached snapshot} (revision None if not cached)."""
    from huggingface_hub import try_to_load_from_cache

    from xmodal.backbones.weights import hub_repo

    repo = hub_repo(cfg.pretrained or "")
    if repo is None:
        return None
    revision = None
    for name in ("config.json", "open_clip_config.json"):
        found = try_to_load_from_cache(repo, name, cache_dir=cfg.cache_dir)
        if isinstance(found, str):
            revision = Path(found).parent.name
            break
    return {"hub": repo, "revision": revision}
