"""Dataset loaders (one module per family), the shapes world and the datamodules."""

from xmodal.data.base import CIRSplit, ClassificationSplit, DatasetLayoutError, RetrievalSplit

__all__ = ["CIRSplit", "ClassificationSplit", "DatasetLayoutError", "RetrievalSplit"]
