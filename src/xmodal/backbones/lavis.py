"""Key converters between LAVIS (Salesforce's BLIP / BLIP-2 code) and transformers' BLIP models.

Most BLIP-2 CIR work, HUG's released code included, loads LAVIS checkpoints
(`blip2_pretrained.pth`: `visual_encoder.*` EVA ViT-g, `ln_vision.*`, `Qformer.bert.*`,
`query_tokens`, `vision_proj`, `text_proj`, `itm_head`); BLIP-1 work loads LAVIS / BLIP
checkpoints (`model_base_capfilt_large.pth`: `visual_encoder.*` ViT-B/16, `text_encoder.*`
BERT). xmodal builds both with transformers (`Blip2ForImageTextRetrieval`,
`BlipForImageTextRetrieval`), whose names differ. The tables below map one naming onto the other,
both ways (one table per model, read in either direction), following transformers' own conversion
scripts:

- the EVA ViT's `attn.q_bias` and `attn.v_bias` become the `qkv` bias [q; 0; v] (LAVIS has no
  key bias). Back to LAVIS the key part is dropped: a key bias adds q.b_k to every logit of a
  query's softmax row, a constant that the softmax cancels, so the outputs are unchanged;
- Q-Former attention blocks `attention.self.*` are `attention.attention.*` in transformers;
- what only LAVIS training uses (ITC temperature `temp`, the Q-Former's LM head `Qformer.cls.*`,
  BLIP's momentum encoders `*_m`, feature queues and text decoder) is not backbone weight: the
  converters return those keys as ignored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import torch
from torch import Tensor

#: Each rule is a pair of names (LAVIS, transformers) with the same ``{slots}``; it maps a key
#: either way. A slot matches the pattern of ``SLOTS``.
Rule = tuple[str, str]
SLOTS = {
    "n": r"\d+",  # a layer number
    "k": r"[12]",  # layer_norm1 / layer_norm2
    "p": r"\w+",  # a parameter (weight, bias)
    "fc": r"fc[12]",
    "emb": r"word|position",
    "att": r"attention|crossattention",
    "rest": r".+",
}

# The ViT of both BLIP generations (LAVIS' `visual_encoder`, after timm).
VIT: list[Rule] = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual_encoder.blocks.{n}.norm{k}.{p}", "vision_model.encoder.layers.{n}.layer_norm{k}.{p}"),
    ("visual_encoder.blocks.{n}.attn.qkv.{p}", "vision_model.encoder.layers.{n}.self_attn.qkv.{p}"),
    (
        "visual_encoder.blocks.{n}.attn.proj.{p}",
        "vision_model.encoder.layers.{n}.self_attn.projection.{p}",
    ),
    ("visual_encoder.blocks.{n}.mlp.{fc}.{p}", "vision_model.encoder.layers.{n}.mlp.{fc}.{p}"),
]
# BLIP-2: the EVA ViT-g, its `ln_vision`, the Q-Former and the ITC/ITM heads
# (Blip2ForImageTextRetrieval). The ViT's q/v biases are handled apart (module docstring).
BLIP2: list[Rule] = [
    *VIT,
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    ("Qformer.bert.embeddings.{emb}_embeddings.weight", "embeddings.{emb}_embeddings.weight"),
    (
        "Qformer.bert.encoder.layer.{n}.{att}.self.{rest}",
        "qformer.encoder.layer.{n}.{att}.attention.{rest}",
    ),
    ("Qformer.bert.encoder.{rest}", "qformer.encoder.{rest}"),
    ("query_tokens", "query_tokens"),
    ("vision_proj.{p}", "vision_projection.{p}"),
    ("text_proj.{p}", "text_projection.{p}"),
    ("itm_head.{p}", "itm_head.{p}"),
]
BLIP2_LAVIS_ONLY = re.compile(r"temp$|Qformer\.cls\.|Qformer\.bert\.embeddings\.position_ids$")
_QKV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias")
_HF_QKV_BIAS = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias")

# BLIP-1: the ViT-B/16, its final norm, the BERT text encoder and the ITC/ITM heads
# (BlipForImageTextRetrieval).
BLIP: list[Rule] = [
    *VIT,
    ("visual_encoder.norm.{p}", "vision_model.post_layernorm.{p}"),
    ("text_encoder.{rest}", "text_encoder.{rest}"),
    ("vision_proj.{p}", "vision_proj.{p}"),
    ("text_proj.{p}", "text_proj.{p}"),
    ("itm_head.{p}", "itm_head.{p}"),
]
BLIP_LAVIS_ONLY = re.compile(
    r"temp$|\w+_m\.|(image|text|idx|ptr)_queue$|text_decoder\.|text_encoder\.embeddings\.position_ids$"
)

#: A key that only a LAVIS checkpoint of the kind has, and what follows it in the checkpoint.
LAVIS_ANCHORS = {
    "blip2": "Qformer.bert.embeddings.LayerNorm.weight",
    "blip": "visual_encoder.blocks.0.attn.qkv.weight",
}


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    """``visual_encoder.blocks.{n}.norm{k}.{p}`` as a regex with one named group per slot."""
    parts = re.split(r"\{(\w+)\}", template)  # text, slot, text, slot, ..., text
    regex = "".join(
        f"(?P<{part}>{SLOTS[part]})" if i % 2 else re.escape(part) for i, part in enumerate(parts)
    )
    return re.compile(regex)


def _rename(key: str, rules: list[Rule], to_lavis: bool = False) -> str | None:
    """``key`` renamed by the first rule that matches it (LAVIS -> transformers, or back)."""
    for lavis, hf in rules:
        source, target = (hf, lavis) if to_lavis else (lavis, hf)
        match = _pattern(source).fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


def lavis_prefix(state: Mapping[str, Tensor], kind: str) -> str | None:
    """The prefix under which a state dict holds a LAVIS model of `kind` ("" for LAVIS' own
    files, "blip_backbone.blip_model." for HUG's released checkpoints), or None."""
    anchor = LAVIS_ANCHORS[kind]
    for key in state:
        if key.endswith(anchor) and (key == anchor or key[: -len(anchor)].endswith(".")):
            prefix = key[: -len(anchor)]
            if (
                kind == "blip"
                and f"{prefix}text_encoder.embeddings.word_embeddings.weight" not in state
            ):
                continue  # a BLIP-2 EVA ViT has the same block names
            if kind == "blip" and f"{prefix}Qformer.bert.embeddings.LayerNorm.weight" in state:
                continue
            return prefix
    return None


def from_lavis(state: Mapping[str, Tensor], kind: str) -> tuple[dict[str, Tensor], list[str]]:
    """A LAVIS state dict (under its `lavis_prefix`) in transformers' names: (converted, ignored).

    Ignored: the keys outside the prefix (e.g. HUG's uncertainty heads) and LAVIS-only training
    state. Keys no rule knows are kept as they are, so loading reports them as unexpected.
    """
    prefix = lavis_prefix(state, kind) or ""
    rules, lavis_only = (BLIP2, BLIP2_LAVIS_ONLY) if kind == "blip2" else (BLIP, BLIP_LAVIS_ONLY)
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    qv: dict[str, dict[str, Tensor]] = {}
    for full_key, value in state.items():
        if not full_key.startswith(prefix):
            ignored.append(full_key)
            continue
        key = full_key[len(prefix) :]
        if lavis_only.match(key):
            ignored.append(full_key)
            continue
        bias = _QKV_BIAS.fullmatch(key) if kind == "blip2" else None
        if bias:
            qv.setdefault(bias.group(1), {})[bias.group(2)] = value
            continue
        out[_rename(key, rules) or key] = value
    for layer, parts in qv.items():  # the EVA ViT's q and v biases: the qkv bias [q; 0; v]
        q, v = parts["q"], parts["v"]
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat(
            [q, torch.zeros_like(v), v]
        )
    return out, ignored


def to_lavis(state: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """transformers' names back to LAVIS' (for writing LAVIS-format files in tests and
    `make rehearse`). The EVA ViT's key bias is dropped: see the module docstring."""
    rules = BLIP2 if kind == "blip2" else BLIP
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        bias = _HF_QKV_BIAS.fullmatch(key) if kind == "blip2" else None
        if bias:
            q, _, v = value.chunk(3)
            out[f"visual_encoder.blocks.{bias.group(1)}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{bias.group(1)}.attn.v_bias"] = v
            continue
        renamed = _rename(key, rules, to_lavis=True)
        if renamed is None:
            raise KeyError(f"no LAVIS name for {key!r}")
        out[renamed] = value
    return out
