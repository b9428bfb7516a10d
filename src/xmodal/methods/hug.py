"""``method=hug``: Heterogeneous Uncertainty-Guided composed image retrieval (AAAI 2026).

A query (reference image x_r, modification text x_t) and a target image x_c are each K diagonal
Gaussians, one per learnable query token of a BLIP-2 Q-Former (methods/hug.md):

- means: mu_q = h(x_LQ, x_t, x_r) (eq 2, joint query+text pass, cross-attention to x_r) and
  mu_c = h(x_LQ, ∅, x_c) (eq 3, image-only pass); the ViT is frozen, the Q-Former trains;
- variances from three 1-layer transformer estimators: g_V (shared by reference and target,
  eqs 4 and 6), g_T on the text-only pass (eq 7), g_M on mu_q (eq 8); the query variance fuses
  the three with static or dynamic weights (eqs 10-11);
- distance: the expected squared distance of the Gaussians (eqs 14-15,
  :func:`xmodal.probabilistic.expected_distance`), used for training and ranking;
- loss (eq 17): holistic sigmoid contrast (eq 13) + lambda_FC x fine-grained variance contrast
  (eq 16) + lambda_Cord x coordination ranking loss (eq 9).

``variant=official`` reproduces the released code (tanghme0w/AAAI26-HUG @a80270c; hug.md §8):
frozen Q-Former, fixed a=1, b=0, one-directional saturating -log(S(x)+1e-8) holistic term,
InfoNCE on the variance directions at tau=0.07, hinge coordination loss with margin 0.2 and a
random permutation of the texts, CLS-broadcast text variance, eps 1e-6 in the fusion softmax,
AdamW eps 1e-8. Table 3's ablation rows are flags (``prob``, ``granularity``, ``fc_neg``,
``use_sigma_m``, ``lambda_cord``, ``fusion``); see ``conf/experiment/hug/ablation``.

Every loss and distance is :func:`xmodal.probabilistic.exact`: float32 with autocast off, so the
``16-mixed`` GPU trainer changes the networks' precision, never the losses'.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from xmodal.distributed import gather_with_grad
from xmodal.errors import check_choice
from xmodal.methods.schemas import FC_NEGATIVES, HUG_VARIANTS, HUGConfig
from xmodal.probabilistic import exact, expected_distance, pairwise_sq_distance
from xmodal.protocols.cir import CIRModule, Embedded, Scoring

if TYPE_CHECKING:
    from xmodal.data.cir import CIRDataModule


# -- Uncertainty fusion (eqs 10-11) ----------------------------------------------------------------


OFFICIAL_FUSION_EPS = 1e-6  # released DynamicWeighting: in the softmax sum and under the sqrt


@exact
def fusion_weights(
    sigma_r: Tensor, sigma_t: Tensor, sigma_m: Tensor, eps: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq 11: w_x = exp(-sigma_x^2) / sum_x' exp(-sigma_x'^2), element-wise.

    ``eps=None`` (paper): the exact softmax over the three sources (log-sum-exp), so the weights
    sum to 1 for any sigma. A number (released code: 1e-6) is added to the sum of exp(-sigma^2)
    instead; the weights then vanish once every sigma^2 is large (three sigma = 5: each w = 0.001).
    """
    neg = torch.stack([-s.pow(2) for s in (sigma_r, sigma_t, sigma_m)])
    if eps is None:
        weights = torch.softmax(neg, dim=0)
    else:
        unnorm = neg.exp()
        weights = unnorm / (unnorm.sum(0) + eps)
    return weights[0], weights[1], weights[2]


@exact
def fuse_uncertainty(
    sigma_r: Tensor,
    sigma_t: Tensor,
    sigma_m: Tensor | None,
    mode: str = "dynamic",
    variant: str = "paper",
) -> Tensor:
    """Query standard deviation from the reference, text and multi-modal ones (all [B, K, D]).

    ``dynamic`` (eqs 10-11): sigma_q^2 = sum_x w_x sigma_x^2 with the weights of
    :func:`fusion_weights`; ``static``: sigma_q^2 = mean of the sigma_x^2 (``sigma_m=None`` averages
    the two uni-modal ones, Table 3 rows 2-4). ``variant="paper"``: exact softmax and
    sigma_q = sqrt(sigma_q^2), so equal inputs fuse to themselves; ``"official"``: the released
    code, eps = 1e-6 in the softmax sum and sigma_q = sqrt(sigma_q^2 + 1e-6).
    """
    check_choice("variant", variant, HUG_VARIANTS)
    official = variant == "official"
    if mode == "dynamic":
        if sigma_m is None:
            raise ValueError("dynamic fusion needs sigma_m (set use_sigma_m=true or fusion=static)")
        sources = (sigma_r, sigma_t, sigma_m)
        weights = fusion_weights(*sources, eps=OFFICIAL_FUSION_EPS if official else None)
        var = sum(w * s.pow(2) for w, s in zip(weights, sources))
    elif mode == "static":
        sources = [s for s in (sigma_r, sigma_t, sigma_m) if s is not None]
        var = sum(s.pow(2) for s in sources) / len(sources)
    else:
        raise ValueError(f"fusion mode must be 'dynamic' or 'static', got {mode!r}")
    if official:
        return torch.sqrt(var + OFFICIAL_FUSION_EPS)
    # exact square root; the clamp only keeps the gradient finite where every sigma underflowed
    return torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))


# -- Losses, paper (eqs 9, 13, 16) and released code (hug.md §8) -----------------------------------


@exact
def holistic_contrast(
    distance: Tensor, a: Tensor | float = 1.0, b: Tensor | float = 0.0, neg_scale: str = "batch"
) -> Tensor:
    """Eq 13, sigmoid contrast on the expected distances d_ij = d(z_q^i, z_c^j) [B, B].

    Per anchor i: -log S(-a d_ii - b) - B mean_{j!=i} log S(a d_ij + b) - B mean_{j!=i}
    log S(a d_ji + b), averaged over i (``neg_scale="sum"``: plain sums over j != i). Computed with
    log-sigmoid, so it stays finite and keeps its gradient at any distance.
    """
    n = distance.shape[0]
    if distance.ndim != 2 or distance.shape[1] != n or n < 2:
        raise ValueError(
            f"holistic_contrast needs a square [B, B] matrix, B >= 2; got {distance.shape}"
        )
    logits = a * distance + b
    eye = torch.eye(n, dtype=torch.bool, device=distance.device)
    positive = -F.logsigmoid(-logits.diagonal())
    negative = -F.logsigmoid(logits).masked_fill(eye, 0.0)
    scale = {"batch": n / (n - 1), "sum": 1.0}[neg_scale]
    return (positive + scale * (negative.sum(1) + negative.sum(0))).mean()


@exact
def fine_grained_contrast(
    sigma_q: Tensor,
    sigma_c: Tensor,
    a: Tensor | float = 1.0,
    b: Tensor | float = 0.0,
    negatives: Sequence[str] = FC_NEGATIVES,
    on: str = "std",
) -> Tensor:
    """Eq 16, repulsive contrast between fine-grained uncertainty vectors ([B, K, D] each).

    For every anchor sigma_M^{k,i} (side M in {q, c}), each enabled negative type adds the mean of
    -log S(a ||sigma_M^{k,i} - sigma_M'^{k',j}||^2 + b) over its set, always with k' != k:
    ``component`` M'=M, j=i; ``instance`` M'=M, j!=i; ``modality`` M'!=M, any j. Summed over M and
    k, averaged over i. ``on="var"`` contrasts sigma^2 instead of sigma.
    """
    for kind in negatives:
        check_choice("fine-grained negatives[]", kind, FC_NEGATIVES)
    check_choice("fc_on", on, ("std", "var"))
    n, k, _ = sigma_q.shape
    if k < 2 and negatives:
        raise ValueError("the fine-grained contrast needs K >= 2 components (k' != k)")
    vq, vc = (s.pow(2) if on == "var" else s for s in (sigma_q, sigma_c))
    same_inst = torch.eye(n, dtype=torch.bool, device=vq.device)[:, None, :, None]
    other_comp = ~torch.eye(k, dtype=torch.bool, device=vq.device)[None, :, None, :]
    masks = {  # [B, K, B, K] over (i, k, j, k')
        "component": same_inst & other_comp,
        "instance": ~same_inst & other_comp,
        "modality": other_comp.expand(n, k, n, k),
    }
    loss = vq.new_zeros(())
    for anchor, other in ((vq, vc), (vc, vq)):
        flat = anchor.reshape(n * k, -1)
        for kind in negatives:
            partner = other if kind == "modality" else anchor
            dist = pairwise_sq_distance(flat, partner.reshape(n * k, -1)).view(n, k, n, k)
            terms = -F.logsigmoid(a * dist + b)
            mask = masks[kind]
            loss = loss + ((terms * mask).sum((2, 3)) / mask.sum((2, 3))).sum(1).mean()
    return loss


@exact
def coordination_loss(sigma_m_matched: Tensor, sigma_m_mismatched: Tensor) -> Tensor:
    """Eq 9 with the sign the text intends: -E log S(mean sigma_m^2(x_r, x'_t) - mean
    sigma_m^2(x_r, x_t)), so a mismatched text gets the higher coordination uncertainty."""
    matched = sigma_m_matched.pow(2).flatten(1).mean(1)
    mismatched = sigma_m_mismatched.pow(2).flatten(1).mean(1)
    return -F.logsigmoid(mismatched - matched).mean()


@exact
def official_holistic_contrast(distance: Tensor, a: float = 1.0, b: float = 0.0) -> Tensor:
    """Released code's eq 13: -log(S(-a d_ii - b) + 1e-8) - sum_{j!=i} log(S(a d_ij + b) + 1e-8),
    queries to targets only, summed and divided by B. Saturates at 18.42 per positive."""
    n = distance.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=distance.device)
    positive = -torch.log(torch.sigmoid(-a * distance.diagonal() - b) + 1e-8)
    negative = -torch.log(torch.sigmoid(a * distance + b) + 1e-8).masked_fill(eye, 0.0)
    return (positive.sum() + negative.sum()) / n


@exact
def official_fine_grained_contrast(
    sigma_q: Tensor, sigma_c: Tensor, temperature: float = 0.07
) -> Tensor:
    """Released code's L_FC: InfoNCE on the cosine of the std vectors (hug.md §8.3).

    Per (i, k): anchor sigma_q^{k,i}, positive sigma_c^{k,i}, negatives the other 2K-2 components
    of instance i on both sides; plus per k an in-batch InfoNCE (query k of i vs target k of j).
    The sum is divided by B*K + K.
    """
    n, k, _ = sigma_q.shape
    q, c = F.normalize(sigma_q, dim=-1), F.normalize(sigma_c, dim=-1)
    sim_qc = torch.einsum("ikd,ild->ikl", q, c) / temperature  # [B, K, K]
    sim_qq = torch.einsum("ikd,ild->ikl", q, q) / temperature
    self_mask = torch.eye(k, dtype=torch.bool, device=q.device)
    logits = torch.cat([sim_qc, sim_qq.masked_fill(self_mask, float("-inf"))], dim=-1)
    component = (torch.logsumexp(logits, -1) - sim_qc.diagonal(dim1=1, dim2=2)).sum()
    sim_batch = torch.einsum("ikd,jkd->kij", q, c) / temperature  # [K, B, B]
    labels = torch.arange(n, device=q.device).repeat(k)
    instance = F.cross_entropy(sim_batch.reshape(k * n, n), labels, reduction="none")
    return (component + instance.view(k, n).mean(1).sum()) / (n * k + k)


@exact
def official_coordination_loss(
    sigma_m_matched: Tensor, sigma_m_mismatched: Tensor, margin: float = 0.2
) -> Tensor:
    """Released code's L_Cord: mean(relu(margin + sum sigma_m,match^2 - sum sigma_m,mismatch^2))."""
    matched = sigma_m_matched.pow(2).flatten(1).sum(1)
    mismatched = sigma_m_mismatched.pow(2).flatten(1).sum(1)
    return torch.clamp(margin + matched - mismatched, min=0).mean()


@exact
def info_nce(mu_q: Tensor, mu_c: Tensor, temperature: float = 0.07) -> Tensor:
    """Table 3 row 0 (point matching): InfoNCE of L2-normalised embeddings, query -> target."""
    q, c = F.normalize(mu_q.flatten(1), dim=-1), F.normalize(mu_c.flatten(1), dim=-1)
    labels = torch.arange(len(q), device=q.device)
    return F.cross_entropy(q @ c.T / temperature, labels)


@exact
def hug_loss(
    mu_q: Tensor,
    sigma_q: Tensor,
    mu_c: Tensor,
    sigma_c: Tensor,
    sigma_m_matched: Tensor | None,
    sigma_m_mismatched: Tensor | None,
    variant: str = "paper",
    lambda_fc: float = 0.5,
    lambda_cord: float = 0.1,
    *,
    a: Tensor | float = 1.0,
    b: Tensor | float = 0.0,
    a_fc: Tensor | float = 1.0,
    b_fc: Tensor | float = 0.0,
    fc_neg: Sequence[str] = FC_NEGATIVES,
    fc_on: str = "std",
    hc_neg_scale: str = "batch",
    fc_temperature: float = 0.07,
    cord_margin: float = 0.2,
) -> dict[str, Tensor]:
    """Eq 17: L = L_HC + lambda_FC L_FC + lambda_Cord L_Cord; returns ``total``, ``hc``, ``fc``,
    ``cord``.

    Means and standard deviations are [B, K, D]. ``variant="official"`` uses the released code's
    three losses (a, b fixed at 1, 0; ``fc_neg``/``fc_on``/``hc_neg_scale`` do not apply). With
    ``sigma_m_*=None`` or ``lambda_cord=0`` the coordination term is 0; with ``fc_neg=[]`` or
    ``lambda_fc=0`` the fine-grained term is 0.
    """
    check_choice("variant", variant, HUG_VARIANTS)
    for name, x in (("sigma_q", sigma_q), ("mu_c", mu_c), ("sigma_c", sigma_c)):
        if x.shape != mu_q.shape:
            raise ValueError(f"{name} {tuple(x.shape)} must have mu_q's shape {tuple(mu_q.shape)}")
    official = variant == "official"
    zero = mu_q.new_zeros(())
    d = expected_distance(mu_q, sigma_q, mu_c, sigma_c)  # eqs 14-15
    hc = official_holistic_contrast(d) if official else holistic_contrast(d, a, b, hc_neg_scale)
    fc = zero  # eq 16
    if lambda_fc and (official or fc_neg):
        fc = (
            official_fine_grained_contrast(sigma_q, sigma_c, fc_temperature)
            if official
            else fine_grained_contrast(sigma_q, sigma_c, a_fc, b_fc, fc_neg, fc_on)
        )
    cord = zero  # eq 9
    if lambda_cord and sigma_m_matched is not None and sigma_m_mismatched is not None:
        cord = (
            official_coordination_loss(sigma_m_matched, sigma_m_mismatched, cord_margin)
            if official
            else coordination_loss(sigma_m_matched, sigma_m_mismatched)
        )
    total = hc + lambda_fc * fc + lambda_cord * cord  # eq 17
    return {"total": total, "hc": hc, "fc": fc, "cord": cord}


# -- Modules ---------------------------------------------------------------------------------------


class UncertaintyEstimator(nn.Module):
    """g_V / g_T / g_M: one post-LN transformer encoder layer, then Linear-GELU-Dropout-Linear-
    Softplus; maps Q-Former outputs [B, K, H] to standard deviations [B, K, H] (hug.md §2)."""

    def __init__(self, hidden: int, num_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.transformer_layer = nn.TransformerEncoderLayer(
            hidden, num_heads, 4 * hidden, dropout, activation="gelu", batch_first=True
        )
        self.uncertainty_head = nn.Sequential(  # fmt: skip
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Softplus(),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.uncertainty_head(self.transformer_layer(features))


class GPO(nn.Module):
    """Generalised pooling (Chen et al. 2021, VSE-infinity) over the K components, per dimension:
    the values sorted in descending order, weighted by a softmax over positions that a small
    bidirectional GRU computes from sinusoidal position codes. [B, K, D] -> [B, D]."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def weights(self, k: int) -> Tensor:
        """Pooling weights of the K sorted positions: [K]."""
        pos = torch.arange(k, dtype=torch.float32, device=self.linear.weight.device)[:, None]
        freq = torch.exp(
            torch.arange(0, self.d_pe, 2, device=pos.device) * (-math.log(10000.0) / self.d_pe)
        )
        pe = torch.zeros(k, self.d_pe, device=pos.device)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        out, _ = self.gru(pe[None])
        half = out.shape[-1] // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2)[0, :, 0]
        return torch.softmax(scores / 0.1, dim=0)

    def forward(self, x: Tensor) -> Tensor:
        ordered = x.sort(dim=1, descending=True).values
        return (ordered * self.weights(x.shape[1])[None, :, None]).sum(1)


@dataclass
class QueryEncoding:
    """What the query side produces: the (pooled) Gaussian and its fine-grained sources."""

    mu: Tensor
    sigma: Tensor
    sigma_r: Tensor | None = None
    sigma_t: Tensor | None = None
    sigma_m: Tensor | None = None
    image_embeds: Tensor | None = None


def distance_score(queries: Tensor, gallery: Tensor) -> Tensor:
    """Ranking score of packed Gaussians [n, 2, F] (mean, std): the expected distance (eq 15)."""
    return expected_distance(queries[:, 0], queries[:, 1], gallery[:, 0], gallery[:, 1])


# -- The LightningModule ---------------------------------------------------------------------------


class HUG(CIRModule):
    """HUG on a BLIP-2 backbone (``xmodal.backbones.blip2.Blip2QFormer``); see the module docs."""

    def __init__(
        self,
        backbone: nn.Module,
        hp: HUGConfig,
        run_dir: str | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config} if config else {})
        self.hp = hp.check()
        self.official = hp.variant == "official"
        self.text_pass = hp.text_pass or ("cls" if self.official else "skip")
        self.mismatch = hp.mismatch or ("randperm" if self.official else "roll")
        self.run_dir = Path(run_dir) if run_dir else None
        self.backbone = backbone
        # HUG uses the Q-Former's hidden states, not BLIP-2's ITC/ITM heads
        for head in (backbone.vision_projection, backbone.text_projection, backbone.itm_head):
            head.requires_grad_(False)
        if self.official:  # released code: every Q-Former pass runs under no_grad (hug.md §8.1)
            backbone.requires_grad_(False)
        hidden = backbone.hidden_size
        if hp.prob:
            est = {"num_heads": hp.estimator_heads, "dropout": hp.estimator_dropout}
            self.g_v = UncertaintyEstimator(hidden, **est)
            self.g_t = UncertaintyEstimator(hidden, **est)
            self.g_m = UncertaintyEstimator(hidden, **est) if hp.use_sigma_m else None
            if not self.official:  # eq 13's a, b and eq 16's a', b' are learnt (init 1, 0)
                self.hc_a = nn.Parameter(torch.tensor(1.0))
                self.hc_b = nn.Parameter(torch.tensor(0.0))
                if hp.fc_neg and hp.lambda_fc:
                    self.fc_a = nn.Parameter(torch.tensor(1.0))
                    self.fc_b = nn.Parameter(torch.tensor(0.0))
        if hp.granularity == "global":
            self.gpo_q, self.gpo_c = GPO(), GPO()
        self.scoring = Scoring(distance_score, largest=False, chunk_size=hp.chunk_size)
        self.export_uncertainty = hp.export_uncertainty

    @classmethod
    def from_config(cls, cfg: DictConfig) -> tuple[HUG, CIRDataModule]:
        """The module and its CIR datamodule (``xmodal.data.cir``) of a composed config: HUG's
        texts are the captions joined with ", " and cleaned by ``blip_caption``, for training
        and for the queries; queries carry the reference pixels."""
        from xmodal import backbones
        from xmodal.backbones.blip2 import Blip2QFormer
        from xmodal.backbones.preprocess import augmented_transform
        from xmodal.data.cir import CIRDataModule

        model, preprocess, tokenizer = backbones.build(cfg.backbone)
        if not isinstance(model, Blip2QFormer):
            raise TypeError(
                f"method=hug needs a BLIP-2 Q-Former backbone (backbone=blip2_qformer or "
                f"tiny_blip2), got backbone={cfg.backbone.name} of kind {cfg.backbone.kind}"
            )
        model.train()  # the factory returns eval-mode models; the ViT stays in eval mode
        method = OmegaConf.to_container(cfg.method, resolve=True)
        hp = HUGConfig(**{f.name: method[f.name] for f in fields(HUGConfig) if f.name in method})
        module = cls(model, hp, cfg.run_dir, OmegaConf.to_container(cfg, resolve=True))
        pre = model.preprocess_cfg
        train_tf = augmented_transform(pre["size"], pre["mean"], pre["std"]) if hp.augment else None
        datamodule = CIRDataModule(
            cfg.data, preprocess, tokenizer, text_mode="blip_caption", query_images=True,
            seed=cfg.seed, train_preprocess=train_tf, max_words=hp.max_words,
        )  # fmt: skip
        return module, datamodule

    # -- encoders (eqs 2-8, 10-11) -----------------------------------------------------------
    def _qformer(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.official else contextlib.nullcontext()

    def _image_embeds(self, pixels: Tensor) -> Tensor:
        with torch.no_grad():  # the ViT is frozen
            return self.backbone.image_embeds(pixels).to(self.backbone.query_tokens.dtype)

    def _text_only(self, ids: Tensor, mask: Tensor) -> Tensor:
        """h(x_LQ, x_t, ∅) [B, K, H] under ``text_pass`` (hug.md §2, options a/b/c)."""
        bb = self.backbone
        if self.text_pass == "skip":  # (a) the cross-attention sub-blocks are skipped
            return bb.query_text_image(ids, mask, None)
        if self.text_pass == "zero_token":  # (b) one all-zero visual token
            zero = ids.new_zeros((len(ids), 1, bb.config.vision_config.hidden_size))
            return bb.query_text_image(ids, mask, zero.to(bb.query_tokens.dtype))
        cls_state = bb.text(ids, mask)[:, :1]  # (c) text-only BERT pass, [CLS] broadcast to K
        return cls_state.expand(-1, bb.num_query_tokens, -1)

    def _pool(self, mu: Tensor, sigma: Tensor | None, gpo: nn.Module | None) -> tuple[Tensor, ...]:
        """The matched Gaussian: fine [B, K, D]; global (row 1) or point (row 0) [B, 1, D]."""
        if not self.hp.prob:
            mu = F.normalize(mu.mean(1), dim=-1)[:, None]
            return mu, torch.zeros_like(mu)
        if self.hp.granularity == "global":
            return mu.mean(1, keepdim=True), gpo(sigma)[:, None]
        return mu, sigma

    def encode_target(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(mu_c, sigma_c) of target images."""
        with self._qformer():
            mu_c = self.backbone.query_image(self._image_embeds(pixels))  # eq 3
        sigma_c = self.g_v(mu_c) if self.hp.prob else None  # eq 4
        return self._pool(mu_c, sigma_c, getattr(self, "gpo_c", None))

    def encode_query(self, pixels: Tensor, tokens: dict[str, Tensor]) -> QueryEncoding:
        """mu_q, sigma_q of (reference, text) queries and the three uncertainty sources."""
        bb = self.backbone
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        v = self._image_embeds(pixels)
        with self._qformer():
            mu_q = bb.query_text_image(ids, mask, v)  # eq 2
            if self.hp.prob:
                h_r, h_t = bb.query_image(v), self._text_only(ids, mask)
        if not self.hp.prob:
            return QueryEncoding(*self._pool(mu_q, None, None), image_embeds=v)
        sigma_r = self.g_v(h_r)  # eq 6
        sigma_t = self.g_t(h_t)  # eq 7
        sigma_m = self.g_m(mu_q) if self.g_m is not None else None  # eq 8
        sigma_q = fuse_uncertainty(  # eqs 10-11
            sigma_r, sigma_t, sigma_m, self.hp.fusion, self.hp.variant
        )
        mu, sigma = self._pool(mu_q, sigma_q, getattr(self, "gpo_q", None))
        return QueryEncoding(mu, sigma, sigma_r, sigma_t, sigma_m, v)

    def mismatched_sigma_m(self, image_embeds: Tensor, tokens: dict[str, Tensor]) -> Tensor:
        """sigma_m(x_r, x'_t) with x'_t the text of another triplet in the batch (eq 9)."""
        n = len(image_embeds)
        perm = (
            torch.randperm(n, device=self.device)
            if self.mismatch == "randperm"
            else torch.roll(torch.arange(n, device=self.device), 1)  # a derangement
        )
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        with self._qformer():
            h = self.backbone.query_text_image(ids[perm], mask[perm], image_embeds)
        return self.g_m(h)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hp
        q = self.encode_query(batch["reference"], batch["text"])  # eqs 2, 6-8, 10-11
        mu_c, sigma_c = self.encode_target(batch["target"])  # eqs 3-4
        if not hp.prob:  # Table 3 row 0: point matching
            loss = info_nce(gather_with_grad(q.mu), gather_with_grad(mu_c), hp.point_temperature)
            self.log("train/loss", loss, prog_bar=True)
            return loss
        sigma_m_mismatched = None
        if q.sigma_m is not None and hp.lambda_cord:  # x'_t: a text of this process's batch
            sigma_m_mismatched = self.mismatched_sigma_m(q.image_embeds, batch["text"])
        learnt = {} if self.official else {"a": self.hc_a, "b": self.hc_b}
        if hasattr(self, "fc_a"):
            learnt.update(a_fc=self.fc_a, b_fc=self.fc_b)
        # the losses of the global batch: in-batch negatives span every process (DDP-exact)
        mu_q, sigma_q, mu_c, sigma_c, sigma_m, sigma_m_mismatched = (
            gather_with_grad(x) if x is not None else None
            for x in (q.mu, q.sigma, mu_c, sigma_c, q.sigma_m, sigma_m_mismatched)
        )
        losses = hug_loss(  # eqs 9, 13-17
            mu_q, sigma_q, mu_c, sigma_c, sigma_m, sigma_m_mismatched,
            variant=hp.variant, lambda_fc=hp.lambda_fc, lambda_cord=hp.lambda_cord,
            fc_neg=hp.fc_neg, fc_on=hp.fc_on, hc_neg_scale=hp.hc_neg_scale,
            fc_temperature=hp.official_fc_temperature, cord_margin=hp.official_cord_margin,
            **learnt,
        )  # fmt: skip
        for key, value in losses.items():
            self.log(f"train/{'loss' if key == 'total' else key}", value, prog_bar=key == "total")
        return losses["total"]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hp
        eps = hp.adam_eps if hp.adam_eps is not None else (1e-8 if self.official else 1e-7)
        trainable = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            trainable, lr=hp.lr, betas=tuple(hp.betas), eps=eps, weight_decay=hp.weight_decay
        )
        epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=hp.eta_min)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradient norm at ``method.grad_clip`` (trainer.gradient_clip_val wins)."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.hp.grad_clip
        if clip:
            self.clip_gradients(optimizer, clip, gradient_clip_algorithm or "norm")

    # -- checkpoints: the frozen ViT comes from the backbone config, not the checkpoint ---------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.vision_model.")]:
            del state[key]

    def load_state_dict(
        self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state dict whose frozen ViT was left out (HUG checkpoints, ``load_run``): the
        ViT weights come from the backbone factory, everything else must match (strict)."""
        state = dict(state_dict)
        vit = self.backbone.vision_model.state_dict(prefix="backbone.vision_model.")
        for key, value in vit.items():
            state.setdefault(key, value)
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- evaluation (xmodal.protocols.cir): Gaussians ranked by the expected distance (eq 15) -----
    def encode_gallery(self, pixels: Tensor) -> dict[str, Tensor]:
        mu, sigma = self.encode_target(pixels)
        return {"packed": torch.stack([mu.flatten(1), sigma.flatten(1)], 1)}

    def encode_queries(self, pixels: Tensor, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """The packed query Gaussian and the mean variance of sigma_q and of its sources (NaN
        for a source the model does not have)."""
        q = self.encode_query(pixels, tokens)
        out = {"packed": torch.stack([q.mu.flatten(1), q.sigma.flatten(1)], 1)}
        for name, s in (("sigma_q2", q.sigma), ("sigma_r2", q.sigma_r), ("sigma_t2", q.sigma_t),
                        ("sigma_m2", q.sigma_m)):  # fmt: skip
            nan = q.mu.new_full((len(q.mu),), math.nan)
            out[name] = s.pow(2).flatten(1).mean(1) if s is not None else nan
        return out

    def embed(
        self, gallery: dict[str, Tensor], queries: dict[str, Tensor], reference: Tensor
    ) -> Embedded:
        """Packed Gaussians [n, 2, K*D]; the query uncertainty is its mean sigma_q^2 (with the
        means of sigma_r^2, sigma_t^2, sigma_m^2 beside it), none for point matching (row 0)."""
        if not self.hp.prob:
            return Embedded(queries["packed"], gallery["packed"])
        extras = {k: queries[k] for k in ("sigma_r2", "sigma_t2", "sigma_m2")}
        return Embedded(queries["packed"], gallery["packed"], queries["sigma_q2"], extras)
