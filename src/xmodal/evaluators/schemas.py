"""Schemas of the evaluator options (``conf/evaluator/*.yaml``), torch-free.

They live apart from the evaluators' code so that composing a config (``xmodal.config``) never
imports torch; each evaluator module re-exports its own schema. The YAML files document every
field; the comments here say what decides the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

#: uCLIP: scores per block of the texts x images pass (64 MB in float32).
UCLIP_BLOCK_SIZE = 1 << 24
#: Zero-shot and X-MoRe: CLIP's single ImageNet template.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: X-MoRe index building: the memory budget of an auto factory (LAION-400M at d=512 ->
#: IVF65536,PQ64, 29 GB) and the recall@K its search parameters are tuned for.
INDEX_MAX_MEMORY = "32G"
INDEX_TARGET_RECALL = 0.95


@dataclass
class RetrievalEvaluatorConfig:
    """``evaluator=retrieval``: image<->text Recall@K in both directions."""

    _target_: str = "xmodal.evaluators.retrieval.RetrievalEvaluator"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    chunk_size: int = 1024
    cache: bool = True


@dataclass
class EnsembleMember:
    """One deep-ensemble member: an open_clip architecture, its weights and activation."""

    arch: str = MISSING
    pretrained: str | None = None
    quick_gelu: bool = False


@dataclass
class UCLIPConfig:
    """``evaluator=uclip`` (conf/evaluator/uclip.yaml documents every field)."""

    _target_: str = "xmodal.evaluators.uclip.UCLIPEvaluator"
    method: str = "top1_similarity"
    compare: list[str] = field(default_factory=list)
    sampler: str = "mcd"
    passes: int = 50
    dropout: float = 0.2
    members: list[EnsembleMember] = field(default_factory=list)
    variant: str = "corrected"
    arithmetic: str = "fp32"
    step_size: float = 0.025
    max_iter: int = 50
    eps: float = 1e-8
    top_k: int = 5
    num_bins: int = 10
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    rejection_step_t2i: int = 500
    rejection_step_i2t: int = 100
    ties: str = "average"
    ece_bins: int = 15
    pcmepp: bool = False  # PCME++'s protocol too: .../pcmepp/pearson over equal-count bins
    block_size: int = UCLIP_BLOCK_SIZE
    device: str = "auto"
    cache: bool = True
    plots: bool = True


@dataclass
class ZeroShotConfig:
    """``evaluator=zeroshot``: CLIP zero-shot top-1/top-5 accuracy."""

    _target_: str = "xmodal.evaluators.zeroshot.ZeroShotEvaluator"
    templates: Any = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # list | name
    logit_scale: float | None = None  # null: the backbone's exp(logit_scale)
    cache: bool = True


@dataclass
class IndexConfig:
    """The external image-text index (clip-retrieval layout) and how to query it."""

    folder: str = MISSING  # image.index + metadata/*.parquet (+ xmodal_index.json)
    collection: str | None = None  # build the index from this collection when missing/stale
    backbone: str | None = None  # conf/backbone name of the index encoder; null: the run's
    factory: str = "auto"  # faiss factory when building: auto | Flat | IVF4096,PQ64 | ...
    max_memory: str = INDEX_MAX_MEMORY  # memory budget of an auto factory (building)
    target_recall: float = INDEX_TARGET_RECALL  # building tunes nprobe for recall@K
    nprobe: int | None = None  # IVF cells visited per query (null: the tuned value)
    mmap: bool = False  # memory-map image.index (LAION-size indexes)
    partition_size: int = 1_000_000  # items per img_emb/metadata partition when building
    search_batch_size: int = 16384  # queries per faiss search call
    aesthetic_embedding: str | None = None  # .npy vector a: q <- normalize(q + w a) (clip back)
    aesthetic_weight: float = 0.5


@dataclass
class XMoReConfig:
    """``evaluator=xmore``: retrieval-augmented zero-shot classification (module docstring)."""

    _target_: str = "xmodal.evaluators.xmore.XMoReEvaluator"
    index: IndexConfig = field(default_factory=IndexConfig)
    coarse_k: int = 128  # K: nearest images of the coarse retrieval
    k: int = 16  # captions kept after re-ranking
    fine_backbone: str | None = None  # conf/backbone name of the re-ranking CLIP; null: the run's
    rerank: str = "cosine"  # cosine | dot (released code) | none (indirect ablation)
    normalizer: str = "minmax"  # minmax (paper) | l1 (released code) | none | equal
    seeds: list[int] | None = None  # stream orders to evaluate; null: [seed]
    templates: Any = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # list | name
    caption_prefix: str = ""  # prepended to every caption (pushed code: "a_photo_of_a ")
    logit_scale: float | None = None  # tau; null: the backbone's exp(logit_scale)
    chunk_size: int = 2048  # samples per re-ranking / caption-encoding chunk
    text_batch_size: int = 256
    cache: bool = True
    save_stream: bool = True
