"""``method=ruir``: Ranking-aware Uncertainty for text-guided Image Retrieval (arXiv 2308.08131).

Spec: ``methods/ruir.md``. The paper's body was not recovered and no official code exists, so every
choice tagged [R] in the spec is a reconstruction, exposed as a named switch of :class:`RUIRConfig`
with the spec's default (docs/ruir.md lists them).

Model (§3). CLIP towers from the backbone factory give v_r = f_I(I_r), t = f_T(T), v_t = f_I(I_t).
The source input x_s = [v_r; t] goes through ``n_ua`` uncertainty-augmenter (UA) blocks, each a
Gaussian head (mean, log-variance) followed by a reparameterised sample; the target v_t goes through
its own UA blocks. At test time the score is the cosine of the two means; no sampling, no sigma.

Losses (§4), for M samples of both ends, s_ij^(m) = <z_s^i(m), z_t^j(m)> / tau on unit vectors:

    L_ISU = mean_m mean_i -log softmax_j(s_i.^(m))_i                        (in-sample)
    L_CSU = mean_m mean_i -mean_{p in P_i} log softmax_j(s_i.^(m))_p        (cross-sample)
            P_i = {i} + {j : cos(mu_s^i, mu_t^j) >= theta}  (stop-grad; csu_space=query)
    L_DR  = mean_i W2^2(N(mu_s^i, sigma_s^i), N(mu_t^i, sigma_t^i))           (distribution reg.)
    L     = L_ISU + lambda_CSU L_CSU + lambda_DR L_DR  (+ lambda_KL L_KL, off by default)

Option ``attenuation`` (outside the paper): the per-query ranking losses l_i = L_ISU,i +
lambda_CSU L_CSU,i are replaced by exp(-s_i) l_i + s_i, s_i the query's log mean variance
(learned loss attenuation), so that sigma grows with what the query cannot rank.

Every loss is :func:`xmodal.probabilistic.exact` (autocast off, float32 inside), so mixed-precision
training changes the networks' precision, not the losses'. The log-variance heads start at a
noise/signal ratio ``init_noise_ratio`` for any width d (``logvar_init=null``); ``norm_mean`` and
``lambda_kl`` are options against the collapse to plain InfoNCE (docs/ruir.md).

Training (§5): AdamW, linear warm-up then multi-step decay per epoch; the best checkpoint by
validation R@10. Evaluation is the shared CIR protocol (:mod:`xmodal.protocols.cir`, docs/cir.md):
RUIR supplies the cosine of the two means as its score and the query's mean predicted variance
as its per-query uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from xmodal.data.cir import CIRDataModule
from xmodal.methods.schemas import RUIRConfig
from xmodal.probabilistic import (
    exact,
    kl_to_prior,
    reparameterize,
    sigma_from_logvar,
    wasserstein2,
)
from xmodal.protocols.cir import CIRModule, Embedded

# ----------------------------------------------------------------------------------------------
# Losses (§4)
# ----------------------------------------------------------------------------------------------


@exact
def sampled_logits(z_s: Tensor, z_t: Tensor, tau: Tensor | float) -> Tensor:
    """s_ij^(m) = <z_s^i(m)/|z_s^i(m)|, z_t^j(m)/|z_t^j(m)|> / tau; [M, B, d] x2 -> [M, B, B]."""
    z_s, z_t = F.normalize(z_s, dim=-1), F.normalize(z_t, dim=-1)
    return z_s @ z_t.transpose(-1, -2) / tau


@exact
def multi_positive_infonce(logits: Tensor, positives: Tensor, per_query: bool = False) -> Tensor:
    """mean_m mean_i -(1/|P_i|) sum_{p in P_i} log softmax_j(logits[m, i])_p.

    ``logits`` [M, B, B], ``positives`` bool [B, B] (row i = P_i, never empty). With
    ``positives = I`` this is the usual InfoNCE (cross-entropy with labels 0..B-1).
    ``per_query``: the [B] losses of the queries (mean over m only) instead of their mean.
    """
    log_p = logits.log_softmax(dim=-1)
    pos = positives.to(log_p.dtype)
    losses = (-(log_p * pos).sum(-1) / pos.sum(-1)).mean(0)
    return losses if per_query else losses.mean()


@exact
def isu_loss(z_s: Tensor, z_t: Tensor, tau: Tensor | float, per_query: bool = False) -> Tensor:
    """L_ISU: InfoNCE over the stochastic ranking list; z [M, B, d] (M = 1: deterministic)."""
    eye = torch.eye(z_s.shape[1], dtype=torch.bool, device=z_s.device)
    return multi_positive_infonce(sampled_logits(z_s, z_t, tau), eye, per_query)


@exact
def csu_positives(mu_t: Tensor, theta: float, mu_s: Tensor | None = None) -> Tensor:
    """P_i = {i} + {j : cos(mu^i, mu_t^j) >= theta}, without gradient; bool [B, B].

    mu = mu_s (``csu_space=query``, the default: targets similar to the source feature, as the
    paper describes CSU) or, when ``mu_s`` is None, mu_t (``csu_space=target``)."""
    anchor = mu_t if mu_s is None else mu_s
    sim = F.normalize(anchor.detach(), dim=-1) @ F.normalize(mu_t.detach(), dim=-1).T
    eye = torch.eye(len(mu_t), dtype=torch.bool, device=mu_t.device)
    return (sim >= theta) | eye


@exact
def csu_loss(
    z_s: Tensor, z_t: Tensor, positives: Tensor, tau: Tensor | float, per_query: bool = False
) -> Tensor:
    """L_CSU: multi-positive InfoNCE, the in-batch targets in ``positives`` count as matches."""
    return multi_positive_infonce(sampled_logits(z_s, z_t, tau), positives, per_query)


@exact
def attenuated_loss(per_query: Tensor, log_variance: Tensor) -> Tensor:
    """Learned loss attenuation (Kendall & Gal, NeurIPS 2017, eq. 8 with s = log sigma^2):
    mean_i exp(-s_i) l_i + s_i, for per-query losses l [B] and log-variances s [B].

    Not in the RUIR paper (``method.attenuation``): ISU, CSU and DR only reward a smaller sigma,
    so nothing in them asks sigma to differ between queries. Here the minimum over s_i is at
    s_i = log l_i: a query's variance grows with the loss its ranking keeps, i.e. with how many
    targets it cannot tell apart, which is the many-to-many ambiguity the paper's Gaussians stand
    for. The ranking loss of such a query is weighted down by exp(-s_i) in return.
    """
    return (torch.exp(-log_variance) * per_query + log_variance).mean()


@exact
def dr_loss(
    mu_s: Tensor, sigma_s: Tensor, mu_t: Tensor, sigma_t: Tensor, normalized: bool = True
) -> Tensor:
    """L_DR: mean over matched pairs of W2^2 = |mu_s - mu_t|^2 + |sigma_s - sigma_t|^2, on
    L2-normalised means when ``normalized`` (sigma as is)."""
    if normalized:
        mu_s, mu_t = F.normalize(mu_s, dim=-1), F.normalize(mu_t, dim=-1)
    return wasserstein2(mu_s, sigma_s, mu_t, sigma_t).mean()


@exact
def kl_loss(
    mu_s: Tensor, sigma_s: Tensor, mu_t: Tensor, sigma_t: Tensor, prior_std: float | None = None
) -> Tensor:
    """L_KL = mean_i [KL(N(mu_s^i, sigma_s^i^2) || N(0, s^2 I)) + KL(target_i || same)] / d.

    The prior term of PCME / DUL, per embedding dimension so that lambda_KL does not depend on d;
    s = ``prior_std``, default 1/sqrt(d) (the prior's noise norm s sqrt(d) = 1, the norm of a
    normalised mean). ISU, CSU and DR only reward a smaller sigma and let |mu| grow, which drives
    the noise/signal ratio to 0 (plain InfoNCE); this term is minimal at sigma = s and grows with
    |mu|^2. Inputs [B, d].
    """
    d = mu_s.shape[-1]
    s = prior_std if prior_std is not None else 1 / math.sqrt(d)
    return (kl_to_prior(mu_s, sigma_s, s) + kl_to_prior(mu_t, sigma_t, s)).mean() / d


# ----------------------------------------------------------------------------------------------
# Uncertainty augmenter (§3)
# ----------------------------------------------------------------------------------------------


@dataclass
class Gaussian:
    """A batch of diagonal Gaussians and (in training) samples: mu, sigma [B, d]; z [M, B, d]."""

    mu: Tensor
    sigma: Tensor
    z: Tensor | None = None


def gathered(g: Gaussian) -> Gaussian:
    """The Gaussians of every rank's batch, concatenated in rank order with gradients kept, so
    each rank computes the loss of the global batch (``xmodal.distributed.gather_with_grad``)."""
    from xmodal.distributed import gather_with_grad

    z = None if g.z is None else gather_with_grad(g.z.transpose(0, 1)).transpose(0, 1)
    return Gaussian(gather_with_grad(g.mu), gather_with_grad(g.sigma), z)


class UABlock(nn.Module):
    """One UA block: u = Dropout(GELU(W h)); mu = W_mu u; logvar = W_rho u (clamped).

    Works on [P, B, d_in] (P sample paths of the same queries). The dropout mask is shared by the
    P paths, so the paths of one query differ only by their Gaussian noise (with sigma = 0 every
    path equals the mean path).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        d_hidden: int,
        dropout: float,
        logvar_init: float,
        logvar_range: tuple[float, float],
        norm_mean: bool = False,
    ) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_in, d_hidden)
        self.mu = nn.Linear(d_hidden, d_out)
        self.logvar = nn.Linear(d_hidden, d_out)
        for layer in (self.hidden, self.mu):  # mu starts as a norm-preserving random map of the
            nn.init.xavier_uniform_(layer.weight)  # input: it keeps the inputs' similarities and
            nn.init.zeros_(layer.bias)  # a scale (|mu| ~ 0.5) the initial sigma is compared with
        nn.init.zeros_(self.logvar.weight)  # [R] small, input-independent sigma at the start
        nn.init.constant_(self.logvar.bias, logvar_init)
        self.dropout = dropout
        self.logvar_range = tuple(logvar_range)
        self.norm_mean = norm_mean

    def _mean(self, u: Tensor) -> Tensor:
        mu = self.mu(u)
        return F.normalize(mu, dim=-1) if self.norm_mean else mu

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        u = F.gelu(self.hidden(h))
        if self.training and self.dropout > 0:
            keep = torch.empty_like(u[0]).bernoulli_(1 - self.dropout) / (1 - self.dropout)
            u = u * keep
        return self._mean(u), self.logvar(u).clamp(*self.logvar_range)

    @torch.no_grad()
    def init_noise_ratio(self, ratio: float, input_norm: float, probes: int = 256) -> float:
        """Set the log-variance bias so that the initial noise norm sigma sqrt(d) is ``ratio``
        times E|mu|, the mean norm of the block's output at initialisation in training (dropout
        included, where samples are drawn) for inputs of norm ``input_norm`` in random
        directions; returns E|mu|.

        The log-variance weights are 0 at initialisation, so sigma is the same for every input
        and the initial cos(z, mu) ~ 1/sqrt(1 + ratio^2) whatever d and |mu| are. A fixed bias
        instead gives noise e^{b/2} sqrt(d) against |mu| ~ 0.5: b = -5 is noise at d = 1024.
        """
        if ratio <= 0 or input_norm <= 0:
            raise ValueError(
                f"method.init_noise_ratio and the input norm must be > 0, got {ratio}, {input_norm}"
            )
        g = torch.Generator().manual_seed(0)  # the probe leaves the global RNG alone
        x = F.normalize(torch.randn(probes, self.hidden.in_features, generator=g), dim=-1)
        u = F.gelu(self.hidden((input_norm * x).to(self.hidden.weight)))
        if self.dropout > 0:
            keep = torch.rand(u.shape, generator=g) >= self.dropout
            u = u * keep.to(u) / (1 - self.dropout)
        mean_norm = float(self._mean(u).norm(dim=-1).mean())
        d = self.mu.out_features
        self.logvar.bias.fill_(2 * math.log(ratio * mean_norm / math.sqrt(d)))
        return mean_norm


class UncertaintyAugmenter(nn.Module):
    """``n`` UA blocks turning features [B, d_in] into a Gaussian [B, d] (+ M samples).

    ``logvar_init=None`` sets each block's log-variance bias by :meth:`UABlock.init_noise_ratio`
    (``noise_ratio``, inputs of norm ``input_norm``; a stacked block's inputs have the norm of
    the previous block's means); a number sets every bias to it.

    ``stacked``: h_0 = x, (mu_l, sigma_l) = UA_l(h_{l-1}); the Gaussian is the last block's on
    the mean path (h_l = mu_l, what evaluation uses) and sample m follows its own chain
    h_l = z_l = mu_l + sigma_l * eps. ``parallel``: n heads on x, their samples averaged, i.e.
    N(mean_l mu_l, sum_l sigma_l^2 / n^2).
    """

    def __init__(
        self,
        d_in: int,
        d: int,
        n: int,
        mode: str,
        hidden_mult: int,
        dropout: float,
        logvar_init: float | None,
        logvar_range: tuple[float, float],
        noise_ratio: float = 0.1,
        input_norm: float = 1.0,
        norm_mean: bool = False,
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"method.n_ua must be >= 1, got {n}")
        self.mode = mode
        dims = [d_in] + [d if mode == "stacked" else d_in] * (n - 1)
        bias = 0.0 if logvar_init is None else logvar_init
        self.blocks = nn.ModuleList(
            UABlock(di, d, hidden_mult * d, dropout, bias, logvar_range, norm_mean) for di in dims
        )
        if logvar_init is None:
            norm = input_norm
            for block in self.blocks:
                mean_norm = block.init_noise_ratio(noise_ratio, norm)
                norm = mean_norm if mode == "stacked" else input_norm

    def forward(self, x: Tensor, num_samples: int = 0) -> Gaussian:
        if self.mode == "parallel":
            heads = [block(x[None]) for block in self.blocks]
            mu = torch.stack([m[0] for m, _ in heads]).mean(0)
            var = torch.stack([sigma_from_logvar(lv[0]) ** 2 for _, lv in heads]).sum(0)
            sigma = var.sqrt() / len(heads)
            z = reparameterize(mu, sigma, num_samples) if num_samples else None
            return Gaussian(mu, sigma, z)
        h = x[None]  # path 0 = the mean path; paths 1..M = the sample chains
        for i, block in enumerate(self.blocks):
            mu, logvar = block(h)
            sigma = sigma_from_logvar(logvar)
            if num_samples and i == 0:
                z = reparameterize(mu[0], sigma[0], num_samples)
            elif num_samples:
                z = reparameterize(mu[1:], sigma[1:], 1)[0]
            h = torch.cat([mu[:1], z]) if num_samples else mu
        return Gaussian(mu[0], sigma[0], h[1:] if num_samples else None)


# ----------------------------------------------------------------------------------------------
# Schedule (§5)
# ----------------------------------------------------------------------------------------------


def multistep_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_epochs: int, milestones: list[int], gamma: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """The authors' ``MultiStepWithWarmup`` (stepped per epoch): lr x gamma^2 rising linearly to
    lr over ``warmup_epochs``, then x gamma at each of ``milestones`` (absolute epochs)."""
    from torch.optim.lr_scheduler import LinearLR, MultiStepLR, SequentialLR

    if list(milestones) != sorted(milestones) or any(m <= warmup_epochs for m in milestones):
        raise ValueError(
            f"method.milestones={list(milestones)} must be increasing epochs after "
            f"method.warmup_epochs={warmup_epochs}"
        )
    decay = MultiStepLR(optimizer, [m - warmup_epochs for m in milestones], gamma=gamma)
    if warmup_epochs == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=gamma**2, total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_epochs])


# ----------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------


def _tower_prefixes(
    backbone: nn.Module,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Parameter-name prefixes of (image tower, text tower, unused) for open_clip / BLIP-2."""
    from xmodal.backbones.blip2 import Blip2QFormer

    if isinstance(backbone, Blip2QFormer):  # the Q-Former serves both towers
        image = ("vision_model.", "query_tokens", "vision_projection.", "qformer.")
        text = ("embeddings.", "text_projection.", "qformer.")
        return image, text, ("itm_head.",)
    return ("visual.",), ("",), ("logit_scale", "logit_bias")


class RUIR(CIRModule):
    """RUIR on a CLIP-style backbone (``encode_image``/``encode_text``) of joint dimension d."""

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        cfg: RUIRConfig,
        run_dir: str | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        cfg.check()
        self.save_hyperparameters({"config": config} if config else {})
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.backbone = backbone
        self.train_image, self.train_text = self._select_trainable(backbone, cfg.train_backbone)
        d = embed_dim
        ua = dict(
            n=cfg.n_ua,
            mode=cfg.ua_mode,
            hidden_mult=cfg.hidden_mult,
            dropout=cfg.dropout,
            logvar_init=cfg.logvar_init,
            logvar_range=tuple(cfg.logvar_range),
            noise_ratio=cfg.init_noise_ratio,
            norm_mean=cfg.norm_mean,
        )
        # x_s = [v_r; t] in R^{2d}: norm sqrt(2) when both are normalised (the initial noise
        # ratio is relative to unit-norm tower outputs when they are not)
        self.source = UncertaintyAugmenter(2 * d, d, input_norm=math.sqrt(2), **ua)
        self.target = UncertaintyAugmenter(d, d, input_norm=1.0, **ua)  # [R] own blocks
        if not (cfg.isu or cfg.dr or cfg.lambda_kl or cfg.attenuation):  # baseline: sigma
            for block in [*self.source.blocks, *self.target.blocks]:  # takes no part in the loss
                block.logvar.requires_grad_(False)
        # attenuation: s_i = log mean_d sigma_s^2 relative to its value at initialisation (the
        # log-variance weights start at 0, so every query has it), so that s = 0 at the start
        # and the loss-attenuation optimum sigma^2 = initial sigma^2 x the query's loss keeps the
        # noise/signal ratio of init_noise_ratio's order instead of sigma^2 ~ loss ~ 1
        with torch.no_grad():  # (eval mode: no dropout mask drawn, the global RNG untouched)
            probe = self.source.eval()(torch.zeros(1, 2 * d)).sigma
        self.source.train()
        self.register_buffer("log_variance_init", probe.pow(2).mean().log(), persistent=False)
        log_inv_tau = torch.tensor(math.log(1 / cfg.tau))
        if cfg.learn_tau:
            self.log_inv_tau = nn.Parameter(log_inv_tau)
        else:
            self.register_buffer("log_inv_tau", log_inv_tau)
        self.export_uncertainty = cfg.export_uncertainty  # scored by cosine (CIRModule.scoring)

    @staticmethod
    def _select_trainable(backbone: nn.Module, towers: str) -> tuple[bool, bool]:
        """Freeze what ``train_backbone`` does not train; returns (train image, train text)."""
        image, text, unused = _tower_prefixes(backbone)
        train_image, train_text = towers in ("both", "image"), towers in ("both", "text")
        shared = set(image) & set(text)
        if shared and towers in ("image", "text"):
            raise ValueError(
                f"method.train_backbone={towers}: this backbone's {sorted(shared)} serves both "
                "towers, so one tower cannot be trained alone; use both or none."
            )
        for name, p in backbone.named_parameters():
            in_image = name.startswith(image)
            wanted = (in_image and train_image) or (
                not in_image and name.startswith(text) and train_text
            )
            if name.startswith(unused) or not wanted:
                p.requires_grad_(False)
        return train_image, train_text

    @classmethod
    def from_config(cls, cfg: DictConfig) -> tuple[RUIR, CIRDataModule]:
        """The module and the CIR datamodule of a composed ``train`` config."""
        from xmodal import backbones

        m: RUIRConfig = OmegaConf.to_object(cfg.method)
        model, preprocess, tokenizer = backbones.build(cfg.backbone)
        with torch.no_grad():
            embed_dim = int(model.encode_text(tokenizer(["a"])).shape[-1])
        extra = [m.submission_split] if cfg.data.family == "cirr" and m.submission_split else []
        datamodule = CIRDataModule(
            cfg.data,
            preprocess,
            tokenizer,
            text_mode=m.text_mode,
            extra_test_splits=extra,
            seed=cfg.seed,
        )
        module = cls(
            model,
            embed_dim,
            m,
            run_dir=cfg.run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        return module, datamodule

    def train(self, mode: bool = True) -> RUIR:
        """The backbone stays in eval mode (frozen BatchNorm statistics, as CLIP4Cir fine-tunes)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # -- features ---------------------------------------------------------------------------
    @property
    def tau(self) -> Tensor:
        return 1 / self.log_inv_tau.exp().clamp(max=100)

    def encode_images(self, pixels: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.train_image and torch.is_grad_enabled()):
            return self.backbone.encode_image(pixels).float()

    def encode_texts(self, tokens: Any) -> Tensor:
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            return self.backbone.encode_text(tokens).float()

    def _norm(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.cfg.norm_inputs else x

    def source_gaussian(self, v_r: Tensor, t: Tensor, num_samples: int = 0) -> Gaussian:
        """UA blocks on x_s = [v_r; t] (§3)."""
        return self.source(torch.cat([self._norm(v_r), self._norm(t)], dim=-1), num_samples)

    def target_gaussian(self, v_t: Tensor, num_samples: int = 0) -> Gaussian:
        """The target branch's UA blocks on v_t (§3)."""
        return self.target(self._norm(v_t), num_samples)

    # -- training (§4) ------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        c = self.cfg
        v_r, v_t = self.encode_images(torch.cat([batch["reference"], batch["target"]])).chunk(2)
        t = self.encode_texts(batch["text"])
        m = c.num_samples if c.isu else 0
        # Gaussians + M samples (§3), over the global batch (gathered from every rank)
        src = gathered(self.source_gaussian(v_r, t, m))
        tgt = gathered(self.target_gaussian(v_t, m))
        # stochastic ranking list from M samples of both ends; the baseline ranks the means
        z_s, z_t = (src.z, tgt.z) if c.isu else (src.mu[None], tgt.mu[None])

        ranking: dict[str, Tensor] = {}  # per-query ranking losses [B]
        if not (c.csu and c.csu_replaces_isu):
            ranking["isu"] = isu_loss(z_s, z_t, self.tau, per_query=True)  # L_ISU
        if c.csu:
            positives = csu_positives(tgt.mu, c.theta, src.mu if c.csu_space == "query" else None)
            ranking["csu"] = c.lambda_csu * csu_loss(  # L_CSU
                z_s, z_t, positives, self.tau, per_query=True
            )
            self.log("train/csu_extra_positives", (positives.sum(1) - 1).float().mean())
        losses = {k: v.mean() for k, v in ranking.items()}
        if c.attenuation:  # option: the ranking losses attenuated by each query's variance
            log_var = src.sigma.float().pow(2).mean(-1).log() - self.log_variance_init
            self.log_dict({f"train/{k}": v for k, v in losses.items()})  # before attenuation
            losses = {"attenuated": attenuated_loss(sum(ranking.values()), log_var)}
        if c.dr:
            losses["dr"] = c.lambda_dr * dr_loss(  # L_DR, 2-Wasserstein
                src.mu, src.sigma, tgt.mu, tgt.sigma, normalized=c.dr_on == "normalized"
            )
        if c.lambda_kl:  # optional prior term: keeps sigma from collapsing and |mu| bounded
            losses["kl"] = c.lambda_kl * kl_loss(
                src.mu, src.sigma, tgt.mu, tgt.sigma, c.kl_prior_std
            )
        # L = L_ISU + lambda_CSU L_CSU + lambda_DR L_DR (+ KL); attenuation: the first two
        loss = sum(losses.values())  # attenuated per query

        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items()})
        self.log("train/sigma_s", src.sigma.mean())
        self.log("train/sigma_t", tgt.sigma.mean())
        for side, gauss in (("s", src), ("t", tgt)):  # |z - mu| / |mu|: 0 = plain InfoNCE
            noise = gauss.sigma.pow(2).sum(-1).sqrt() / gauss.mu.norm(dim=-1).clamp_min(1e-12)
            self.log(f"train/noise_ratio_{side}", noise.mean())
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.cfg
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        heads = [p for n, p in trainable if not n.startswith("backbone.")]
        backbone = [p for n, p in trainable if n.startswith("backbone.")]
        groups = [{"params": heads, "lr": c.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": c.lr * c.backbone_lr_scale})
        fused = True if self.device.type == "cpu" else None  # CPU: several times faster steps
        optimizer = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay, fused=fused)
        scheduler = multistep_with_warmup(optimizer, c.warmup_epochs, c.milestones, c.gamma)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def configure_callbacks(self) -> list[pl.Callback]:
        if self.cfg.early_stopping_patience is None:
            return []
        from lightning.pytorch.callbacks import EarlyStopping

        return [
            EarlyStopping(self.cfg.monitor, patience=self.cfg.early_stopping_patience, mode="max")
        ]

    # -- evaluation (xmodal.protocols.cir): features, then the UA means and the query sigma -----
    def encode_gallery(self, pixels: Tensor) -> dict[str, Tensor]:
        return {"v": self.encode_images(pixels)}

    def encode_queries(self, tokens: Any) -> dict[str, Tensor]:
        return {"t": self.encode_texts(tokens)}

    def embed(
        self, gallery: dict[str, Tensor], queries: dict[str, Tensor], reference: Tensor
    ) -> Embedded:
        """q = normalize(mu_s) [Q, d] and g = normalize(mu_t) [G, d], ranked by cosine; the
        uncertainty u = mean_d sigma_s^2 of the query. The reference features are the gallery's."""
        v_g = gallery["v"]
        src = self.source_gaussian(v_g[reference], queries["t"])  # deterministic: the means
        tgt = self.target_gaussian(v_g)
        q, g = F.normalize(src.mu, dim=-1), F.normalize(tgt.mu, dim=-1)
        return Embedded(q, g, uncertainty=src.sigma.pow(2).mean(-1))
