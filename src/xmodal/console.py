"""What a run prints: quiet libraries, xmodal's own lines, and the closing summary.

A run's console shows what it does, its progress, where its outputs are and its metrics. Library
INFO chatter (open_clip's model-loading lines, Lightning's device lines and tips, faiss' CPU
features) goes only to the run's log file unless ``verbose=true``. Standard library only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("xmodal")


class LibraryFilter(logging.Filter):
    """Console filter (``conf/hydra/default.yaml``): xmodal's records at any level, other
    libraries' only from WARNING up, unless ``verbose`` (``verbose=true``)."""

    verbose = False
    #: Library warnings about a deliberate choice (a random-init backbone), not a problem.
    NOISE = ("No pretrained weights loaded for model",)

    def filter(self, record: logging.LogRecord) -> bool:
        if LibraryFilter.verbose or record.name.split(".")[0] in ("xmodal", "__main__"):
            return True
        if record.levelno < logging.WARNING:
            return False
        return not any(str(record.msg).startswith(n) for n in self.NOISE)


#: Warnings that say nothing actionable about an xmodal run (shown with ``verbose=true``).
QUIET_WARNINGS = (
    r".*LeafSpec.*",  # Lightning's pytree helper on torch >= 2.10
    r".*does not have many workers.*",  # the shapes world loads in the main process on purpose
    r".*is smaller than the logging interval.*",
    r".*module\(s\) in eval mode at the start of training.*",  # frozen towers are in eval mode
    r".*The `srun` command is available on your system but is not used.*",
)


def set_verbosity(verbose: bool) -> None:
    """Quiet libraries on the console (see :class:`LibraryFilter`) unless ``verbose``."""
    import warnings

    LibraryFilter.verbose = verbose
    adopt_library_loggers()
    if not verbose:
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def adopt_library_loggers() -> None:
    """Route Lightning's records through the configured (root) handlers.

    Lightning gives its loggers console handlers of their own when imported (``lightning`` always,
    ``lightning.pytorch`` / ``lightning.fabric`` when the root logger had no handler yet), which
    would print beside the filtered console. When logging is configured (the CLIs), remove them.
    Call again after Lightning is imported.
    """
    if not logging.getLogger().hasHandlers():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        own = logging.getLogger(name)
        for handler in list(own.handlers):
            if type(handler) is logging.StreamHandler:
                own.removeHandler(handler)
        own.propagate = True


def headline(metrics: Mapping[str, Any], limit: int = 12) -> list[str]:
    """``key value`` lines of the test metrics worth a glance (counts left out), at most
    ``limit`` of them, then how many more metrics.json holds."""
    keys = [
        k
        for k, v in metrics.items()
        if k.startswith("test/")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and "num_" not in k
        and k.count("/") <= 2
    ]
    keys.sort()
    lines = [f"  {k:<32} {float(metrics[k]):.4g}" for k in keys[:limit]]
    if len(metrics) > len(lines):
        lines.append(f"  ... {len(metrics) - len(lines)} more in metrics.json")
    return lines
