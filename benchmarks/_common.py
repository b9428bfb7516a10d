"""What the benchmarks share: running one variant in a fresh interpreter, and memory readings.

A benchmark measures one variant per fresh subprocess (:func:`spawn`): ``max_rss() - rss()``
taken around the variant is the extra memory at its peak.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def spawn(script: str, *args: str) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter (xmodal's ``src`` on the path) and
    parse the JSON of its last output line."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, script, *args]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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
