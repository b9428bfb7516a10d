"""``evaluator=uclip``: training-free uncertainty for CLIP image<->text retrieval.

Reimplements "Over the Top-1: Uncertainty-Aware Cross-Modal Retrieval with CLIP" (Gomez, UAI 2025;
code lluisgomez/uCLIP, spec uclip.md). N posterior samples of every caption and image embedding
(MC dropout passes, ensemble members, or one model) give N cosine score matrices S_k; every recall,
bin and curve ranks with their mean S̄. A *confidence* (higher = surer) per query comes from:

- ``top1_similarity``: the query's best score in S̄;
- ``top1_consistency``: the fraction of samples whose own top-1 (query_k against gallery_k, lowest
  index on ties) is the most frequent one; values k/N;
- ``top5_consistency``: the mean Jaccard between each sample's top-5 and the 5 most frequent
  indices (ties: first seen, as ``Counter.most_common``);
- ``adversarial``: tanh of the L2 size of the perturbation of the mean query embedding that flips
  its top-1 against the mean gallery: normalised gradient steps of 0.025 on the margin
  cos(q, g*) − max_{j≠*} cos(q, g_j), at most 50, stopping at the flip (or a zero gradient);
- ``adversarial_linear``: tanh(f / (‖∇f‖ + eps)), f = the gap between the top-2 cosines of the
  mean query, in closed form ‖∇f‖ = ‖ĝ1 − ĝ2 − f·q̂‖ / ‖q‖.

Duplicate gallery rows give the adversarial methods confidence 0 (zero margin and gradient), never
NaN. The oracle confidence 1/rank of the first positive (inf for a correct top-1) draws the
rejection upper bound. All of it is vectorised over queries and streams over blocks of the score
matrices: peak memory is the samples plus one block of ``block_size`` scores, never N matrices.

``arithmetic=fp16_official`` reproduces the released code's float16 arithmetic (fp16 embeddings,
scores, means and adversarial gradients) on any device, by rounding to float16 after each of
those operations; the default ``fp32`` computes in float32 (docs/uclip.md lists the differences).

The evaluator encodes the posterior samples through the embedding cache (an MC-dropout pass is
keyed by its index and seed), so a sweep over methods encodes once, then reports for ``method``
(and every method in ``compare``, under ``test/<method>/...``), per direction (``t2i``: caption
queries; ``i2t``: image queries): ``S``, ``R2``, ``-SR2`` on ``num_bins`` confidence bins, the
extra ``AUROC`` and ``AURC`` of the confidence for a correct top-1 (and ``ECE`` for the one
probability-like confidence, ``top1_consistency``: see :data:`PROBABILITY_METHODS`), the rejection
areas ``rejection/R@k`` (percent) beside the oracle's, and S̄'s ``R@k`` (percent). Rejection curves
and AURC average over the orders of tied confidences (``ties=average``; ``ties=index`` takes
them in query-index order, the released code's sort made deterministic). It writes
``calibration.png``, ``rejection.png`` and ``curves.json`` into the run directory, and every
query's uncertainty (-confidence of each method) to ``uncertainty/test_{i2t,t2i}.csv``
(:mod:`xmodal.protocols.uncertainty`), scored against the data's ambiguity when it records one.

On the COCO 5k test with ``data.extended_positives`` set, S̄'s ranking also gives the
extended-positive protocols (:mod:`xmodal.protocols.extended`: COCO 1k/5k, CxC, ECCV Caption,
PMRP) under ``test/<protocol>/<dir>/...``, and every method is calibrated a second time against
each query's ECCV Caption R-Precision instead of its top-1 correctness (the PCME++ target),
over the queries ECCV Caption lists: ``.../<dir>/eccv_R-P/{S,R2,-SR2,num_bins}``, same bins.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from xmodal.errors import check_choice
from xmodal.evaluators.schemas import EnsembleMember
from xmodal.metrics.calibration import (
    DIRECTIONS,
    TIES,
    calibration_report,
    calibration_scores,
    confidence_bins,
    equal_count_bins,
    pearson_calibration,
)
from xmodal.protocols.uclip import (  # noqa: F401 - re-exported: the evaluator's public maths
    ARITHMETICS,
    DEFAULT_BLOCK_SIZE,
    FP16_CONFIDENCES,
    METHODS,
    OPTIONS,
    PROBABILITY_METHODS,
    Posterior,
    Scan,
    confidence,
    fp16_round,
    mean_cosine,
    oracle_confidence,
    write_calibration_outputs,
)

if TYPE_CHECKING:
    from xmodal.data.extended import ExtendedPositives
    from xmodal.protocols.extended import ExtendedResult

SAMPLERS = ("mcd", "ensemble", "single")
VARIANTS = ("corrected", "official")
log = logging.getLogger("xmodal")


# ----------------------------------------------------------------------------------------------
# Posterior samplers: MC dropout, deep ensemble, single model
# ----------------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.MultiheadAttention]:
    """The attention of every residual block of both open_clip towers."""
    towers = [getattr(getattr(model, "visual", None), "transformer", None)]
    towers.append(getattr(model, "transformer", None))
    blocks = [list(getattr(tower, "resblocks", [])) for tower in towers]
    found = [getattr(block, "attn", None) for tower in blocks for block in tower]
    if not all(blocks) or not all(isinstance(a, nn.MultiheadAttention) for a in found):
        raise ValueError(
            f"MC dropout needs an open_clip transformer CLIP whose residual blocks use "
            f"nn.MultiheadAttention in both towers; {type(model).__name__} does not. "
            "Use an open_clip ViT backbone (e.g. backbone=openclip_vit_l_14_openai), or "
            "evaluator.sampler=ensemble|single."
        )
    return found


@contextlib.contextmanager
def mc_dropout(model: nn.Module, p: float = 0.2) -> Iterator[int]:
    """Attention dropout ``p`` on every residual block of both towers, active even in eval mode.

    A forward pre-hook switches each nn.MultiheadAttention to training mode for its own call
    only (so Lightning's ``eval()`` and inference mode cannot silently turn the passes into
    copies of each other) and the original dropout and mode come back on exit. Seed the global
    RNG (``torch.manual_seed``) before a pass to make it reproducible. Yields the block count.
    """
    modules = _attention_modules(model)
    saved = [(m, m.dropout) for m in modules]

    def before(module: nn.Module, args: Any, kwargs: Any) -> None:
        module._uclip_mode = module.training
        module.training = True

    def after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        module.training = module._uclip_mode

    handles = []
    try:
        for m in modules:
            m.dropout = float(p)
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, with_kwargs=True))
        yield len(modules)
    finally:
        for h in handles:
            h.remove()
        for m, dropout in saved:
            m.dropout = dropout


def pass_seed(seed: int, index: int, kind: str, rank: int = 0) -> int:
    """The RNG seed of MC-dropout pass ``index`` for ``kind`` (image|text) on ``rank``."""
    blob = f"uclip-mcd/{seed}/{index}/{kind}/{rank}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------


class UCLIPEvaluator:
    """Encode N posterior samples (cached), then confidences, calibration and rejection metrics."""

    def __init__(
        self,
        method: str = "top1_similarity",
        compare: Sequence[str] = (),
        sampler: str = "mcd",
        passes: int = 50,
        dropout: float = 0.2,
        members: Sequence[Any] = (),
        variant: str = "corrected",
        arithmetic: str = "fp32",
        step_size: float = 0.025,
        max_iter: int = 50,
        eps: float = 1e-8,
        top_k: int = 5,
        num_bins: int = 10,
        ks: Sequence[int] = (1, 5, 10),
        rejection_step_t2i: int = 500,
        rejection_step_i2t: int = 100,
        ties: str = "average",
        ece_bins: int = 15,
        pcmepp: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        device: str = "auto",
        cache: bool = True,
        plots: bool = True,
    ) -> None:
        for key, value in [("method", method), *[("compare", m) for m in compare]]:
            check_choice(f"evaluator.{key}", value, METHODS)
        check_choice("evaluator.sampler", sampler, SAMPLERS)
        check_choice("evaluator.variant", variant, VARIANTS)
        check_choice("evaluator.arithmetic", arithmetic, ARITHMETICS)
        self.arithmetic = arithmetic
        check_choice("evaluator.ties", ties, TIES)
        self.ties = ties
        self.pcmepp = bool(pcmepp)
        self.methods = [method] + [m for m in dict.fromkeys(compare) if m != method]
        self.sampler, self.variant = sampler, variant
        if sampler == "mcd" and (passes < 1 or not 0.0 <= dropout < 1.0):
            raise ValueError(
                f"evaluator.passes={passes} must be >= 1 and evaluator.dropout={dropout} in [0, 1)"
            )
        self.passes, self.dropout = int(passes), float(dropout)
        self.members = [self._member(m) for m in members]
        if sampler == "ensemble" and not self.members:
            raise ValueError(
                "evaluator.sampler=ensemble needs evaluator.members: a list of {arch, "
                "pretrained, quick_gelu} (conf/evaluator/uclip.yaml lists uCLIP's 12)."
            )
        self.options = {"step_size": step_size, "max_iter": max_iter, "eps": eps, "top_k": top_k}
        self.num_bins, self.ks = int(num_bins), sorted(int(k) for k in ks)
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"evaluator.ks={list(ks)} must be positive ranks, e.g. [1, 5, 10]")
        self.steps = {"t2i": int(rejection_step_t2i), "i2t": int(rejection_step_i2t)}
        self.ece_bins, self.block_size = int(ece_bins), int(block_size)
        self.device, self.use_cache, self.plots = device, cache, plots

    @staticmethod
    def _member(spec: Any) -> EnsembleMember:
        spec = dict(spec)
        if not spec.get("arch"):
            raise ValueError(f"evaluator.members entry {spec} needs an 'arch' (e.g. ViT-L-14)")
        return EnsembleMember(
            str(spec["arch"]), spec.get("pretrained"), bool(spec.get("quick_gelu", False))
        )

    # -- posterior samples ------------------------------------------------------------------------

    def member_config(self, member: EnsembleMember) -> Any:
        """The backbone config of an ensemble member. ``variant=official`` builds every member as
        the plain (GELU) architecture, as the official code does, QuickGELU weights included."""
        from xmodal.backbones import BackboneConfig

        official = self.variant == "official"
        tag = str(member.pretrained).replace("/", "_") if member.pretrained else "random"
        return BackboneConfig(
            kind="open_clip",
            name=f"{member.arch}_{tag}".lower().replace("-", "_"),
            arch=member.arch,
            pretrained=member.pretrained,
            quick_gelu=False if official else member.quick_gelu,
            allow_quick_gelu_mismatch=official,
        )

    def _encode(
        self,
        ctx: Any,
        split: Any,
        extra: dict[str, Any],
        build: Callable[[], tuple[Any, ...]],
        seeds: dict[str, int] | None = None,
        label: str = "single model",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(image [I, D], valid [I], text [T, D]) of one posterior sample through the cache.

        ``build()`` returns (model, preprocess, tokenizer) and is only called on a cache miss;
        ``seeds`` maps the kind (image|text) to the RNG seed set right before encoding it;
        ``label`` names the sample in the progress line (e.g. "MC-dropout pass 3/50").
        """
        from xmodal.data.images import ImageDataset
        from xmodal.retrieval.encode import TextDataset, encode_cached, text_collate

        built: list[Any] = []
        out = {}
        for kind, items in (("image", split.image_paths), ("text", split.captions)):
            key = ctx.embedding_key(kind, items, **extra)
            if "backbone" in extra:  # a member's own weights: its identity pins the transform
                key["transform"] = None
            hit = ctx.cache.load(key)
            log.info(
                "uCLIP %s: %d %ss %s",
                label,
                len(items),
                kind,
                "from the cache" if hit else "encoding",
            )
            if hit is not None:
                out[kind] = (hit["emb"], hit["valid"])
                continue
            if not built:
                built.extend(build())
            model, preprocess, tokenizer = built[:3]
            if kind == "image":
                dataset = ImageDataset(items, preprocess, on_corrupt=ctx.cfg.data.on_corrupt)
                kwargs = {}
            else:
                dataset, kwargs = TextDataset(items), {"collate_fn": text_collate(tokenizer)}
            if seeds is not None:
                torch.manual_seed(seeds[kind])
            out[kind] = encode_cached(
                ctx.cache, key, ctx.trainer, model, dataset, kind, **kwargs, **ctx.loader_kwargs()
            )
        return out["image"][0], out["image"][1], out["text"][0]

    def _samples(self, ctx: Any, split: Any) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield (image, valid, text) for every posterior sample of the configured sampler."""
        from xmodal import backbones

        if self.sampler == "mcd":
            yield from self._mcd_samples(ctx, split)
            return
        run_backbone = backbones.as_config(ctx.cfg.backbone)
        if self.sampler == "ensemble":
            yield from self._member_samples(ctx, split, self.members)
        elif self.variant == "official" and run_backbone.quick_gelu:
            # the official single model: the GELU architecture on the QuickGELU weights
            member = EnsembleMember(run_backbone.arch, run_backbone.pretrained, True)
            yield from self._member_samples(ctx, split, [member])
        else:  # the run's model, under the retrieval evaluator's cache keys
            yield self._encode(ctx, split, {}, lambda: (ctx.model, ctx.preprocess, ctx.tokenizer))

    def _mcd_samples(self, ctx: Any, split: Any) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """MC-dropout passes of the run's model; pass i is seeded from (seed, i, kind, rank)."""
        rank = int(ctx.trainer.global_rank)
        with mc_dropout(ctx.model, self.dropout):
            for index in range(self.passes):
                extra = {
                    "sampler": "mcd",
                    "dropout": self.dropout,
                    "pass": index,
                    "seed": int(ctx.cfg.seed),
                    "batch_size": int(ctx.cfg.data.batch_size),  # they decide the masks too
                    "world_size": int(ctx.trainer.world_size),
                }
                seeds = {k: pass_seed(ctx.cfg.seed, index, k, rank) for k in ("image", "text")}
                label = f"MC-dropout pass {index + 1}/{self.passes}"
                yield self._encode(
                    ctx,
                    split,
                    extra,
                    lambda: (ctx.model, ctx.preprocess, ctx.tokenizer),
                    seeds,
                    label,
                )

    def _member_samples(
        self, ctx: Any, split: Any, members: Sequence[EnsembleMember]
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One sample per member, each built by the backbone factory only on a cache miss."""
        from xmodal import backbones

        for index, member in enumerate(members):
            if "/" in str(member.pretrained) and not Path(str(member.pretrained)).is_file():
                raise FileNotFoundError(
                    f"evaluator.members[{index}].pretrained={member.pretrained}: no such "
                    "checkpoint file. Fix: point it at an existing file or an open_clip tag (the "
                    "shapes ensemble's extra members come from `xmodal-train "
                    "experiment=uclip/shapes_ens_member seed=<n>`)."
                )
            cfg = self.member_config(member)
            extra = {"backbone": backbones.identity(cfg)}
            label = f"ensemble member {index + 1}/{len(members)} ({cfg.name})"
            build = lambda cfg=cfg: backbones.build(cfg)  # noqa: E731 - built on a cache miss only
            yield self._encode(ctx, split, extra, build, label=label)

    def posterior_samples(self, ctx: Any, split: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(text [N, T, D], image [N, I, D], valid [I])`` of every posterior sample."""
        text = image = valid = None
        count = {"mcd": self.passes, "ensemble": len(self.members), "single": 1}[self.sampler]
        for n, (img, ok, txt) in enumerate(self._samples(ctx, split)):
            if text is None:
                text = torch.empty(count, *txt.shape)
                image = torch.empty(count, *img.shape)
                valid = ok.clone()
            text[n], image[n] = txt, img
            valid &= ok
        return text, image, valid

    # -- metrics ---------------------------------------------------------------------------------

    def eccv_calibration(
        self, conf: Tensor, rprecision: Tensor
    ) -> tuple[dict[str, float], list[list[float]]]:
        """S / R² / −S·R² of one direction with each query's ECCV Caption R-Precision as the
        target (NaN = a query ECCV Caption does not list, left out): (scalars, bins)."""
        listed = ~rprecision.isnan()
        if not listed.any():  # every query ECCV Caption lists was dropped (data.on_corrupt=skip)
            return {"S": math.nan, "R2": math.nan, "-SR2": math.nan, "num_bins": 0}, []
        bins = confidence_bins(conf[listed], rprecision[listed], self.num_bins)
        scalars: dict[str, Any] = dict(calibration_scores(bins))
        scalars["num_bins"] = len(bins)
        if self.pcmepp:  # PCME++ bins every query and scores each bin over the listed ones
            equal = equal_count_bins(conf, rprecision, self.num_bins, self.ties)
            scalars["pcmepp/pearson"] = pearson_calibration(equal)["pearson"]
        return scalars, [list(b) for b in bins]

    def evaluate(self, ctx: Any) -> dict[str, Any]:
        """Posterior samples of the split (cached), then every metric; plots on rank 0."""
        from xmodal.data.base import RetrievalSplit
        from xmodal.evaluators.base import dataset_split
        from xmodal.evaluators.retrieval import drop_invalid_images, extended_positives, kept_ids

        what = "an image-text dataset (coco, flickr30k)"
        split = dataset_split(ctx, RetrievalSplit, "uclip", what)
        gt = extended_positives(ctx.cfg.data, split)  # before encoding: a bad folder stops early
        ctx.cache.enabled = ctx.cache.enabled and self.use_cache
        text, image, valid = self.posterior_samples(ctx, split)
        if not ctx.is_rank_zero:
            return {}  # every rank encoded its shard; rank 0 alone does the maths and writes
        image, text, caption_image, skipped = drop_invalid_images(
            split, image.transpose(0, 1), text.transpose(0, 1), valid
        )
        device = ctx.trainer.strategy.root_device if self.device == "auto" else self.device
        posterior = Posterior(
            text.transpose(0, 1).to(device),
            image.transpose(0, 1).to(device),
            caption_image,
            depth=max(self.ks),
            block_size=self.block_size,
            arithmetic=self.arithmetic,
        )
        del text, image
        extended = None
        if gt is not None:
            extended = self.extended(posterior, *kept_ids(split, valid), gt)
        confidences = self.method_confidences(posterior)
        metrics, curves = self.score(posterior, extended, confidences)
        metrics["test/skipped_images"] = skipped
        if self.plots:
            self.write_outputs(ctx.run_dir, curves)
        self.write_uncertainty(ctx, split, valid, posterior, confidences)
        return metrics

    def write_uncertainty(
        self,
        ctx: Any,
        split: Any,
        valid: Tensor,
        posterior: Posterior,
        confidences: dict[str, tuple[Tensor, Tensor]],
    ) -> None:
        """Per-query uncertainties (-confidence of every method; ``uncertainty`` is ``method``'s)
        to ``uncertainty/test_{i2t,t2i}.csv`` (:mod:`xmodal.protocols.uncertainty`): image
        queries named by their path relative to ``data.root``, captions by ``<image>#<j>``."""
        from xmodal.protocols.uncertainty import retrieval_items, write_retrieval_csvs

        uncertainties = {
            m: {d: -c.double() for d, c in zip(DIRECTIONS, confidences[m])} for m in self.methods
        }
        items = retrieval_items(split, ctx.cfg.data.root, valid)
        write_retrieval_csvs(ctx.run_dir, items, posterior.ranks(), uncertainties)

    def method_confidences(self, posterior: Posterior) -> dict[str, tuple[Tensor, Tensor]]:
        """Every method's ``(caption, image)`` confidences, from one scan of the samples."""
        sample_k = max(
            [1 if m == "top1_consistency" else 0 for m in self.methods]
            + [self.options["top_k"] if m == "top5_consistency" else 0 for m in self.methods]
        )
        posterior.scan(sample_k)  # one pass serves the recalls and every method
        return {m: posterior.confidence(m, **self.options) for m in self.methods}

    def extended(
        self,
        posterior: Posterior,
        image_ids: Sequence[int],
        caption_ids: Sequence[int],
        gt: ExtendedPositives,
    ) -> ExtendedResult:
        """The extended-positive protocols on S̄'s ranking (one chunked search per direction,
        ``block_size`` scores of the N samples at a time)."""
        from xmodal.protocols.extended import coco_extended_metrics

        texts, images = posterior.text.transpose(0, 1), posterior.image.transpose(0, 1)
        gallery = max(texts.shape[0], images.shape[0])
        return coco_extended_metrics(
            images,
            texts,
            image_ids,
            caption_ids,
            gt,
            self.ks,
            chunk_size=max(1, self.block_size // (posterior.num_samples * gallery)),
            gallery_chunk_size=gallery,
            score_fn=posterior.mean_scores,
        )

    def score(
        self,
        posterior: Posterior,
        extended: ExtendedResult | None = None,
        confidences: dict[str, tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every metric of the run from its posterior samples: (metrics.json entries, curves),
        by :func:`xmodal.metrics.calibration.calibration_report` (the keys of the module doc);
        ``extended``: the extended-positive results of :meth:`extended`, when there are any;
        ``confidences``: :meth:`method_confidences` when already computed."""
        if confidences is None:
            confidences = self.method_confidences(posterior)
        metrics, curves = calibration_report(
            confidences,
            posterior.ranks(),
            steps=self.steps,
            ks=self.ks,
            num_bins=self.num_bins,
            ties=self.ties,
            oracle=posterior.oracle(),
            probability=PROBABILITY_METHODS,
            ece_bins=self.ece_bins,
            pcmepp=self.pcmepp,
        )
        if extended is not None:
            for method in self.methods:
                prefix = "test" if method == self.methods[0] else f"test/{method}"
                for d, conf in zip(DIRECTIONS, confidences[method]):
                    scalars, curves["methods"][method][d]["eccv_bins"] = self.eccv_calibration(
                        conf.cpu(), extended.eccv_rprecision[d]
                    )
                    metrics.update({f"{prefix}/{d}/eccv_R-P/{k}": v for k, v in scalars.items()})
            metrics.update({f"test/{k}": v for k, v in extended.metrics.items()})
        metrics.update(
            {
                "test/num_samples": posterior.num_samples,
                "test/num_images": posterior.image.shape[1],
                "test/num_texts": posterior.text.shape[1],
            }
        )
        return metrics, curves

    # -- plots -----------------------------------------------------------------------------------

    def write_outputs(self, run_dir: Any, curves: dict[str, Any]) -> None:
        """``curves.json``, ``calibration.png`` and ``rejection.png`` into the run directory."""
        write_calibration_outputs(run_dir, curves, self.ks)
