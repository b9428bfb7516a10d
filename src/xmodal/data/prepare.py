"""What the ``scripts/prepare_<dataset>.py`` scripts share: symlinks, status lines, split checks.

Every line they print starts with a status word in a 7-character margin (``ok``, ``FAIL``,
``link``, ``keep``, ``skip``, ...), so that the output of all six reads as one column.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path

from xmodal.data.base import DatasetLayoutError


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the script's docstring ``doc`` as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)


def report(status: str, text: str) -> None:
    """Print ``text`` after ``status`` in the margin: ``report("ok", "x")`` prints ``ok     x``."""
    print(f"{status:6s} {text}")


def link(src: Path, dst: Path, *, resolve: bool = False, quiet: bool = False) -> None:
    """Symlink ``dst`` -> ``src`` unless ``dst`` already exists (never overwrites).

    ``resolve`` first expands ``~`` and makes ``src`` absolute, and exits if it does not exist;
    ``quiet`` prints nothing (for linking many files one by one).
    """
    if resolve:
        src = src.expanduser().resolve()
        if not src.exists():
            raise SystemExit(f"error: {src} does not exist")
    if dst.exists() or dst.is_symlink():
        if not quiet:
            report("keep", f"{dst} (exists)")
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())
    if not quiet:
        report("link", f"{dst} -> {src}")


def validate(
    loads: Iterable[tuple[str, Callable[[], str]]], *, stop_at_first: bool = False
) -> bool:
    """Run each ``(label, load)`` and print one line for it; True if some ran and none failed.

    ``load()`` loads one split and returns its counts, printed after ``ok``. A
    :class:`DatasetLayoutError` prints ``FAIL   <label>:`` and the error, in full the first time,
    then only its first line (the layout paragraph would repeat). ``stop_at_first`` returns at the
    first failure.
    """
    ok, ran = True, False
    for label, load in loads:
        ran = True
        try:
            counts = load()
        except DatasetLayoutError as exc:
            report("FAIL", f"{label}:" + (f"\n{exc}" if ok else " " + str(exc).splitlines()[0]))
            if stop_at_first:
                return False
            ok = False
            continue
        report("ok", counts)
    return ok and ran
