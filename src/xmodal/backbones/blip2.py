"""BLIP-2 backbone: a frozen ViT + the text-capable Q-Former, through transformers.

`Blip2QFormer` exposes the three Q-Former passes that HUG needs (image-only, joint query+text with
cross-attention to the image, text-only) and the ITC projections as `encode_image`/`encode_text`,
so the CLIP-style retrieval evaluators run on BLIP-2 unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms

from xmodal.backbones.config import (
    MODEL_CONFIG_DIR,
    BackboneConfig,
    check_saved_config,
    hub_cache,
    hub_download_command,
    is_offline,
    offline_error,
    read_checkpoint,
)

TINY_ARCH = "xmodal-tiny-blip2"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP-2 / LAVIS eval normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CONTEXT_LENGTH = 77  # HUG's max_len for the real model


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
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        out = self.vision_model(pixel_values=pixel_values.to(dtype))
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


class Blip2Tokenizer:
    """`tokenizer(texts) -> {"input_ids": [B, L], "attention_mask": [B, L]}`, L = context_length.

    Pads to a fixed length so per-sample tokenisation collates into batches.
    """

    def __init__(self, hf_tokenizer: Any, context_length: int) -> None:
        self.tokenizer = hf_tokenizer
        self.context_length = context_length
        self.pad_token_id = hf_tokenizer.pad_token_id

    def __call__(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def tiny_tokenizer(vocab_file: Path) -> Any:
    """An offline lowercase BERT WordPiece tokenizer over the shapes-world vocabulary."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    words = vocab_file.read_text(encoding="utf-8").splitlines()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )


def _build_tiny() -> tuple[nn.Module, Any, int]:
    """Random-init tiny BLIP-2 from `model_configs/xmodal-tiny-blip2.json` (offline, < 2 s)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    spec = json.loads((MODEL_CONFIG_DIR / f"{TINY_ARCH}.json").read_text(encoding="utf-8"))
    hf_tokenizer = tiny_tokenizer(MODEL_CONFIG_DIR / spec["vocab_file"])
    kwargs = spec["blip2_config"]
    kwargs["qformer_config"]["vocab_size"] = len(hf_tokenizer)
    model = Blip2ForImageTextRetrieval(Blip2Config(**kwargs))
    std = model.config.qformer_config.initializer_range
    nn.init.normal_(model.query_tokens, std=std)  # BLIP-2's init; HF zero-inits (identical queries)
    return model, hf_tokenizer, spec["context_length"]


def _build_hf(arch: str, cache_dir: str | None) -> tuple[nn.Module, Any]:
    """`Blip2ForImageTextRetrieval` + tokenizer from the Hugging Face cache (download if online)."""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    offline = is_offline()
    try:
        model = Blip2ForImageTextRetrieval.from_pretrained(
            arch, cache_dir=cache_dir, local_files_only=offline
        )
        hf_tokenizer = AutoTokenizer.from_pretrained(
            arch, cache_dir=cache_dir, local_files_only=offline
        )
    except OSError as err:
        if not offline:
            raise
        how = hub_download_command(arch, cache_dir)
        raise offline_error(f"BLIP-2 weights {arch}", hub_cache(cache_dir), how) from err
    return model, hf_tokenizer


def build_blip2(cfg: BackboneConfig) -> tuple[nn.Module, transforms.Compose, Blip2Tokenizer]:
    """Build (Blip2QFormer in eval mode, eval preprocess, tokenizer) for a BLIP-2 backbone."""
    if cfg.quick_gelu:
        raise ValueError("backbone.quick_gelu is for open_clip only; set it to false for blip2.")
    if cfg.precision not in DTYPES:
        raise ValueError(f"backbone.precision={cfg.precision!r}: blip2 takes {list(DTYPES)}.")
    if cfg.arch == TINY_ARCH:
        hf_model, hf_tokenizer, context_length = _build_tiny()
    else:
        hf_model, hf_tokenizer = _build_hf(cfg.arch, cfg.cache_dir)
        context_length = DEFAULT_CONTEXT_LENGTH
    model = Blip2QFormer(hf_model)

    saved_preprocess: dict[str, Any] = {}
    if cfg.pretrained:
        path = Path(cfg.pretrained).expanduser()
        state_dict, meta = read_checkpoint(path)  # raises FileNotFoundError naming the file
        if meta is not None:
            check_saved_config(path, meta, cfg)
            saved_preprocess = dict(meta.get("preprocess") or {})
        model.load_state_dict(state_dict, strict=True)
    model.vision_model.to(DTYPES[cfg.precision])  # the Q-Former stays fp32, as in BLIP-2

    size = model.config.vision_config.image_size
    if cfg.image_size not in (None, size):
        raise ValueError(
            f"backbone.image_size={cfg.image_size} but the {cfg.arch} ViT takes {size} px; "
            f"set backbone.image_size={size} (or null)."
        )
    mean = list(cfg.image_mean or saved_preprocess.get("mean") or CLIP_MEAN)
    std = list(cfg.image_std or saved_preprocess.get("std") or CLIP_STD)
    model.preprocess_cfg = {"size": size, "mean": mean, "std": std, "interpolation": "bicubic"}
    preprocess = transforms.Compose(
        [
            transforms.Lambda(_to_rgb),
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ]
    )
    tokenizer = Blip2Tokenizer(hf_tokenizer, cfg.context_length or context_length)
    return model.eval(), preprocess, tokenizer


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB")
