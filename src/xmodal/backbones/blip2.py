"""BLIP-2 backbone: a frozen ViT + the text-capable Q-Former, through transformers.

`Blip2QFormer` exposes the three Q-Former passes that HUG needs (image-only, joint query+text with
cross-attention to the image, text-only) and the ITC projections as `encode_image`/`encode_text`,
so the CLIP-style retrieval evaluators run on BLIP-2 unchanged.

Architectures are spec files (`model_configs/blip2-itm-vit-g.json`, `xmodal-tiny-blip2.json`);
weights follow the one rule of `BackboneConfig.pretrained`: random, a hub id
(Salesforce/blip2-itm-vit-g), a save_pretrained folder, an xmodal checkpoint, or LAVIS'
`blip2_pretrained.pth` / HUG's released checkpoint (converted by `xmodal.backbones.lavis`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.backbones import hf
from xmodal.backbones import preprocess as pre
from xmodal.backbones.config import BackboneConfig
from xmodal.backbones.weights import Weights, construction, load_checked

CONFIG_KEY = "blip2_config"
DEFAULT_CONTEXT_LENGTH = 77  # HUG's max_len for the real model
Blip2Tokenizer = hf.TextTokenizer  # the name earlier code imports


class Blip2QFormer(nn.Module):
    """The parts of `Blip2ForImageTextRetrieval` that retrieval methods use, with named passes.

    Submodule names equal the Hugging Face ones, so state dicts are interchangeable. The vision
    encoder is frozen (no trainable parameters, always in eval mode); the Q-Former, its text
    embeddings, the query tokens [1, K, H] and the ITC/ITM heads stay trainable.
    """

    def __init__(self, retrieval_model: nn.Module) -> None:
        super().__init__()
        self.config = retrieval_model.config
        self.vision_model = retrieval_model.vision_model.requires_grad_(False).eval()
        self.query_tokens = retrieval_model.query_tokens
        self.embeddings = retrieval_model.embeddings
        self.qformer = retrieval_model.qformer
        self.vision_projection = retrieval_model.vision_projection
        self.text_projection = retrieval_model.text_projection
        self.itm_head = retrieval_model.itm_head
        self.preprocess_cfg: dict[str, Any] = {}  # set by build_blip2, saved in checkpoints

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.query_tokens.shape[2]

    def train(self, mode: bool = True) -> Blip2QFormer:
        """Switch the trainable parts only: the frozen ViT stays in eval mode."""
        super().train(mode)
        self.vision_model.eval()
        return self

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """Frozen ViT patch features after its final layernorm: [B, N, H_vision]."""
        out = self.vision_model(pixel_values=pixel_values.to(hf.vit_dtype(self.vision_model)))
        return out.last_hidden_state

    def _ones(self, x: Tensor) -> Tensor:
        return torch.ones(x.shape[:2], dtype=torch.long, device=x.device)

    def query_image(self, image_embeds: Tensor) -> Tensor:
        """Image-only pass: the query tokens cross-attend to the image, no text: [B, K, H]."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self._ones(image_embeds),
        )
        return out.last_hidden_state

    def query_text_image(
        self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor | None
    ) -> Tensor:
        """Joint pass (BLIP-2 ITM): queries and text attend to each other: [B, K, H].

        Only the queries cross-attend to the image. With `image_embeds=None` the cross-attention
        sub-blocks are skipped (HUG's "no image" text+query mode). Returns the query positions.
        """
        k = self.num_query_tokens
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([self._ones(queries), attention_mask.to(torch.long)], dim=1)
        if image_embeds is None:
            with self._without_cross_attention():
                out = self.qformer(query_embeds=embeds, query_length=k, attention_mask=mask)
        else:
            out = self.qformer(
                query_embeds=embeds,
                query_length=k,
                attention_mask=mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=self._ones(image_embeds),
            )
        return out.last_hidden_state[:, :k]

    def text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text-only pass (BLIP-2 ITC text side): no queries, no image: [B, L, H]."""
        embeds = self.embeddings(input_ids=input_ids)
        out = self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask)
        return out.last_hidden_state

    def encode_image_queries(self, pixel_values: Tensor) -> Tensor:
        """ITC image side: L2-normalised projection of every query output: [B, K, D].

        BLIP-2 scores a text against an image by the max over queries of the cosine; use this
        for that exact score, `encode_image` for one vector per image.
        """
        queries = self.query_image(self.image_embeds(pixel_values))
        return F.normalize(self.vision_projection(queries), dim=-1)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """One ITC vector per image, the mean of the normalised query projections: [B, D]."""
        return self.encode_image_queries(pixel_values).mean(dim=1)

    def encode_text(self, tokens: Mapping[str, Tensor] | Tensor) -> Tensor:
        """ITC text side: projection of the [CLS] output of the text-only pass: [B, D].

        Accepts the tokenizer's dict or bare input ids (padding = id 0 is masked).
        """
        input_ids, attention_mask = _ids_and_mask(tokens, self.embeddings.word_embeddings)
        return self.text_projection(self.text(input_ids, attention_mask)[:, 0])

    @contextlib.contextmanager
    def _without_cross_attention(self) -> Iterator[None]:
        layers = [layer for layer in self.qformer.encoder.layer if layer.has_cross_attention]
        for layer in layers:
            layer.has_cross_attention = False
        try:
            yield
        finally:
            for layer in layers:
                layer.has_cross_attention = True


def _ids_and_mask(tokens: Mapping[str, Tensor] | Tensor, emb: nn.Embedding) -> tuple[Tensor, ...]:
    device = emb.weight.device
    if isinstance(tokens, Tensor):
        pad = emb.padding_idx if emb.padding_idx is not None else 0
        return tokens.to(device), (tokens != pad).long().to(device)
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


def check_config(cfg: BackboneConfig) -> dict[str, Any]:
    """The architecture spec, after the checks that need no weights."""
    return hf.check_config(cfg, CONFIG_KEY, default_size=224)


def resolve(cfg: BackboneConfig) -> tuple[dict[str, Any], Weights]:
    """(architecture spec, weights) of a BLIP-2 backbone, checked; nothing built yet."""
    spec = check_config(cfg)
    return spec, hf.resolve(cfg, spec, CONFIG_KEY)


def hf_model(config: Mapping[str, Any]) -> nn.Module:
    """A random-init `Blip2ForImageTextRetrieval` of a config dict, with BLIP-2's query init."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval(Blip2Config(**config))
    std = model.config.qformer_config.initializer_range
    nn.init.normal_(model.query_tokens, std=std)  # BLIP-2's init; HF zero-inits (identical queries)
    return model


def build(
    cfg: BackboneConfig, spec: dict[str, Any], weights: Weights
) -> tuple[nn.Module, Callable, Callable]:
    """Build (Blip2QFormer in eval mode, eval preprocess, tokenizer) from resolved weights."""
    config = dict(weights.model_config or spec[CONFIG_KEY])
    config.pop("architectures", None)
    with construction(weights):
        model = Blip2QFormer(hf_model(config))
    if not weights.random:
        load_checked(model, weights, f"blip2 arch {cfg.arch}")
    hf.cast_vit(model.vision_model, cfg.precision)  # the Q-Former stays fp32, as in BLIP-2
    tok = hf.tokenizer(cfg, spec, weights, model.embeddings.word_embeddings.num_embeddings)
    hf.check_vocab(cfg, tok, model.embeddings.word_embeddings)

    size = model.config.vision_config.image_size
    saved = weights.preprocess
    mean = list(cfg.image_mean or saved.get("mean") or pre.CLIP_MEAN)
    std = list(cfg.image_std or saved.get("std") or pre.CLIP_STD)
    model.preprocess_cfg = {"size": size, "mean": mean, "std": std, "interpolation": "bicubic"}
    preprocess = pre.blip_eval_transform(size, mean, std, cfg)
    length = cfg.context_length or spec.get("context_length", DEFAULT_CONTEXT_LENGTH)
    return model.eval(), preprocess, hf.TextTokenizer(tok, length)
