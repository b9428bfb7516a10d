"""Trainable methods (``method=<name>``): LightningModules with ``from_config(cfg)``."""
