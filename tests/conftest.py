"""Shared fixtures: an isolated output/data folder per session and the small shapes world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def xmodal_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Point XMODAL_DATA / XMODAL_OUTPUT at a session tmp dir (configs read them)."""
    base = tmp_path_factory.mktemp("xmodal")
    env = {
        "XMODAL_DATA": str(base / "data"),
        "XMODAL_OUTPUT": str(base / "outputs"),
        "XMODAL_ROOT": str(REPO),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def shapes_world(xmodal_env: dict[str, str]) -> Path:
    """The small shapes world at $XMODAL_DATA/shapes (where `shapes_*` data configs look)."""
    from xmodal.data.shapes import write_world

    root = Path(xmodal_env["XMODAL_DATA"]) / "shapes"
    write_world(root, seed=0, size="small")
    return root


#: Overrides that make any shapes-world run tiny and fast on a CPU.
SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]
