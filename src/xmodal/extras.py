"""Optional dependencies (``pip install 'xmodal[<extra>]'``) and the one-line error when missing.

A core install composes configs, trains and evaluates with the CSV logger. The rest is optional:

    wandb   logger=wandb                                  (wandb)
    faiss   X-MoRe and the xmodal-index CLI               (faiss-cpu)
    slurm   launcher=slurm / launcher=local               (hydra-submitit-launcher)
    blip2   BLIP-2 and BLIP-1 backbones (HUG, RUIR BLIP)  (transformers)
    all     every one of them
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from xmodal.errors import ConfigError

#: module to import -> (extra, what needs it)
EXTRAS = {
    "wandb": ("wandb", "logger=wandb"),
    "faiss": ("faiss", "X-MoRe and xmodal-index (faiss indexes)"),
    "hydra_plugins.hydra_submitit_launcher": ("slurm", "launcher=slurm and launcher=local"),
    "transformers": ("blip2", "the BLIP-2 and BLIP backbones"),
}


def missing(module: str) -> ConfigError:
    extra, what = EXTRAS[module]
    return ConfigError(
        f"{what} needs the optional package {module.split('.')[-1]!r}, which is not installed. "
        f"Fix: pip install 'xmodal[{extra}]'"
    )


def need(module: str) -> ModuleType:
    """Import an optional dependency, or raise the one-line error naming the extra to install."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        raise missing(module)
    return importlib.import_module(module)


def check(module: str) -> None:
    """Like :func:`need` without importing (cheap: for checks before any work starts)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise missing(module)
