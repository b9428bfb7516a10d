"""The one backbone factory: `build(cfg) -> (model, preprocess, tokenizer)`, open_clip and BLIP-2.

Every model exposes `encode_image(images) -> [B, D]` and `encode_text(tokenizer(texts)) -> [B, D]`
(unnormalised), so retrieval code does not care which backbone it runs on. Backbones are named by
the files in `conf/backbone/*.yaml` (`list_backbones`, `get_config`).

    model, preprocess, tokenizer = build(get_config("tiny_clip"))
    save_checkpoint(model, "tiny.pt", cfg)          # later: pretrained: tiny.pt reloads it exactly
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import xmodal
from xmodal.backbones.config import META_KEY, BackboneConfig, as_config

__all__ = [
    "BackboneConfig",
    "build",
    "check_quick_gelu",
    "conf_dir",
    "get_config",
    "identity",
    "list_backbones",
    "save_checkpoint",
]

ConfigLike = BackboneConfig | DictConfig | Mapping[str, Any] | str


def conf_dir() -> Path:
    """The Hydra config directory: `$XMODAL_CONF_DIR`, else `<repo>/conf`."""
    env = os.environ.get("XMODAL_CONF_DIR")
    return Path(env) if env else Path(xmodal.__file__).resolve().parents[2] / "conf"


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of the backbone configs (`conf/backbone/<name>.yaml`) matching a glob pattern."""
    names = (p.stem for p in (conf_dir() / "backbone").glob("*.yaml"))
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_config(name: str) -> BackboneConfig:
    """Load and validate `conf/backbone/<name>.yaml`."""
    path = conf_dir() / "backbone" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"No backbone config {path}. Available: {', '.join(list_backbones()) or 'none'}."
        )
    return as_config(OmegaConf.load(path))


def _to_config(cfg: ConfigLike) -> BackboneConfig:
    return get_config(cfg) if isinstance(cfg, str) else as_config(cfg)


def build(cfg: ConfigLike) -> tuple[nn.Module, Callable, Callable]:
    """Build (model in eval mode, eval image transform, tokenizer) from a backbone config.

    `cfg` may be a BackboneConfig, a DictConfig/dict with its fields, or a config name.
    """
    cfg = _to_config(cfg)
    if cfg.kind == "open_clip":
        from xmodal.backbones.openclip import build_open_clip

        return build_open_clip(cfg)
    from xmodal.backbones.blip2 import build_blip2

    return build_blip2(cfg)


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

    `build` with `pretrained: <path>` (same arch) reloads it exactly, preprocessing included.
    """
    cfg = _to_config(cfg)
    meta = dataclasses.asdict(cfg)
    meta["preprocess"] = _preprocess_cfg(model)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": model.state_dict(), META_KEY: meta}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a file, memoised on (path, size, mtime) so it is computed once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | Path) -> dict[str, Any]:
    """Identity of a weights file by content (sha256 + size), so a moved copy keeps its key."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Backbone checkpoint file not found: {path}.")
    st = path.stat()
    return {"sha256": _sha256(str(path), st.st_size, st.st_mtime_ns), "size": st.st_size}


def identity(cfg: ConfigLike) -> dict[str, Any]:
    """What decides the embeddings of a backbone; the embedding cache keys on it.

    The weights are named by their tag or Hugging Face id, or for a local file by its content.
    Random-init backbones (`pretrained: null` with a tiny arch) are not reproducible: don't cache.
    """
    cfg = _to_config(cfg)
    pretrained: Any = cfg.pretrained
    if pretrained and (cfg.kind == "blip2" or Path(pretrained).expanduser().is_file()):
        pretrained = file_identity(pretrained)
    return {
        "kind": cfg.kind,
        "arch": cfg.arch,
        "pretrained": pretrained,
        "quick_gelu": cfg.quick_gelu,
        "image_size": cfg.image_size,
        "image_mean": cfg.image_mean,
        "image_std": cfg.image_std,
        "context_length": cfg.context_length,
        "precision": cfg.precision,
    }
