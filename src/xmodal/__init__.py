"""xmodal: uncertainty for cross-modal and composed image retrieval (uCLIP, RUIR, HUG, X-MoRe)."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: the installed package's metadata (pyproject.toml)
    __version__ = version("xmodal")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0.0.0+unknown"


def load_run(run_dir, checkpoint: str = "best"):
    """Rebuild a trained method from its run directory (see ``xmodal.pipeline.load_run``)."""
    from xmodal.pipeline import load_run as _load_run

    return _load_run(run_dir, checkpoint)
