"""Dataset loaders (one module per family), the shapes world and the datamodules."""

from xmodal.data.base import ClassificationSplit, CIRSplit, DatasetLayoutError, RetrievalSplit

__all__ = ["CIRSplit", "ClassificationSplit", "DatasetLayoutError", "RetrievalSplit"]
