"""BLIP-1 backbone: ViT + BERT text encoder with their ITC projections, through transformers.

RUIR's "BLIP B/16" rows (methods/ruir.md §2) use BLIP-1 ViT-B/16 the way its authors' framework
loads it: LAVIS `blip_feature_extractor`, model type `base` (224 px,
`model_base_capfilt_large.pth`):

- image feature = vision_proj(ViT CLS output)   (LAVIS: `image_embeds_proj[:, 0]`), d = 256;
- text feature  = text_proj(BERT CLS output of a text-only pass, no cross-attention), d = 256.

Both unnormalised (callers L2-normalise, as LAVIS' features are). transformers'
`BlipForImageTextRetrieval` computes its ITC score the same way. The text encoder's
cross-attention blocks (image-grounded text, ITM) are kept for the weights but frozen: the ITC
features never use them. The image tower's parameters sit
under `visual.` (as open_clip's do), the text tower's under `text_encoder.` / `text_proj.`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from xmodal.backbones import hf
from xmodal.backbones import preprocess as pre
from xmodal.backbones.config import BackboneConfig
from xmodal.backbones.weights import Weights, construction, load_checked

CONFIG_KEY = "blip_config"
DEFAULT_CONTEXT_LENGTH = 30  # LAVIS blip_feature_extractor's max_txt_len (PLI truncates to it)
HF_ONLY = ("itm_head.",)  # the ITM head: not part of the ITC features


class BlipVisual(nn.Module):
    """The image tower: ViT and its ITC projection."""

    def __init__(self, vision_model: nn.Module, vision_proj: nn.Linear) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.vision_proj = vision_proj

    def forward(self, pixel_values: Tensor) -> Tensor:
        pixels = pixel_values.to(hf.vit_dtype(self.vision_model))
        cls = self.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
        return self.vision_proj(cls.to(self.vision_proj.weight.dtype))


class BlipITC(nn.Module):
    """BLIP-1's ITC towers: `encode_image(pixels) -> [B, D]`, `encode_text(tokens) -> [B, D]`."""

    def __init__(self, retrieval_model: nn.Module) -> None:
        super().__init__()
        self.config = retrieval_model.config
        self.visual = BlipVisual(retrieval_model.vision_model, retrieval_model.vision_proj)
        self.text_encoder = retrieval_model.text_encoder
        self.text_proj = retrieval_model.text_proj
        self.preprocess_cfg: dict[str, Any] = {}  # set by build, saved in checkpoints
        for layer in self.text_encoder.encoder.layer:  # image-grounded (ITM) only: never used
            if hasattr(layer, "crossattention"):  # by ITC features, so never trained here
                layer.crossattention.requires_grad_(False)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.visual(pixel_values)

    def encode_text(self, tokens: Mapping[str, Tensor] | Tensor) -> Tensor:
        emb = self.text_encoder.embeddings.word_embeddings
        device = emb.weight.device
        if isinstance(tokens, Tensor):
            ids, mask = tokens.to(device), (tokens != (emb.padding_idx or 0)).long().to(device)
        else:
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.text_proj(out[:, 0])


def to_hf_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BlipITC's state dict in transformers' BlipForImageTextRetrieval names."""
    return {k.removeprefix("visual."): v for k, v in state.items()}


def from_hf_names(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """transformers' names to BlipITC's: (state, ignored keys such as the ITM head)."""
    out, ignored = {}, []
    for key, value in state.items():
        if key.startswith(HF_ONLY):
            ignored.append(key)
        elif key.startswith(("vision_model.", "vision_proj.")):
            out["visual." + key] = value
        else:
            out[key] = value
    return out, ignored


def check_config(cfg: BackboneConfig) -> dict[str, Any]:
    """The architecture spec, after the checks that need no weights."""
    return hf.check_config(cfg, CONFIG_KEY, default_size=384)


def resolve(cfg: BackboneConfig) -> tuple[dict[str, Any], Weights]:
    """(architecture spec, weights) of a BLIP backbone, checked; nothing built yet."""
    spec = check_config(cfg)
    weights = hf.resolve(cfg, spec, CONFIG_KEY)
    if weights.state_dict is not None and weights.meta is None:  # transformers' names
        weights.state_dict, ignored = from_hf_names(weights.state_dict)
        weights.ignored += ignored
    return spec, weights


def hf_model(config: Mapping[str, Any]) -> nn.Module:
    """A random-init `BlipForImageTextRetrieval` of a config dict."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    return BlipForImageTextRetrieval(BlipConfig(**config))


def build(
    cfg: BackboneConfig, spec: dict[str, Any], weights: Weights
) -> tuple[nn.Module, Callable, Callable]:
    """Build (BlipITC in eval mode, eval preprocess, tokenizer) from resolved weights."""
    config = dict(weights.model_config or spec[CONFIG_KEY])
    config.pop("architectures", None)
    with construction(weights):
        model = BlipITC(hf_model(config))
    if not weights.random:
        load_checked(model, weights, f"blip arch {cfg.arch}")
    hf.cast_vit(model.visual, cfg.precision)
    emb = model.text_encoder.embeddings.word_embeddings
    tok = hf.tokenizer(cfg, spec, weights, emb.num_embeddings)
    hf.check_vocab(cfg, tok, emb)
    size = model.config.vision_config.image_size
    saved = weights.preprocess
    mean = list(cfg.image_mean or saved.get("mean") or pre.CLIP_MEAN)
    std = list(cfg.image_std or saved.get("std") or pre.CLIP_STD)
    model.preprocess_cfg = {"size": size, "mean": mean, "std": std, "interpolation": "bicubic"}
    preprocess = pre.blip_eval_transform(size, mean, std, cfg)
    length = cfg.context_length or spec.get("context_length", DEFAULT_CONTEXT_LENGTH)
    return model.eval(), preprocess, hf.TextTokenizer(tok, length)
