"""The error types every layer raises for expected failures (standard library only).

An *expected* failure is one the user fixes: a missing or malformed file, a config that cannot
work, a run directory another process holds. Its message is one paragraph: what was expected,
what was found (the file named) and the fix. The CLIs print that paragraph alone and exit with
code 2; ``verbose=true`` adds the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Exit code of a CLI that stopped on an expected failure.
EXIT_EXPECTED = 2


class XmodalError(Exception):
    """An expected failure: the CLI prints its message as one paragraph and exits with code 2."""


class DatasetLayoutError(XmodalError, FileNotFoundError):
    """A dataset on disk is missing, incomplete or malformed.

    The message is one paragraph: what was expected (the layout), what was found (the missing or
    malformed file) and what to run to fix it (``scripts/prepare_<dataset>.py``).
    """


class CorruptImageError(XmodalError, OSError):
    """An image file is missing, truncated or not decodable."""


class BrokenFileError(XmodalError, OSError):
    """A file xmodal wrote or reads as an input (checkpoint, cache entry, index) is unreadable."""


class RunConflictError(XmodalError, RuntimeError):
    """A run directory cannot be used as asked: another process holds it, or it holds an
    interrupted run that needs ``resume=auto`` or ``force=true``."""


class ConfigError(XmodalError, ValueError):
    """A config value or override that cannot work (unknown key, impossible combination)."""


def check_choice(key: str, value: object, allowed: Iterable[object]) -> None:
    """Refuse a config value outside its choices: ``ConfigError`` naming the key (as the user
    writes it, e.g. ``method.ua_mode``), the value and the allowed ones."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {allowed}")


def broken_file(path: object, problem: str, fix: str) -> BrokenFileError:
    """The one-paragraph error for an unreadable file: which file, what is wrong, the fix."""
    return BrokenFileError(f"{path}: {problem}\n  fix: {fix}")


_WORKER_PREFIX = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal ")


def expected_message(err: BaseException) -> str:
    """The user-facing paragraph of an expected failure.

    PyTorch re-raises an exception from a DataLoader worker as the same type with the worker's
    whole traceback as its message; keep only the original message after the last
    ``<module>.<Class>: `` line of that traceback.
    """
    text = str(err)
    if not _WORKER_PREFIX.match(text):
        return text
    cls = type(err)
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = text.rfind(name)
        if at >= 0:
            return text[at + len(name) :].rstrip()
    return text


def find_expected(err: BaseException) -> XmodalError | None:
    """``err`` or the first exception in its cause/context chain that is an expected failure.

    Lightning and DataLoaders sometimes wrap the error a loader raised; the CLI reports the
    original paragraph either way.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, XmodalError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
