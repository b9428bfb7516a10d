"""Thin command-line entry points: compose with Hydra, call ``xmodal.pipeline``, return."""
