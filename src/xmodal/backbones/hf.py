"""What the transformers-based kinds (BLIP-2, BLIP) share: architecture specs, tokenizers,
reading their weights, and the ViT precision of LAVIS.

An architecture spec is a JSON file of `model_configs/` (e.g. `blip2-itm-vit-g.json`): the
transformers config (`hf_config`), the tokenizer (`tokenizer`: a hub id such as bert-base-uncased
plus the special tokens BLIP adds, or `vocab_file` for the offline tiny models), the default text
length and where the original LAVIS weights are downloaded.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.backbones import lavis
from xmodal.backbones.config import (
    MODEL_CONFIG_DIR,
    BackboneConfig,
    WeightsMismatchError,
    check_saved_config,
    hub_cache,
    hub_download_command,
    is_offline,
    offline_error,
)
from xmodal.backbones.weights import FOLDER_WEIGHTS, Weights, locate, read_file, read_folder
from xmodal.errors import ConfigError

log = logging.getLogger("xmodal")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt")
HUB_FALLBACK = ("*.json", "*.bin", "*.txt")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def load_spec(cfg: BackboneConfig, config_key: str) -> dict[str, Any]:
    """The architecture spec named by `cfg.arch`: a `model_configs/<arch>.json` file, or a folder
    holding a transformers config.json (its tokenizer files then come from that folder)."""
    spec_file = MODEL_CONFIG_DIR / f"{cfg.arch}.json"
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        if config_key not in spec:
            raise ConfigError(f"backbone.arch={cfg.arch} is not a {cfg.kind} architecture.")
        return spec
    folder = Path(cfg.arch).expanduser()
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return {config_key: config, "tokenizer_dir": str(folder.resolve())}
    known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    named = [n for n in known if _hub_id(n) == cfg.arch]
    if named:
        raise ConfigError(
            f"backbone.arch={cfg.arch} is a hub id: the architecture is named by a spec file and "
            f"the weights by backbone.pretrained. Fix: set backbone.arch={named[0]} "
            f"backbone.pretrained={cfg.arch} (or null for random weights)."
        )
    raise ConfigError(
        f"Unknown {cfg.kind} architecture backbone.arch={cfg.arch!r}: expected one of "
        f"{', '.join(known)} (src/xmodal/backbones/model_configs/) or a folder with a "
        "transformers config.json."
    )


def check_config(cfg: BackboneConfig, config_key: str, default_size: int) -> dict[str, Any]:
    """The architecture spec of a BLIP or BLIP-2 backbone, after the checks that need no
    weights (no QuickGELU, a supported precision, the ViT's own input size)."""
    if cfg.quick_gelu:
        raise ConfigError(
            f"backbone.quick_gelu is for open_clip only; set it to false for {cfg.kind}."
        )
    if cfg.precision not in DTYPES:
        raise ConfigError(f"backbone.precision={cfg.precision!r}: {cfg.kind} takes {list(DTYPES)}.")
    spec = load_spec(cfg, config_key)
    size = spec[config_key].get("vision_config", {}).get("image_size", default_size)
    if cfg.image_size not in (None, size):
        raise ConfigError(
            f"backbone.image_size={cfg.image_size} but the {cfg.arch} ViT takes {size} px; "
            f"set backbone.image_size={size} (or null)."
        )
    return spec


def _hub_id(spec_name: str) -> str | None:
    spec = json.loads((MODEL_CONFIG_DIR / f"{spec_name}.json").read_text(encoding="utf-8"))
    return spec.get("hub_id")


def shape_fields(config: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The parts of a transformers BLIP/BLIP-2 config that decide the weights' shapes (read
    through transformers' config class, which fills in defaults and derived sizes)."""
    from transformers import Blip2Config, BlipConfig

    config_class, subs = (
        (Blip2Config, ("vision_config", "qformer_config"))
        if kind == "blip2"
        else (BlipConfig, ("vision_config", "text_config"))
    )
    fields = {k: v for k, v in config.items() if k not in ("architectures", "_comment")}
    config = config_class(**fields).to_dict()
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "vocab_size",
        "max_position_embeddings",
        "cross_attention_frequency",
        "encoder_hidden_size",
    )
    out: dict[str, Any] = {}
    for top in ("num_query_tokens", "image_text_hidden_size"):
        if top in config:
            out[top] = config[top]
    for sub in subs:
        if sub in config:
            out[sub] = {k: config[sub][k] for k in keys if k in config[sub]}
    return out


def resolve(cfg: BackboneConfig, spec: dict[str, Any], config_key: str) -> Weights:
    """Settle the weights of a BLIP/BLIP-2 backbone: located, read, converted from LAVIS names,
    checked against the architecture."""
    weights = locate(cfg, hub_patterns=HUB_PATTERNS)
    if weights.random:
        return weights
    assert weights.path is not None
    has_weights = any((weights.path / n).is_file() for n in FOLDER_WEIGHTS)
    if weights.source == "hub" and not has_weights:
        if not is_offline():  # a repo with .bin weights only
            weights.path = locate(cfg, hub_patterns=HUB_FALLBACK).path
    if weights.path.is_dir():
        state, config, name = read_folder(weights.path)
        if name != "config.json":
            raise ConfigError(
                f"{weights.label} holds an {name}, not a transformers {cfg.kind} model "
                "(config.json). Fix: point backbone.pretrained at weights of this kind."
            )
        ours, theirs = shape_fields(spec[config_key], cfg.kind), shape_fields(config, cfg.kind)
        if ours != theirs:
            raise WeightsMismatchError(
                f"{weights.label} holds another architecture than backbone.arch={cfg.arch}: its "
                f"config.json has {theirs}, the arch has {ours}. Fix: set backbone.arch to the "
                "architecture of these weights (or to the folder itself)."
            )
        weights.state_dict, weights.fmt, weights.model_config = (
            state,
            "save_pretrained folder",
            config,
        )
        if any((weights.path / n).is_file() for n in TOKENIZER_FILES):
            weights.tokenizer_dir = weights.path
        return weights
    state, weights.meta, weights.fmt = read_file(weights.path)
    if weights.meta is not None:
        check_saved_config(weights.path, weights.meta, cfg)
        weights.preprocess = dict(weights.meta.get("preprocess") or {})
    elif lavis.lavis_prefix(state, cfg.kind) is not None:
        prefix = lavis.lavis_prefix(state, cfg.kind)
        state, weights.ignored = lavis.from_lavis(state, cfg.kind)
        weights.fmt = (
            f"LAVIS {cfg.kind.upper()} checkpoint"
            if not prefix
            else f"LAVIS {cfg.kind.upper()} weights under '{prefix}' (e.g. HUG's checkpoint)"
        )
    weights.state_dict = state
    return weights


# -- tokenizers --------------------------------------------------------------------------------


def tiny_tokenizer(vocab_file: Path) -> Any:
    """An offline lowercase BERT WordPiece tokenizer over the shapes-world vocabulary."""
    words = vocab_file.read_text(encoding="utf-8").splitlines()
    return _wordpiece(words)


def _wordpiece(words: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

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


def placeholder_tokenizer(vocab_size: int, spec: Mapping[str, Any]) -> Any:
    """A WordPiece tokenizer with `vocab_size` ids (the shapes-world words, fillers, then the
    spec's special tokens), for random-weight models whose real tokenizer is not here."""
    words = (MODEL_CONFIG_DIR / "xmodal-tiny-blip2-vocab.txt").read_text(encoding="utf-8").split()
    added = [t for t in spec.get("additional_special_tokens", []) if t not in words]
    base = vocab_size - len(added)
    words += [f"[unused{i}]" for i in range(base - len(words))]
    return _add_specials(_wordpiece(words[:base]), spec)


def _add_specials(tok: Any, spec: Mapping[str, Any]) -> Any:
    """BLIP's special tokens on top of bert-base-uncased: bos [DEC] (and [ENC] for BLIP-1)."""
    special: dict[str, Any] = {}
    if spec.get("bos_token"):
        special["bos_token"] = spec["bos_token"]
    if spec.get("additional_special_tokens"):
        special["additional_special_tokens"] = list(spec["additional_special_tokens"])
    if special:
        tok.add_special_tokens(special)
    return tok


def tokenizer(cfg: BackboneConfig, spec: dict[str, Any], weights: Weights, vocab_size: int) -> Any:
    """The model's tokenizer: the offline tiny vocabulary, the weights' own folder, or the spec's
    hub tokenizer (e.g. bert-base-uncased + BLIP's special tokens) from the cache."""
    from transformers import AutoTokenizer

    if "vocab_file" in spec:
        return tiny_tokenizer(MODEL_CONFIG_DIR / spec["vocab_file"])
    folder = weights.tokenizer_dir or spec.get("tokenizer_dir")
    if folder and any((Path(folder) / n).is_file() for n in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    name = spec.get("tokenizer", "bert-base-uncased")
    offline = is_offline()
    try:
        tok = AutoTokenizer.from_pretrained(name, cache_dir=cfg.cache_dir, local_files_only=offline)
    except OSError:
        if weights.random:
            warnings.warn(
                f"The tokenizer {name} is not on this machine; the random-weight {cfg.arch} uses "
                f"a placeholder vocabulary of {vocab_size} ids (right shapes, meaningless text). "
                f"Pre-fetch it with `{hub_download_command(name, cfg.cache_dir)}`.",
                stacklevel=2,
            )
            return placeholder_tokenizer(vocab_size, spec)
        if offline:
            how = hub_download_command(name, cfg.cache_dir)
            raise offline_error(
                f"the tokenizer {name} of {cfg.arch}", hub_cache(cfg.cache_dir), how
            ) from None
        raise
    return _add_specials(tok, spec)


class TextTokenizer:
    """`tokenizer(texts) -> {"input_ids": [B, L], "attention_mask": [B, L]}`, L = context_length.

    Pads to a fixed length so per-sample tokenisation collates into batches.
    """

    def __init__(self, hf_tokenizer: Any, context_length: int) -> None:
        self.tokenizer = hf_tokenizer
        self.context_length = context_length
        self.pad_token_id = hf_tokenizer.pad_token_id

    def __call__(self, texts: str | list[str] | tuple[str, ...]) -> dict[str, Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def check_vocab(cfg: BackboneConfig, tok: Any, embeddings: nn.Embedding) -> None:
    if len(tok) > embeddings.num_embeddings:
        raise WeightsMismatchError(
            f"backbone {cfg.name}: the tokenizer has {len(tok)} ids but the model's word "
            f"embeddings only {embeddings.num_embeddings}. Fix: use the tokenizer of these weights."
        )


# -- precision ---------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm that keeps fp32 parameters and computes in fp32, returning the input's dtype
    (LAVIS' `LayerNorm` of BLIP-2)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def cast_vit(vit: nn.Module, precision: str) -> None:
    """Cast a frozen ViT to `precision` as LAVIS does: Linear/Conv weights in fp16/bf16,
    LayerNorms (and the class/position embeddings) kept in fp32, LayerNorms computed in fp32."""
    dtype = DTYPES[precision]
    if dtype == torch.float32:
        return
    for module in vit.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            module.to(dtype)
        elif isinstance(module, nn.LayerNorm):
            module.float()
            module.__class__ = FP32LayerNorm


def vit_dtype(vit: nn.Module) -> torch.dtype:
    """The dtype the ViT's inputs must have: that of its first conv/linear weight."""
    for module in vit.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module.weight.dtype
    return torch.float32
