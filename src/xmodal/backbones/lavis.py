"""Key converters between LAVIS (Salesforce's BLIP / BLIP-2 code) and transformers' BLIP models.

Most BLIP-2 CIR work, HUG's released code included, loads LAVIS checkpoints
(`blip2_pretrained.pth`: `visual_encoder.*` EVA ViT-g, `ln_vision.*`, `Qformer.bert.*`,
`query_tokens`, `vision_proj`, `text_proj`, `itm_head`); BLIP-1 work loads LAVIS / BLIP
checkpoints (`model_base_capfilt_large.pth`: `visual_encoder.*` ViT-B/16, `text_encoder.*`
BERT). xmodal builds both with transformers (`Blip2ForImageTextRetrieval`,
`BlipForImageTextRetrieval`), whose names differ. The tables below map one naming onto the other,
both ways, following transformers' own conversion scripts:

- the EVA ViT's `attn.q_bias` and `attn.v_bias` become the `qkv` bias [q; 0; v] (LAVIS has no
  key bias). Back to LAVIS the key part is dropped: a key bias adds q.b_k to every logit of a
  query's softmax row, a constant that the softmax cancels, so the outputs are unchanged;
- Q-Former attention blocks `attention.self.*` are `attention.attention.*` in transformers;
- what only LAVIS training uses (ITC temperature `temp`, the Q-Former's LM head `Qformer.cls.*`,
  BLIP's momentum encoders `*_m`, feature queues and text decoder) is not backbone weight: the
  converters return those keys as ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

Rules = list[tuple[str, str]]

# LAVIS BLIP-2 name -> transformers Blip2ForImageTextRetrieval name (regex, replacement).
BLIP2_FROM_LAVIS: Rules = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(\w+)", r"vision_model.embeddings.patch_embedding.\1"),
    (
        r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(\w+)",
        r"vision_model.encoder.layers.\1.layer_norm\2.\3",
    ),  # noqa: E501
    (
        r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight",
        r"vision_model.encoder.layers.\1.self_attn.qkv.weight",
    ),  # noqa: E501
    (
        r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(\w+)",
        r"vision_model.encoder.layers.\1.self_attn.projection.\2",
    ),  # noqa: E501
    (
        r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)",
        r"vision_model.encoder.layers.\1.mlp.\2.\3",
    ),  # noqa: E501
    (r"ln_vision\.(\w+)", r"vision_model.post_layernorm.\1"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(\w+)", r"qformer.layernorm.\1"),
    (
        r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight",
        r"embeddings.\1_embeddings.weight",
    ),  # noqa: E501
    (
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(.+)",
        r"qformer.encoder.layer.\1.\2.attention.\3",
    ),  # noqa: E501
    (r"Qformer\.bert\.encoder\.(.+)", r"qformer.encoder.\1"),
    (r"query_tokens", "query_tokens"),
    (r"vision_proj\.(\w+)", r"vision_projection.\1"),
    (r"text_proj\.(\w+)", r"text_projection.\1"),
    (r"itm_head\.(\w+)", r"itm_head.\1"),
]
BLIP2_TO_LAVIS: Rules = [
    (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(\w+)", r"visual_encoder.patch_embed.proj.\1"),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(\w+)",
        r"visual_encoder.blocks.\1.norm\2.\3",
    ),  # noqa: E501
    (
        r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight",
        r"visual_encoder.blocks.\1.attn.qkv.weight",
    ),  # noqa: E501
    (
        r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(\w+)",
        r"visual_encoder.blocks.\1.attn.proj.\2",
    ),  # noqa: E501
    (
        r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(\w+)",
        r"visual_encoder.blocks.\1.mlp.\2.\3",
    ),  # noqa: E501
    (r"vision_model\.post_layernorm\.(\w+)", r"ln_vision.\1"),
    (r"qformer\.layernorm\.(\w+)", r"Qformer.bert.embeddings.LayerNorm.\1"),
    (
        r"embeddings\.(word|position)_embeddings\.weight",
        r"Qformer.bert.embeddings.\1_embeddings.weight",
    ),  # noqa: E501
    (
        r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(.+)",
        r"Qformer.bert.encoder.layer.\1.\2.self.\3",
    ),  # noqa: E501
    (r"qformer\.encoder\.(.+)", r"Qformer.bert.encoder.\1"),
    (r"query_tokens", "query_tokens"),
    (r"vision_projection\.(\w+)", r"vision_proj.\1"),
    (r"text_projection\.(\w+)", r"text_proj.\1"),
    (r"itm_head\.(\w+)", r"itm_head.\1"),
]
BLIP2_LAVIS_ONLY = re.compile(r"temp$|Qformer\.cls\.|Qformer\.bert\.embeddings\.position_ids$")
_QKV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias")
_HF_QKV_BIAS = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias")

# LAVIS / BLIP BLIP-1 name -> transformers BlipForImageTextRetrieval name.
BLIP_FROM_LAVIS: Rules = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(\w+)", r"vision_model.embeddings.patch_embedding.\1"),
    (
        r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(\w+)",
        r"vision_model.encoder.layers.\1.layer_norm\2.\3",
    ),  # noqa: E501
    (
        r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(\w+)",
        r"vision_model.encoder.layers.\1.self_attn.qkv.\2",
    ),  # noqa: E501
    (
        r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(\w+)",
        r"vision_model.encoder.layers.\1.self_attn.projection.\2",
    ),  # noqa: E501
    (
        r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)",
        r"vision_model.encoder.layers.\1.mlp.\2.\3",
    ),  # noqa: E501
    (r"visual_encoder\.norm\.(\w+)", r"vision_model.post_layernorm.\1"),
    (r"text_encoder\.(.+)", r"text_encoder.\1"),
    (r"vision_proj\.(\w+)", r"vision_proj.\1"),
    (r"text_proj\.(\w+)", r"text_proj.\1"),
    (r"itm_head\.(\w+)", r"itm_head.\1"),
]
BLIP_TO_LAVIS: Rules = [
    (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(\w+)", r"visual_encoder.patch_embed.proj.\1"),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(\w+)",
        r"visual_encoder.blocks.\1.norm\2.\3",
    ),  # noqa: E501
    (
        r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(\w+)",
        r"visual_encoder.blocks.\1.attn.qkv.\2",
    ),  # noqa: E501
    (
        r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(\w+)",
        r"visual_encoder.blocks.\1.attn.proj.\2",
    ),  # noqa: E501
    (
        r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(\w+)",
        r"visual_encoder.blocks.\1.mlp.\2.\3",
    ),  # noqa: E501
    (r"vision_model\.post_layernorm\.(\w+)", r"visual_encoder.norm.\1"),
    (r"text_encoder\.(.+)", r"text_encoder.\1"),
    (r"vision_proj\.(\w+)", r"vision_proj.\1"),
    (r"text_proj\.(\w+)", r"text_proj.\1"),
    (r"itm_head\.(\w+)", r"itm_head.\1"),
]
BLIP_LAVIS_ONLY = re.compile(
    r"temp$|\w+_m\.|(image|text|idx|ptr)_queue$|text_decoder\.|text_encoder\.embeddings\.position_ids$"
)

#: A key that only a LAVIS checkpoint of the kind has, and what follows it in the checkpoint.
LAVIS_ANCHORS = {
    "blip2": "Qformer.bert.embeddings.LayerNorm.weight",
    "blip": "visual_encoder.blocks.0.attn.qkv.weight",
}


def _rename(key: str, rules: Rules) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", replacement, key)
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
    rules, lavis_only = (
        (BLIP2_FROM_LAVIS, BLIP2_LAVIS_ONLY)
        if kind == "blip2"
        else (BLIP_FROM_LAVIS, BLIP_LAVIS_ONLY)
    )
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
    rules = BLIP2_TO_LAVIS if kind == "blip2" else BLIP_TO_LAVIS
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        bias = _HF_QKV_BIAS.fullmatch(key) if kind == "blip2" else None
        if bias:
            q, _, v = value.chunk(3)
            out[f"visual_encoder.blocks.{bias.group(1)}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{bias.group(1)}.attn.v_bias"] = v
            continue
        renamed = _rename(key, rules)
        if renamed is None:
            raise KeyError(f"no LAVIS name for {key!r}")
        out[renamed] = value
    return out
