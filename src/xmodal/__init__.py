"""xmodal: uncertainty for cross-modal and composed image retrieval (uCLIP, RUIR, HUG, X-MoRe)."""

__version__ = "0.1.0"
