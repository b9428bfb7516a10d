"""Metrics as plain functions on tensors (results gathered across ranks are computed once).

One re-export per line (``name as name`` marks it public), one block per module.
"""

from xmodal.metrics.ambiguity import ambiguity_auroc as ambiguity_auroc
from xmodal.metrics.ambiguity import ambiguity_scores as ambiguity_scores
from xmodal.metrics.ambiguity import spearman as spearman
from xmodal.metrics.calibration import binned_recall as binned_recall
from xmodal.metrics.calibration import calibration_scores as calibration_scores
from xmodal.metrics.calibration import confidence_aurc as confidence_aurc
from xmodal.metrics.calibration import confidence_auroc as confidence_auroc
from xmodal.metrics.calibration import confidence_bins as confidence_bins
from xmodal.metrics.calibration import confidence_ece as confidence_ece
from xmodal.metrics.calibration import equal_count_bins as equal_count_bins
from xmodal.metrics.calibration import pearson_calibration as pearson_calibration
from xmodal.metrics.calibration import rejection_area as rejection_area
from xmodal.metrics.calibration import rejection_curve as rejection_curve
from xmodal.metrics.calibration import uncertainty_calibration as uncertainty_calibration
from xmodal.metrics.classification import entropy as entropy
from xmodal.metrics.classification import entropy_confidence as entropy_confidence
from xmodal.metrics.classification import mean_per_class_recall as mean_per_class_recall
from xmodal.metrics.classification import top1_accuracy as top1_accuracy
from xmodal.metrics.classification import topk_accuracy as topk_accuracy
from xmodal.metrics.precision import map_at_r as map_at_r
from xmodal.metrics.precision import precision_at_r as precision_at_r
from xmodal.metrics.precision import r_precision as r_precision
from xmodal.metrics.precision import ranked_hits as ranked_hits
from xmodal.metrics.precision import (
    ranked_positives_from_embeddings as ranked_positives_from_embeddings,
)
from xmodal.metrics.retrieval import cirr_recall_from_embeddings as cirr_recall_from_embeddings
from xmodal.metrics.retrieval import fashioniq_average as fashioniq_average
from xmodal.metrics.retrieval import first_hit_rank as first_hit_rank
from xmodal.metrics.retrieval import image_text_recall as image_text_recall
from xmodal.metrics.retrieval import positive_ranks as positive_ranks
from xmodal.metrics.retrieval import (
    positive_ranks_from_embeddings as positive_ranks_from_embeddings,
)
from xmodal.metrics.retrieval import recall_from_embeddings as recall_from_embeddings
from xmodal.metrics.retrieval import recall_from_ranks as recall_from_ranks
