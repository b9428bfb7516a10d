"""Training-free evaluators (``evaluator=<name>``): retrieval, uclip, xmore, zeroshot.

Their config schemas are in :mod:`xmodal.evaluators.schemas` (torch-free); this package imports
nothing heavy until an evaluator is used.
"""

from typing import Any

__all__ = ["EvalContext"]


def __getattr__(name: str) -> Any:
    if name == "EvalContext":
        from xmodal.evaluators.base import EvalContext

        return EvalContext
    raise AttributeError(name)
