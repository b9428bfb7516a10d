"""``evaluator=zeroshot``: CLIP zero-shot classification with class-name prompts.

The classifier is CLIP's: each class name (``_`` replaced by a space) is put in every template,
the prompts are encoded and L2-normalised, averaged over templates and normalised again
(CLIP_benchmark's ``zero_shot_classifier``). With the single template ``"a photo of a {}."`` this
is the TPT / X-MoRe protocol (``datasets/zeroshot.md`` §2). Logits are
``exp(logit_scale) * normalize(f_I(x)) @ W^T`` (100 for OpenAI CLIP). ImageNet-A/R are scored as
200-way classifiers over their own classes and V2's folders are 1k indices (the loaders do both).

Reported in percent: ``test/acc1``, ``test/acc5`` (when there are >= 5 classes) and
``test/mean_per_class_recall``, over the images that could be decoded.

``Encoder``, ``build_classifier`` and ``classification_split`` are shared with ``evaluator=xmore``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from xmodal.data.base import ClassificationSplit
from xmodal.evaluators.base import EvalContext
from xmodal.evaluators.schemas import DEFAULT_TEMPLATES
from xmodal.evaluators.templates import check_templates, resolve_templates


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts class-major: ``templates[t]`` filled with class ``c`` is item ``c * T + t``.

    Underscores in class names become spaces (CoOp keeps ``american_bulldog``); a template names
    the class with ``{}`` or ``{c}``.
    """
    if not templates:
        raise ValueError("at least one prompt template is needed, e.g. 'a photo of a {}.'")
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' (or '{{c}}') for the class name")
    names = [c.replace("_", " ") for c in classnames]
    return [t.format(n, c=n) for n in names for t in templates]


class Encoder:
    """A frozen backbone with what identifies its embeddings, so they are cached per encoder.

    ``cfg`` is the backbone config (the run's, or a named one for X-MoRe's index and re-ranking
    encoders). A named backbone is built on first use only, so a run whose results are all
    cached never loads it.
    """

    def __init__(self, cfg: Any, built: tuple[nn.Module, Callable, Callable] | None = None):
        self.cfg = cfg
        self._built = built

    @classmethod
    def of_run(cls, ctx: EvalContext) -> Encoder:
        return cls(ctx.cfg.backbone, (ctx.model, ctx.preprocess, ctx.tokenizer))

    @classmethod
    def named(cls, ctx: EvalContext, name: str | None) -> Encoder:
        """The backbone config ``conf/backbone/<name>.yaml`` (null: the run's own)."""
        from xmodal import backbones

        if name is None:
            return cls.of_run(ctx)
        cfg = backbone_config(ctx.cfg, name)
        if backbones.identity(cfg) == backbones.identity(ctx.cfg.backbone):
            return cls.of_run(ctx)
        return cls(cfg)

    def _parts(self) -> tuple[nn.Module, Callable, Callable]:
        if self._built is None:
            from xmodal import backbones

            self._built = backbones.build(self.cfg)
        return self._built

    @property
    def model(self) -> nn.Module:
        return self._parts()[0]

    @property
    def preprocess(self) -> Callable:
        return self._parts()[1]

    @property
    def tokenizer(self) -> Callable:
        return self._parts()[2]

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    def identity(self) -> dict[str, Any]:
        from xmodal.backbones import identity

        return identity(self.cfg)

    def key(self, ctx: EvalContext, kind: str, items: Sequence[Any], **extra: Any) -> dict:
        """Cache key of the embeddings of ``items`` under this encoder (cf. ``embedding_key``)."""
        return {
            **ctx.embedding_key(kind, list(items), **extra),
            "backbone": self.identity(),
            "transform": repr(self.preprocess) if kind == "image" else None,
        }

    def images(self, ctx: EvalContext, refs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [N, D], valid [N])`` of images (cached; DDP-sharded)."""
        from xmodal.data.images import ImageDataset
        from xmodal.retrieval.encode import encode_cached

        dataset = ImageDataset(refs, self.preprocess, on_corrupt=ctx.cfg.data.on_corrupt)
        key = self.key(ctx, "image", refs)
        return encode_cached(
            ctx.cache, key, ctx.trainer, self.model, dataset, "image", **ctx.loader_kwargs()
        )

    def texts(
        self, ctx: EvalContext, texts: Sequence[str], batch_size: int, cache: bool = True
    ) -> torch.Tensor:
        """Embeddings ``[N, D]`` of texts (cached when ``cache``; DDP-sharded)."""
        from xmodal.retrieval.encode import TextDataset, encode, encode_cached, text_collate

        kwargs = {
            "batch_size": batch_size,
            "num_workers": ctx.cfg.data.num_workers,
            "collate_fn": text_collate(self.tokenizer),
        }
        dataset = TextDataset(texts)
        if not cache:
            return encode(ctx.trainer, self.model, dataset, "text", **kwargs)[0]
        key = self.key(ctx, "text", texts)
        return encode_cached(ctx.cache, key, ctx.trainer, self.model, dataset, "text", **kwargs)[0]

    def logit_scale(self, override: float | None = None) -> float:
        """``override``, else the model's ``exp(logit_scale)`` (100 for OpenAI CLIP)."""
        if override is not None:
            return float(override)
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            raise ValueError(
                f"backbone {self.name} has no logit_scale; set evaluator.logit_scale (100 is "
                "OpenAI CLIP's)"
            )
        return float(torch.as_tensor(scale).detach().float().exp())


def backbone_config(run_cfg: DictConfig, name: str) -> Any:
    """``conf/backbone/<name>.yaml`` validated, its interpolations (``${paths...}``) resolved
    against the run config."""
    from xmodal.backbones import list_backbones
    from xmodal.backbones.config import as_config
    from xmodal.config import conf_dir

    path = Path(conf_dir()) / "backbone" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no backbone config {path}; available: {', '.join(list_backbones())}"
        )
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    root = OmegaConf.create({"paths": OmegaConf.to_container(run_cfg.paths, resolve=True)})
    root["_backbone"] = node
    OmegaConf.resolve(root)
    return as_config(root["_backbone"])


def build_classifier(
    ctx: EvalContext,
    encoder: Encoder,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot weights ``[C, D]``: per class, the normalised mean of its normalised prompt
    embeddings (CLIP / CLIP_benchmark)."""
    prompts = class_prompts(classnames, templates)
    emb = F.normalize(encoder.texts(ctx, prompts, batch_size).float(), dim=-1)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def classification_split(ctx: EvalContext, evaluator: str) -> ClassificationSplit:
    """The run's dataset, which must be a classification test set (ImageNet*, CoOp)."""
    from xmodal.evaluators.base import dataset_split

    what = "a classification dataset (imagenet*, the CoOp sets or their shapes_* copies)"
    return dataset_split(ctx, ClassificationSplit, evaluator, what)


def image_logits(
    ctx: EvalContext,
    encoder: Encoder,
    split: ClassificationSplit,
    classifier: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C], valid [N])``: ``scale * normalize(f_I(x)) @ W^T`` for every image."""
    emb, valid = encoder.images(ctx, split.image_paths)
    return scale * F.normalize(emb.float(), dim=-1) @ classifier.T, valid


class ZeroShotEvaluator:
    """Encode the test images (cached) and classify them against the class-prompt classifier."""

    def __init__(
        self,
        templates: str | Sequence[str] = DEFAULT_TEMPLATES,
        logit_scale: float | None = None,
        cache: bool = True,
    ) -> None:
        check_templates(templates)  # a bad template or name fails at instantiation
        self.templates = templates if isinstance(templates, str) else list(templates)
        self.logit_scale = logit_scale
        self.use_cache = cache

    def evaluate(self, ctx: EvalContext) -> dict[str, Any]:
        from xmodal.metrics.classification import mean_per_class_recall, topk_accuracy

        split = classification_split(ctx, "zeroshot")
        ctx.cache.enabled = ctx.cache.enabled and self.use_cache
        encoder = Encoder.of_run(ctx)
        templates = resolve_templates(self.templates, ctx.cfg.data.get("dataset"))
        classifier = build_classifier(ctx, encoder, split.classnames, templates)
        logits, valid = image_logits(
            ctx, encoder, split, classifier, encoder.logit_scale(self.logit_scale)
        )
        labels = torch.tensor(split.labels)[valid]
        logits = logits[valid]
        num_classes = len(split.classnames)
        ks = (1, 5) if num_classes >= 5 else (1,)
        acc = topk_accuracy(logits, labels, ks)
        out: dict[str, Any] = {f"test/acc{k}": 100.0 * v for k, v in acc.items()}
        out["test/mean_per_class_recall"] = 100.0 * mean_per_class_recall(
            logits.argmax(dim=1), labels, num_classes
        )
        out.update(
            {
                "test/num_templates": len(templates),
                "test/num_samples": int(valid.sum()),
                "test/num_classes": num_classes,
                "test/skipped_images": int((~valid).sum()),
            }
        )
        return out
