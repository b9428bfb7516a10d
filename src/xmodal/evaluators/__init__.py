"""Training-free evaluators (``evaluator=<name>``): retrieval, uclip, xmore, zeroshot."""

from xmodal.evaluators.base import EvalContext

__all__ = ["EvalContext"]
