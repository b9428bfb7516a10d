"""xmodal: uncertainty for cross-modal and composed image retrieval (uCLIP, RUIR, HUG, X-MoRe)."""

from typing import Any


def __getattr__(name: str) -> Any:
    """``__version__`` from the installed package's metadata (pyproject.toml is the one source),
    looked up on first use: importing ``importlib.metadata`` costs every command start-up."""
    if name != "__version__":
        raise AttributeError(f"module 'xmodal' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xmodal")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "0.0.0+unknown"


def load_run(run_dir, checkpoint: str = "best"):
    """Rebuild a trained method from its run directory (see ``xmodal.pipeline.load_run``)."""
    from xmodal.pipeline import load_run as _load_run

    return _load_run(run_dir, checkpoint)
