"""xmodal: uncertainty for cross-modal and composed image retrieval (uCLIP, RUIR, HUG, X-MoRe)."""

__version__ = "0.1.0"


def load_run(run_dir, checkpoint: str = "best"):
    """Rebuild a trained method from its run directory (see ``xmodal.pipeline.load_run``)."""
    from xmodal.pipeline import load_run as _load_run

    return _load_run(run_dir, checkpoint)
