"""Memory readings the benchmarks share: resident set size now, and its high-water mark.

A benchmark measures one variant per fresh subprocess: ``max_rss() - rss()`` taken around the
variant is the extra memory at its peak.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def rss() -> int:
    """Current resident set size in bytes (Linux /proc), or the high-water mark elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return max_rss()


def max_rss() -> int:
    """High-water mark of the resident set size in bytes (Linux reports KiB, macOS bytes)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
