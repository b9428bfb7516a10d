"""``evaluator=xmore``: X-MoRe, zero-shot classification helped by cross-modal retrieval.

Eom et al., "Cross-Modal Retrieval Meets Inference" (arXiv 2308.15273); spec ``methods/xmore.md``.
For a query image x and classes c with prompts t_c = "a photo of a {c}.":

1. Coarse retrieval (§3.2, step 1): the K = 128 nearest images of x in an external image-text
   index (clip-retrieval layout, ``xmodal.retrieval.clip_index``; LAION-400M with ViT-B/32 in the
   paper), searched with the index's own encoder and its tuned search parameters (nprobe), and
   their captions. A result whose caption is null is dropped (the sample keeps its other
   captions); a sample with fewer than K *results* is skipped, as in the released code (which
   counts results, not null captions): left out of the stream and of the accuracies over the
   evaluated samples, counted in ``test/short_results``, and counted by its image-only
   prediction in ``test/acc/xmore_all``.
2. Fine retrieval (step 2): captions de-duplicated by exact string, re-ranked by a (larger)
   CLIP's image->caption similarity (ViT-L/14 in the paper): ``rerank=cosine`` (default),
   ``dot`` (the released code's unnormalised features) or ``none`` (coarse order: the paper's
   "indirect" ablation, Table 3). The top k = 16 are kept.
3. Text-modal probability: p_txt = (1/k) sum_j softmax(tau z_j W^T), z_j the backbone's caption
   embeddings: the mean of per-caption softmaxes.
4. Image-modal probability: p_img = softmax(tau normalize(f_I(x)) W^T), CLIP zero-shot.
5. Modal confidence (eq. 1): alpha = 1 - H(p_img) / ln C, beta = 1 - H(p_txt) / ln C.
6. Online normalisation over the test stream, the current sample included (eqs. 2-3):
   ``minmax`` (paper): (alpha_t - min_{s<=t} alpha_s) / (max_{s<=t} - min_{s<=t}), and likewise
   for beta; ``l1`` (released code): alpha_t / sum_{s<=t} alpha_s (eps 1e-12); ``none``: raw
   alpha, beta; ``equal``: 0.5, 0.5. Min-max's 0/0 (first sample, constant history) is 0.5 for
   that modality, and when both weights are 0 both become 0.5.
7. p = w_img p_img + w_txt p_txt and y = argmax_c p, ties to the lower class (eq. 4).

The stream is processed at once: running minima, maxima and sums are cumulative operations, so
:func:`ensemble` equals the per-sample loop exactly (normaliser maths in float64). Seeds only
permute the stream (``seeds: [0, 1, 2]`` evaluates all three orders in one run and reports
their mean and population std, as the paper's notebook does); retrieval is cached per dataset:
coarse captions, re-ranked captions and p_txt, each keyed by everything that decides it.

Metrics (percent): ``test/acc/{image,text,equal,xmore}`` over the evaluated (non-skipped)
samples, ``test/acc/normalizer/<name>`` for all four normalisers, ``test/acc/xmore_all`` with
skipped samples counted by their image-only prediction, ``test/acc/image_all`` (plain CLIP over
every sample), sample counts (``num_samples = num_evaluated + num_skipped``, ``num_skipped =
short_results + no_captions``), null captions dropped, the index's search parameters and tuned
recall, mean entropies / confidences / weights (``test/entropy/{image,text}``: paper Table 6),
and paper Table 8's ratio of the adjusted confidences per correctness case
(``test/weight_ratio/case<c>``, :func:`weight_ratio_by_case`). Each seed's stream goes to
``xmore_stream_seed<s>.csv`` in the run directory, and each image's modal uncertainties
1 - alpha and 1 - beta to ``uncertainty/test_images.csv`` (:mod:`xmodal.protocols.uncertainty`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from xmodal.data.base import ClassificationSplit
from xmodal.evaluators.base import EvalContext
from xmodal.evaluators.schemas import IndexConfig
from xmodal.evaluators.templates import check_templates, resolve_templates
from xmodal.evaluators.zeroshot import (
    DEFAULT_TEMPLATES,
    Encoder,
    build_classifier,
    class_prompts,
    classification_split,
    image_logits,
)
from xmodal.inputs import content_digest, digest
from xmodal.metrics.classification import entropy, entropy_confidence, top1_accuracy

log = logging.getLogger(__name__)

NORMALIZERS = ("minmax", "l1", "none", "equal")
RERANKS = ("cosine", "dot", "none")
L1_EPS = 1e-12  # torch.nn.functional.normalize's eps, as in the released code
ROW_CHUNK = 256  # rows per block of [S, C] work: small blocks stay in the CPU cache


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# The ensemble (eqs. 1-4), for a whole stream at once
# ------------------------------------------------------------------------------------------


def caption_probs(caption_logits: Tensor, chunk_size: int = 32) -> Tensor:
    """p_txt ``[S, C]``: the mean over k of the per-caption softmaxes of ``[S, k, C]`` logits."""
    shape = (caption_logits.shape[0], caption_logits.shape[2])
    out = caption_logits.new_empty(shape)
    for s0 in range(0, caption_logits.shape[0], chunk_size):
        block = caption_logits[s0 : s0 + chunk_size]
        out[s0 : s0 + chunk_size] = torch.softmax(block, dim=-1).mean(dim=1)
    return out


def _rowwise_confidence(probs: Tensor) -> Tensor:
    """``entropy_confidence`` of each row (in the probabilities' dtype), a block of rows at a
    time, returned as float64 on the CPU for the normaliser's running statistics."""
    out = torch.empty(probs.shape[0], dtype=torch.float64)
    for s0 in range(0, probs.shape[0], ROW_CHUNK):
        out[s0 : s0 + ROW_CHUNK] = entropy_confidence(probs[s0 : s0 + ROW_CHUNK])
    return out


def stream_confidences(p_image: Tensor, p_text: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy confidences (c_img, c_txt) [S] of each row, float64 on the CPU. They do not
    depend on the stream order: permute them with the rows."""
    return _rowwise_confidence(p_image), _rowwise_confidence(p_text)


def _minmax(conf: Tensor) -> Tensor:
    """(c_t - min_{s<=t} c_s) / (max_{s<=t} c_s - min_{s<=t} c_s); 0.5 where the range is 0."""
    low = torch.cummin(conf, dim=0).values
    high = torch.cummax(conf, dim=0).values
    span = high - low
    weight = (conf - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, weight, torch.full_like(conf, 0.5))


def modal_weights(conf_image: Tensor, conf_text: Tensor, normalizer: str) -> tuple[Tensor, Tensor]:
    """Adjusted confidences (w_img, w_txt) ``[S]`` float64 of confidences in stream order."""
    conf_image, conf_text = conf_image.double(), conf_text.double()
    if normalizer == "equal":
        return torch.full_like(conf_image, 0.5), torch.full_like(conf_text, 0.5)
    if normalizer == "none":
        return conf_image.clone(), conf_text.clone()
    if normalizer == "l1":  # F.normalize(history, p=1)[-1]; confidences are >= 0
        return (
            conf_image / torch.cumsum(conf_image, 0).clamp_min(L1_EPS),
            conf_text / torch.cumsum(conf_text, 0).clamp_min(L1_EPS),
        )
    if normalizer == "minmax":
        w_image, w_text = _minmax(conf_image), _minmax(conf_text)
        both_zero = (w_image == 0) & (w_text == 0)
        half = torch.full_like(w_image, 0.5)
        return torch.where(both_zero, half, w_image), torch.where(both_zero, half, w_text)
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")


def fuse(
    p_image: Tensor,
    p_text: Tensor,
    normalizer: str = "minmax",
    conf: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """X-MoRe's prediction for a stream of image- and text-modal probabilities ``[S, C]``.

    Returns ``pred`` [S] (long) and ``conf_image``, ``conf_text``, ``w_image``, ``w_text`` [S]
    (float64). The fused scores ``w_img p_img + w_txt p_txt`` are formed in float64. ``conf``:
    the rows' entropy confidences (:func:`stream_confidences`) when the caller already has them,
    as when one stream is fused in several orders and with several normalisers.
    """
    if p_image.shape != p_text.shape or p_image.dim() != 2:
        raise ValueError(
            f"p_image and p_text must both be [S, C], got {tuple(p_image.shape)} and "
            f"{tuple(p_text.shape)}"
        )
    conf_image, conf_text = conf if conf is not None else stream_confidences(p_image, p_text)
    w_image, w_text = modal_weights(conf_image, conf_text, normalizer)  # on the CPU: exact scans
    w_image_dev, w_text_dev = w_image.to(p_image.device), w_text.to(p_image.device)
    pred = torch.empty(p_image.shape[0], dtype=torch.long, device=p_image.device)
    for s0 in range(0, p_image.shape[0], ROW_CHUNK):
        rows = slice(s0, s0 + ROW_CHUNK)
        # w_img p_img + w_txt p_txt, in place on float64 copies (never on the caller's tensors)
        fused = p_image[rows].to(torch.float64, copy=True).mul_(w_image_dev[rows, None])
        fused.add_(p_text[rows].to(torch.float64, copy=True).mul_(w_text_dev[rows, None]))
        pred[rows] = fused.argmax(dim=1)
    return {
        "pred": pred,
        "conf_image": conf_image,
        "conf_text": conf_text,
        "w_image": w_image,
        "w_text": w_text,
    }


def ensemble(
    image_logits: Tensor, caption_logits: Tensor, normalizer: str = "minmax"
) -> dict[str, Tensor]:
    """X-MoRe over a stream: ``image_logits`` [S, C] and ``caption_logits`` [S, k, C] (the k
    retrieved captions' logits), in stream order. Returns ``pred`` [S] and ``conf_image``,
    ``conf_text``, ``w_image``, ``w_text`` [S], exactly as a per-sample loop would (eqs. 1-4)."""
    if caption_logits.dim() != 3 or image_logits.dim() != 2:
        raise ValueError(
            f"image_logits must be [S, C] and caption_logits [S, k, C], got "
            f"{tuple(image_logits.shape)} and {tuple(caption_logits.shape)}"
        )
    p_image = torch.softmax(image_logits, dim=-1)
    return fuse(p_image, caption_probs(caption_logits), normalizer)


#: Paper Table 8's correctness cases: (image-only right, text-only right, X-MoRe right).
WEIGHT_RATIO_CASES = {
    "case1": (True, False, True),  # the image modality alone was right
    "case2": (False, True, True),  # the text modality alone was right
    "case3": (False, False, True),  # neither alone, only their ensemble
}


def weight_ratio_by_case(
    w_image: Tensor,
    w_text: Tensor,
    correct_image: Tensor,
    correct_text: Tensor,
    correct_xmore: Tensor,
) -> dict[str, dict[str, float]]:
    """Paper Table 8 (§6.3): the adjusted confidences' ratio w_img / w_txt (its alpha-hat /
    beta-hat, eqs. 2-3, under the configured normaliser) summed over the samples of each
    correctness case of :data:`WEIGHT_RATIO_CASES`; > 1: the ensemble leaned on the image.

    Stated definition where beta-hat = 0: min-max gives w_txt = 0 whenever the sample's text
    confidence is the running minimum (and its image confidence is not; both 0 fall back to
    0.5 each), where alpha-hat / beta-hat is +inf. Such samples are left out of the ratio's
    mean and counted (``beta_zero``); nothing is divided by zero. Returns per case ``sum`` (of
    the ratios over samples with w_txt > 0), ``num`` (samples in the case) and ``beta_zero``
    (those left out). Inputs are [S] tensors of one stream; sum them over streams, then
    ``mean = sum / (num - beta_zero)``.
    """
    out = {}
    for case, (image_ok, text_ok, xmore_ok) in WEIGHT_RATIO_CASES.items():
        member = (
            (correct_image == image_ok) & (correct_text == text_ok) & (correct_xmore == xmore_ok)
        )
        defined = member & (w_text > 0)
        ratio = w_image[defined].double() / w_text[defined].double()
        out[case] = {
            "sum": ratio.sum().item(),
            "num": int(member.sum()),
            "beta_zero": int((member & ~(w_text > 0)).sum()),
        }
    return out


def weight_ratio_metrics(per_stream: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """``test/weight_ratio/case<c>`` = the mean of w_img / w_txt over every (seed, sample) of
    case c with w_txt > 0, pooled over the seeds' streams (each a full pass over the same
    samples); ``.../num`` and ``.../beta_zero`` count (seed, sample) pairs over all streams.
    A case with no sample where the ratio is defined has no ratio key (an empty table cell),
    only its counts."""
    metrics: dict[str, float | int] = {}
    for case in WEIGHT_RATIO_CASES:
        total = sum(s[case]["sum"] for s in per_stream)
        num = sum(int(s[case]["num"]) for s in per_stream)
        beta_zero = sum(int(s[case]["beta_zero"]) for s in per_stream)
        metrics[f"test/weight_ratio/{case}/num"] = num
        metrics[f"test/weight_ratio/{case}/beta_zero"] = beta_zero
        if num > beta_zero:
            metrics[f"test/weight_ratio/{case}"] = total / (num - beta_zero)
    return metrics


def dedup(captions: Sequence[str]) -> list[str]:
    """Exact-string de-duplication keeping the first occurrence (coarse rank order)."""
    return list(dict.fromkeys(captions))


# ------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class XMoReEvaluator:
    """Retrieve captions for every test image (cached), then evaluate the stream (eqs. 1-4)."""

    def __init__(
        self,
        index: Mapping[str, Any] | IndexConfig,
        coarse_k: int = 128,
        k: int = 16,
        fine_backbone: str | None = None,
        rerank: str = "cosine",
        normalizer: str = "minmax",
        seeds: Sequence[int] | None = None,
        templates: str | Sequence[str] = DEFAULT_TEMPLATES,
        caption_prefix: str = "",
        logit_scale: float | None = None,
        chunk_size: int = 2048,
        text_batch_size: int = 256,
        cache: bool = True,
        save_stream: bool = True,
    ) -> None:
        if isinstance(index, DictConfig):
            index = OmegaConf.to_container(index, resolve=True)
        self.index = index if isinstance(index, IndexConfig) else IndexConfig(**dict(index))
        if normalizer not in NORMALIZERS:
            raise ValueError(f"evaluator.normalizer must be one of {NORMALIZERS}, got {normalizer}")
        if rerank not in RERANKS:
            raise ValueError(f"evaluator.rerank must be one of {RERANKS}, got {rerank!r}")
        if not 1 <= k <= coarse_k:
            raise ValueError(f"need 1 <= evaluator.k <= evaluator.coarse_k, got {k}, {coarse_k}")
        check_templates(templates)  # a bad template or name fails at instantiation
        self.coarse_k, self.k = int(coarse_k), int(k)
        self.fine_backbone, self.rerank, self.normalizer = fine_backbone, rerank, normalizer
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        self.templates = templates if isinstance(templates, str) else list(templates)
        self.caption_prefix = caption_prefix
        self.logit_scale = logit_scale
        self.chunk_size, self.text_batch_size = int(chunk_size), int(text_batch_size)
        self.use_cache, self.save_stream = cache, save_stream

    # -- the run ---------------------------------------------------------------------------

    def evaluate(self, ctx: EvalContext) -> dict[str, Any]:
        split = classification_split(ctx, "xmore")
        ctx.cache.enabled = ctx.cache.enabled and self.use_cache
        self._check_index_source()
        backbone = Encoder.of_run(ctx)
        templates = resolve_templates(self.templates, ctx.cfg.data.get("dataset"))
        classifier = build_classifier(
            ctx, backbone, split.classnames, templates, self.text_batch_size
        )
        scale = backbone.logit_scale(self.logit_scale)
        logits, valid = image_logits(ctx, backbone, split, classifier, scale)
        retrieved = self.retrieved_captions(ctx, split)
        captions = retrieved["captions"]
        p_text = self.text_probs(ctx, backbone, split, classifier, scale, captions)
        metrics = self.stream_metrics(ctx, split, logits, valid, retrieved, p_text)
        return {**metrics, **self._index_metrics(retrieved)}

    # -- 1-2: retrieval ----------------------------------------------------------------------

    def _check_index_source(self) -> None:
        """Fail before any encoding when there is neither an index nor a collection to build."""
        from xmodal.retrieval.clip_index import BUILD_FIX, index_error, open_info

        folder = Path(self.index.folder)
        if not self.index.collection and not (folder / "image.index").exists():
            raise index_error(folder, "missing image.index", BUILD_FIX)
        if not self.index.collection:  # unfinished, untuned or changed: say so before encoding
            open_info(folder)

    def _dataset_key(self, ctx: EvalContext, split: ClassificationSplit) -> dict[str, Any]:
        """The test images, by path and by file fingerprint (a replaced image is a new key)."""
        return {
            "dataset": ctx.cfg.data.name,
            "root": str(Path(ctx.cfg.data.root).resolve()),
            "items": digest(split.image_paths),
            "content": content_digest(split.image_paths),
            "on_corrupt": str(ctx.cfg.data.on_corrupt),
            "count": len(split.image_paths),
        }

    def retrieved_captions(self, ctx: EvalContext, split: ClassificationSplit) -> dict[str, Any]:
        """Per sample, its unique retrieved captions best first (``captions``; None: skipped),
        whether the index returned fewer than K results (``short``), how many of its results
        had a null caption (``nulls``), and the search parameters used (``search``); cached."""
        index_encoder = Encoder.named(ctx, self.index.backbone)
        index_id = self.prepare_index(ctx, index_encoder)
        aesthetic = self.index.aesthetic_embedding
        coarse_key = {
            "kind": "xmore/coarse",
            "format": 2,  # short results and null captions told apart
            **self._dataset_key(ctx, split),
            "index": index_id,
            "query_encoder": index_encoder.identity(),
            "coarse_k": self.coarse_k,
            "nprobe": self.index.nprobe,
            "aesthetic": None if aesthetic is None else [aesthetic, self.index.aesthetic_weight],
        }
        fine = None if self.rerank == "none" else Encoder.named(ctx, self.fine_backbone)
        fine_key = {
            **coarse_key,
            "kind": "xmore/fine",
            "rerank": self.rerank,
            "fine_encoder": None if fine is None else fine.identity(),
        }

        def compute_fine() -> dict[str, Any]:
            coarse = ctx.cache.get_or_compute(
                coarse_key, lambda: self.coarse(ctx, split, index_encoder), write=ctx.is_rank_zero
            )
            unique = [None if c is None else dedup(c) for c in coarse["captions"]]
            if fine is not None:
                unique = self.fine(ctx, split, fine, unique)
            return {**coarse, "captions": unique}

        return ctx.cache.get_or_compute(fine_key, compute_fine, write=ctx.is_rank_zero)

    def prepare_index(self, ctx: EvalContext, encoder: Encoder) -> dict[str, Any]:
        """Identity of the index to query; builds it first when ``index.collection`` is set and
        the folder holds no index of that collection under that encoder."""
        from xmodal.data.collection import read_collection
        from xmodal.retrieval import clip_index

        folder = Path(self.index.folder)
        info = clip_index.read_info(folder)
        encoder_id = _jsonable({"name": encoder.name, "identity": encoder.identity()})
        if self.index.collection:
            collection = read_collection(self.index.collection)
            current = info is not None and (folder / "image.index").exists()
            current = current and info.get("encoder") == encoder_id
            current = current and info.get("collection_digest") == collection.digest()
            wanted = self._index_options().record()
            if current and info.get("image_search", {}).get("exact"):
                wanted.pop("tune_k")  # an exact index is the same whatever K
            for key, value in wanted.items():
                current = current and info.get(key) == value
            if not current:
                log.info("building the X-MoRe index %s from %s", folder, collection.source)
                encode_fn = trainer_encode_fn(
                    ctx.trainer,
                    encoder.model,
                    encoder.preprocess,
                    encoder.tokenizer,
                    batch_size=ctx.cfg.data.batch_size,
                    num_workers=ctx.cfg.data.num_workers,
                )
                info = clip_index.build(
                    folder,
                    collection,
                    encode_fn,
                    encoder_id,
                    partition_size=self.index.partition_size,
                    options=self._index_options(),
                    is_writer=ctx.is_rank_zero,
                )
            return _jsonable(info)
        info = clip_index.open_info(folder)  # finished and tuned, or a one-paragraph error
        recorded = info.get("encoder")  # None: embeddings made elsewhere (dimension checked)
        if recorded is not None and recorded.get("identity") != encoder_id["identity"]:
            raise clip_index.index_error(
                folder,
                f"it was built with encoder {recorded.get('name')}, but queries would be encoded "
                f"with {encoder.name}",
                "set evaluator.index.backbone to the index's encoder (or rebuild the index "
                "with this one).",
            )
        return _jsonable(info)

    def _index_options(self):
        """How a collection's index is built: tuned for recall@coarse_k (X-MoRe's K)."""
        from xmodal.retrieval.clip_index import IndexOptions

        return IndexOptions(
            factory=self.index.factory,
            max_memory=self.index.max_memory,
            target_recall=self.index.target_recall,
            tune_k=self.coarse_k,
        )

    def coarse(
        self, ctx: EvalContext, split: ClassificationSplit, encoder: Encoder
    ) -> dict[str, Any]:
        """Step 1: the captions of the K nearest index images of every test image, in rank
        order, null captions dropped (``captions``); None when fewer than K results came back
        (``short``), no caption was left, or the image could not be decoded. ``nulls``: the
        null captions dropped per sample; ``search``: the faiss parameters searched with."""
        from xmodal.retrieval.clip_index import ClipIndex

        emb, valid = encoder.images(ctx, split.image_paths)
        queries = F.normalize(emb.float(), dim=-1)
        if self.index.aesthetic_embedding:
            bias = torch.from_numpy(np.load(self.index.aesthetic_embedding)).float().reshape(-1)
            queries = F.normalize(queries + self.index.aesthetic_weight * bias, dim=-1)
        index = ClipIndex(self.index.folder, nprobe=self.index.nprobe, mmap=self.index.mmap)
        tuned_k = index.tuned.get("k", 0)
        if self.index.nprobe is None and not index.tuned.get("exact") and tuned_k < self.coarse_k:
            log.warning(
                "%s was tuned for recall@%d, but X-MoRe retrieves K=%d: samples may get fewer "
                "than K results (counted in test/short_results); re-tune it with `xmodal-index "
                "tune %s --tune-k %d`",
                self.index.folder,
                tuned_k,
                self.coarse_k,
                self.index.folder,
                self.coarse_k,
            )
        _, ids = index.search(queries, self.coarse_k, self.index.search_batch_size)
        results = (ids >= 0).sum(dim=1).tolist()
        captions: list[list[str] | None] = []
        short, nulls = [], []
        for ok, found, id_row, row in zip(
            valid.tolist(), results, ids.tolist(), index.column(ids, "caption")
        ):
            kept = [c for i, c in zip(id_row, row) if i >= 0 and c is not None]
            short.append(ok and found < self.coarse_k)
            nulls.append(found - len(kept) if ok else 0)
            captions.append(kept if ok and found >= self.coarse_k and kept else None)
        tuned = None if self.index.nprobe is not None else index.tuned
        return {
            "captions": captions,
            "short": short,
            "nulls": nulls,
            "search": index.params,
            "tuned_recall": None if tuned is None else tuned.get("recall"),
            "tuned_k": None if tuned is None else tuned.get("k"),
        }

    def _chunks(self, captions: Sequence[list[str] | None]) -> list[list[int]]:
        kept = [i for i, c in enumerate(captions) if c is not None]
        return [kept[i : i + self.chunk_size] for i in range(0, len(kept), self.chunk_size)]

    def fine(
        self,
        ctx: EvalContext,
        split: ClassificationSplit,
        encoder: Encoder,
        unique: list[list[str] | None],
    ) -> list[list[str] | None]:
        """Step 2: each sample's unique captions sorted by the fine encoder's image->caption
        score (cosine, or the raw dot product); ties keep the coarse order."""
        images, _ = encoder.images(ctx, split.image_paths)
        images = images.float()
        if self.rerank == "cosine":
            images = F.normalize(images, dim=-1)
        out: list[list[str] | None] = [None] * len(unique)
        for chunk in self._chunks(unique):
            texts = dedup([c for i in chunk for c in unique[i]])
            emb = encoder.texts(ctx, texts, self.text_batch_size, cache=False).float()
            if self.rerank == "cosine":
                emb = F.normalize(emb, dim=-1)
            row = {t: r for r, t in enumerate(texts)}
            for i in chunk:
                scores = emb[[row[c] for c in unique[i]]] @ images[i]
                order = scores.sort(descending=True, stable=True).indices.tolist()
                out[i] = [unique[i][o] for o in order]
        return out

    # -- 3: text-modal probability ----------------------------------------------------------

    def text_probs(
        self,
        ctx: EvalContext,
        backbone: Encoder,
        split: ClassificationSplit,
        classifier: Tensor,
        scale: float,
        captions: list[list[str] | None],
    ) -> Tensor:
        """p_txt ``[N, C]`` from each sample's top-k captions (NaN rows for skipped samples)."""
        key = {
            "kind": "xmore/text_probs",
            **self._dataset_key(ctx, split),
            "captions": digest(["\n".join(c) if c else "\0" for c in captions]),
            "k": self.k,
            "prefix": self.caption_prefix,
            "backbone": backbone.identity(),
            "prompts": digest(
                class_prompts(
                    split.classnames,
                    resolve_templates(self.templates, ctx.cfg.data.get("dataset")),
                )
            ),
            "scale": scale,
        }

        def compute() -> dict[str, Tensor]:
            probs = torch.full((len(captions), classifier.shape[0]), float("nan"))
            for chunk in self._chunks(captions):
                tops = {i: [self.caption_prefix + c for c in captions[i][: self.k]] for i in chunk}
                texts = dedup([t for i in chunk for t in tops[i]])
                emb = F.normalize(
                    backbone.texts(ctx, texts, self.text_batch_size, cache=False), dim=-1
                )
                per_caption = torch.softmax(scale * emb.float() @ classifier.T, dim=-1)
                row = {t: r for r, t in enumerate(texts)}
                for i in chunk:
                    probs[i] = per_caption[[row[t] for t in tops[i]]].mean(dim=0)
            return {"probs": probs}

        return ctx.cache.get_or_compute(key, compute, write=ctx.is_rank_zero)["probs"]

    # -- 4-7: the stream ---------------------------------------------------------------------

    def stream_metrics(
        self,
        ctx: EvalContext,
        split: ClassificationSplit,
        logits: Tensor,
        valid: Tensor,
        retrieved: Mapping[str, Any],
        p_text_all: Tensor,
    ) -> dict[str, Any]:
        """Evaluate the stream of non-skipped samples in every seed's order. ``retrieved``: what
        :meth:`retrieved_captions` returns (captions, short results, null captions)."""
        captions = retrieved["captions"]
        labels_all = torch.tensor(split.labels)
        kept = valid & torch.tensor([c is not None for c in captions])
        idx = kept.nonzero().squeeze(1)
        short = valid & torch.tensor(retrieved["short"], dtype=torch.bool)
        no_captions = valid & ~kept & ~short
        nulls = int(torch.tensor(retrieved["nulls"], dtype=torch.long)[valid].sum())
        if len(idx) == 0:
            raise RuntimeError(
                f"X-MoRe: all {int(valid.sum())} test images were skipped: {int(short.sum())} "
                f"got fewer than {self.coarse_k} results from {self.index.folder} and "
                f"{int(no_captions.sum())} only null captions. Use a larger collection, lower "
                "evaluator.coarse_k, or raise evaluator.index.nprobe."
            )
        if short.any() or no_captions.any():
            log.warning(
                "X-MoRe: %d of %d test images skipped (as the released code does): %d got fewer "
                "than K=%d results from %s (search %s), %d only null captions. They are left out "
                "of test/acc/{xmore,image,text,...} and counted by their image-only prediction "
                "in test/acc/xmore_all.",
                int(short.sum() + no_captions.sum()),
                int(valid.sum()),
                int(short.sum()),
                self.coarse_k,
                self.index.folder,
                retrieved.get("search") or "exhaustive",
                int(no_captions.sum()),
            )
        p_image_all = torch.softmax(logits, dim=-1)
        p_image, p_text, labels = p_image_all[idx], p_text_all[idx], labels_all[idx]
        pred_image, pred_text = p_image.argmax(dim=1), p_text.argmax(dim=1)
        conf_image, conf_text = stream_confidences(p_image, p_text)  # once: order-independent
        if ctx.is_rank_zero:  # the uncertainty interface, whatever save_stream says
            self._write_uncertainty(ctx, split, idx, (pred_image, pred_text), conf_image, conf_text)
        seeds = self.seeds if self.seeds is not None else [int(ctx.cfg.seed)]
        by_norm: dict[str, list[float]] = {n: [] for n in NORMALIZERS}
        acc_all, w_image, w_text, ratios = [], [], [], []
        for seed in seeds:
            order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
            conf = (conf_image[order], conf_text[order])
            for normalizer in NORMALIZERS:
                out = fuse(p_image[order], p_text[order], normalizer, conf)
                by_norm[normalizer].append(100.0 * top1_accuracy(out["pred"], labels[order]))
                if normalizer != self.normalizer:
                    continue
                w_image.append(out["w_image"].mean().item())
                w_text.append(out["w_text"].mean().item())
                ratios.append(
                    weight_ratio_by_case(
                        out["w_image"],
                        out["w_text"],
                        (pred_image.cpu() == labels)[order],
                        (pred_text.cpu() == labels)[order],
                        out["pred"].cpu() == labels[order],
                    )
                )
                pred_all = p_image_all.argmax(dim=1)  # skipped samples: image-only
                pred_all[idx[order]] = out["pred"]
                acc_all.append(100.0 * top1_accuracy(pred_all[valid], labels_all[valid]))
                if self.save_stream and ctx.is_rank_zero:
                    self._write_stream(
                        ctx,
                        seed,
                        idx[order],
                        labels[order],
                        out,
                        pred_image[order],
                        pred_text[order],
                    )
        main = np.array(by_norm[self.normalizer])
        metrics: dict[str, Any] = {
            "test/acc/xmore": float(main.mean()),
            "test/acc/xmore_std": float(main.std()),
            "test/acc/image": 100.0 * top1_accuracy(pred_image, labels),
            "test/acc/text": 100.0 * top1_accuracy(pred_text, labels),
            "test/acc/equal": float(np.mean(by_norm["equal"])),
            "test/acc/xmore_all": float(np.mean(acc_all)),
            "test/acc/image_all": 100.0
            * top1_accuracy(p_image_all[valid].argmax(dim=1), labels_all[valid]),
            "test/num_samples": int(valid.sum()),
            "test/num_evaluated": len(idx),
            "test/num_skipped": int(valid.sum()) - len(idx),
            "test/short_results": int(short.sum()),
            "test/no_captions": int(no_captions.sum()),
            "test/null_captions": nulls,
            "test/num_corrupt": int((~valid).sum()),
            "test/num_short": sum(len(captions[i]) < self.k for i in idx.tolist()),
            "test/unique_captions": float(np.mean([len(captions[i]) for i in idx.tolist()])),
            "test/entropy/image": entropy(p_image.double()).mean().item(),
            "test/entropy/text": entropy(p_text.double()).mean().item(),
            "test/conf/image": conf_image.mean().item(),
            "test/conf/text": conf_text.mean().item(),
            "test/weight/image": float(np.mean(w_image)),
            "test/weight/text": float(np.mean(w_text)),
        }
        metrics.update({f"test/acc/normalizer/{n}": float(np.mean(v)) for n, v in by_norm.items()})
        metrics.update(weight_ratio_metrics(ratios))
        metrics.update({f"test/acc/xmore_seed{s}": float(a) for s, a in zip(seeds, main)})
        return metrics

    @staticmethod
    def _index_metrics(retrieved: Mapping[str, Any]) -> dict[str, Any]:
        """``test/index/nprobe`` searched with (IVF indexes), and the recall@k against exact
        search that the index's tuned parameters measured at build time (``tuned_recall``,
        ``tuned_k``; absent under an explicit evaluator.index.nprobe)."""
        out: dict[str, Any] = {}
        for param in (retrieved.get("search") or "").split(","):
            if param.startswith("nprobe="):
                out["test/index/nprobe"] = int(param.split("=")[1])
        if retrieved.get("tuned_recall") is not None:
            out["test/index/tuned_recall"] = float(retrieved["tuned_recall"])
            out["test/index/tuned_k"] = int(retrieved["tuned_k"])
        return out

    @staticmethod
    def _write_uncertainty(
        ctx: EvalContext,
        split: ClassificationSplit,
        idx: Tensor,
        preds: tuple[Tensor, Tensor],
        conf_image: Tensor,
        conf_text: Tensor,
    ) -> None:
        """Each evaluated image's modal uncertainties 1 - alpha (``uncertainty``) and 1 - beta
        (``text``) to ``uncertainty/test_images.csv`` (:mod:`xmodal.protocols.uncertainty`)."""
        from xmodal.protocols.uncertainty import csv_path, relative_items, write_query_csv

        rows = idx.tolist()
        paths = relative_items([split.image_paths[i] for i in rows], ctx.cfg.data.root)
        leading = {
            "query": rows,
            "item": paths,
            "label": [split.labels[i] for i in rows],
            "pred_image": preds[0].tolist(),
            "pred_text": preds[1].tolist(),
        }
        columns = {"uncertainty": 1.0 - conf_image, "text": 1.0 - conf_text}
        write_query_csv(csv_path(ctx.run_dir, "test", "images"), leading, columns)

    def _write_stream(
        self,
        ctx: EvalContext,
        seed: int,
        index: Tensor,
        labels: Tensor,
        out: dict[str, Tensor],
        pred_image: Tensor,
        pred_text: Tensor,
    ) -> None:
        """One row per evaluated sample in stream order: what the ensemble saw and decided
        (floats written exactly, so the weights can be recomputed from the confidences)."""
        from xmodal.runs import atomic_write_text

        rows = [
            "position,index,label,pred_image,pred_text,pred_xmore,conf_image,conf_text,"
            "w_image,w_text"
        ]
        columns = zip(
            index.tolist(),
            labels.tolist(),
            pred_image.tolist(),
            pred_text.tolist(),
            out["pred"].tolist(),
            out["conf_image"].tolist(),
            out["conf_text"].tolist(),
            out["w_image"].tolist(),
            out["w_text"].tolist(),
        )
        for t, (i, y, pi, pt, px, ci, ct, wi, wt) in enumerate(columns):
            rows.append(f"{t},{i},{y},{pi},{pt},{px},{ci!r},{ct!r},{wi!r},{wt!r}")  # exact floats
        path = Path(ctx.run_dir) / f"xmore_stream_seed{seed}.csv"
        atomic_write_text(path, "\n".join(rows) + "\n")


def trainer_encode_fn(
    trainer: Any,
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    on_corrupt: str = "skip",
) -> Callable[[list[str], str], tuple[torch.Tensor, torch.Tensor]]:
    """The ``EncodeFn`` of :func:`xmodal.retrieval.clip_index.build`, through a Lightning trainer
    (``xmodal.retrieval.encode``):
    DDP-sharded, images decoded with ``on_corrupt`` (``skip``: web collections have broken files,
    their rows are dropped from the index)."""
    from xmodal.data.images import ImageDataset
    from xmodal.retrieval.encode import TextDataset, encode, text_collate

    def encode_fn(items: list[str], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = {"batch_size": batch_size, "num_workers": num_workers}
        if kind == "image":
            dataset = ImageDataset(items, preprocess, on_corrupt=on_corrupt)
            return encode(trainer, model, dataset, "image", **loader)
        dataset = TextDataset(items)
        return encode(trainer, model, dataset, "text", collate_fn=text_collate(tokenizer), **loader)

    return encode_fn
