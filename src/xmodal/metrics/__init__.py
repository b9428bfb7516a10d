"""Metrics as plain functions on tensors, with torchmetrics wrappers where ranks must sync.

One re-export per line (``name as name`` marks it public), one block per module.
"""

from xmodal.metrics.retrieval import RetrievalRecallMetric as RetrievalRecallMetric
from xmodal.metrics.retrieval import cirr_recall as cirr_recall
from xmodal.metrics.retrieval import cirr_recall_from_embeddings as cirr_recall_from_embeddings
from xmodal.metrics.retrieval import fashioniq_average as fashioniq_average
from xmodal.metrics.retrieval import fashioniq_recall as fashioniq_recall
from xmodal.metrics.retrieval import image_text_recall as image_text_recall
from xmodal.metrics.retrieval import positive_ranks as positive_ranks
from xmodal.metrics.retrieval import (
    positive_ranks_from_embeddings as positive_ranks_from_embeddings,
)
from xmodal.metrics.retrieval import recall_at_k as recall_at_k
from xmodal.metrics.retrieval import recall_from_embeddings as recall_from_embeddings
from xmodal.metrics.retrieval import recall_from_ranks as recall_from_ranks
