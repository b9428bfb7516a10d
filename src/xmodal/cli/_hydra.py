"""Shared glue for the ``@hydra.main`` entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from xmodal.config import conf_dir, register_configs
from xmodal.data.base import DatasetLayoutError


def hydra_entry(config_name: str, run: Callable[[DictConfig, list[str]], Any]) -> Callable[[], Any]:
    """Make a console-script ``main()`` that composes ``conf/<config_name>.yaml`` and calls run.

    A bad dataset layout ends the run with its one-paragraph explanation (exit code 2) instead of
    a traceback.
    """
    register_configs()

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        overrides = list(HydraConfig.get().overrides.task)
        try:
            run(cfg, overrides)
        except DatasetLayoutError as err:
            print(f"\nxmodal: {err}\n", file=sys.stderr)
            sys.exit(2)

    return _main
