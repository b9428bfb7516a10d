"""``method=probvlm``: ProbVLM, probabilistic adapters for a frozen CLIP (docs/probvlm.md).

"ProbVLM: Probabilistic Adapter for Frozen Vision-Language Models" (Upadhyay, Karthik, Mancini,
Akata, ICCV 2023; code ExplainableML/ProbVLM). One BayesCap-style adapter per modality maps a frozen
embedding z to the parameters of a generalized Gaussian per dimension: the mean z_hat, the scale
alpha and the shape beta. Training (eq 8) maximises the likelihood of each embedding under its own
distribution (intra-modal, eq 3) and of the paired other modality's embedding (cross-modal, eq 7):

    L = L_rec(z_V | V) + L_rec(z_T | T) + lambda_cross [L_rec(z_T | V) + L_rec(z_V | T)]

Uncertainty: the aleatoric variance alpha^2 Gamma(3/beta) / Gamma(1/beta), the epistemic variance of
z_hat over dropout passes and their sum (eq 9), each averaged over dimensions per query; the
confidence is its negative. The encoders stay frozen, so every split is encoded once through the
embedding cache under the keys the evaluators use (``xmodal.protocols.retrieval.embedding_key``) and
an epoch is an MLP pass. The test reports, per direction (t2i: caption queries, i2t: image
queries), uCLIP's protocol under uCLIP's keys (:func:`xmodal.metrics.calibration.
calibration_report`): S / R² / −S·R² over the R@1 of confidence bins, AUROC, AURC, rejection
curves and R@K, ranking with the frozen embeddings as the paper does (all its methods "achieve the
same performance on the retrieval task"), and the reconstruction likelihood of the trained and of
the untrained (initial) adapters.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from xmodal.methods.schemas import PROBVLM_UNCERTAINTIES, PROBVLM_VARIANTS, ProbVLMConfig
from xmodal.metrics.calibration import TIES
from xmodal.probabilistic import (
    exact,
    generalized_gaussian_nll,
    generalized_gaussian_variance,
)

log = logging.getLogger("xmodal")

INPUT_NORMS = ("unit", "raw", "official")
LIKELIHOODS = ("exact", "official")
#: What a null switch of ProbVLMConfig means under each variant.
VARIANT_DEFAULTS = {
    "paper": {
        "input_norm": "unit",
        "head_activation": "softplus",
        "likelihood": "exact",
        "l1_weight": 0.0,
        "nll_weight": 1.0,
        "uncertainty_clamps": False,
    },
    "official": {
        "input_norm": "official",
        "head_activation": "relu",
        "likelihood": "official",
        "l1_weight": 1.0,
        "nll_weight": 5e-2,
        "uncertainty_clamps": True,
    },
}
#: The released code's get_GGuncer: alpha = 1 / (head + 1e-5) in [1e-4, 5], beta = head + 0.1 in
#: [0.1, 5] (used for the uncertainty only, never in the loss).
OFFICIAL_UNCERTAINTY_CLAMPS = {"alpha_eps": 1e-5, "alpha": (1e-4, 5.0), "beta_add": 0.1}
OFFICIAL_UNCERTAINTY_CLAMPS["beta"] = (0.1, 5.0)


def resolve_config(cfg: ProbVLMConfig) -> ProbVLMConfig:
    """A copy with every null switch replaced by its variant's value, checked."""
    if cfg.variant not in PROBVLM_VARIANTS:
        raise ValueError(f"method.variant={cfg.variant!r} is not one of {PROBVLM_VARIANTS}")
    out = copy.deepcopy(cfg)
    for key, value in VARIANT_DEFAULTS[cfg.variant].items():
        if getattr(out, key) is None:
            setattr(out, key, value)
    choices = {
        "input_norm": INPUT_NORMS,
        "head_activation": ("relu", "softplus"),
        "likelihood": LIKELIHOODS,
        "lr_schedule": ("constant", "cosine"),
        "uncertainty": PROBVLM_UNCERTAINTIES,
        "rank_with": ("frozen", "mean"),
        "ties": TIES,
    }
    for key, allowed in choices.items():
        if getattr(out, key) not in allowed:
            raise ValueError(f"method.{key}={getattr(out, key)!r} is not one of {allowed}")
    for name in out.compare:
        if name not in PROBVLM_UNCERTAINTIES:
            raise ValueError(f"method.compare: {name!r} is not one of {PROBVLM_UNCERTAINTIES}")
    wanted = [out.uncertainty, *out.compare]
    if out.mc_passes < 2 and any(u != "aleatoric" for u in wanted):
        raise ValueError(
            f"method.mc_passes={out.mc_passes}: the epistemic and total uncertainties need at "
            "least 2 dropout passes; set method.mc_passes=15 or method.compare=[] with "
            "method.uncertainty=aleatoric"
        )
    return out


# ----------------------------------------------------------------------------------------------
# The adapter and the losses
# ----------------------------------------------------------------------------------------------


class BayesCapAdapter(nn.Module):
    """One modality's adapter: h = z + MLP(z) (dim -> hidden -> hidden -> dim, dropout after the
    second layer), then three heads on h: the mean (Linear-ReLU-Linear) and two non-negative heads
    (Linear-ReLU-Linear-``positive``) read as 1/alpha and beta (:func:`distribution` adds the
    epsilons). The layout of the released ``BayesCap_MLP`` with ``num_layers=3``, whose heads end
    in a ReLU (``positive="relu"``); ``"softplus"`` cannot die (see ``head_activation``)."""

    def __init__(
        self, dim: int, hidden: int = 256, dropout: float = 0.1, positive: str = "relu"
    ) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )

        if positive not in ("relu", "softplus"):
            raise ValueError(f"positive={positive!r}: expected relu or softplus")
        last = nn.ReLU if positive == "relu" else nn.Softplus

        def head(nonnegative: bool) -> nn.Sequential:
            layers = [nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)]
            return nn.Sequential(*layers, *([last()] if nonnegative else []))

        self.mean_head, self.inv_alpha_head, self.beta_head = head(False), head(True), head(True)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu_hat, inverse-alpha head, beta head)``, each like ``z``; the heads are >= 0."""
        h = z + self.trunk(z)
        return self.mean_head(h), self.inv_alpha_head(h), self.beta_head(h)


@dataclass
class GG:
    """A generalized Gaussian per dimension: mean ``mu``, scale ``alpha``, shape ``beta``."""

    mu: Tensor
    alpha: Tensor
    beta: Tensor


def distribution(out: tuple[Tensor, Tensor, Tensor], alpha_eps: float, beta_eps: float) -> GG:
    """The adapter's heads as a distribution: alpha = 1 / (head + alpha_eps), beta = head +
    beta_eps (the released code's parameterisation)."""
    mu, inv_alpha, beta = out
    return GG(mu, 1.0 / (inv_alpha.float() + alpha_eps), beta.float() + beta_eps)


@exact
def official_likelihood(
    target: Tensor, gg: GG, residual_range: tuple[float, float] = (1e-4, 1e3)
) -> Tensor:
    """The released code's likelihood term (``GenGaussLoss``), element-wise: its residual is
    clamp(|mu - z| / alpha * beta, lo, hi), not eq 3's (|mu - z| / alpha)^beta (the power is
    commented out there), then - log(1/alpha) + lgamma(1/beta) - log(beta)."""
    residual = ((gg.mu - target).abs() / gg.alpha * gg.beta).clamp(*residual_range)
    return residual + gg.alpha.log() + torch.lgamma(gg.beta.reciprocal()) - gg.beta.log()


def loss_term(target: Tensor, gg: GG, cfg: ProbVLMConfig) -> Tensor:
    """One term of eq 8 (mean over batch and dimensions): nll_weight x the likelihood term of
    ``target`` under ``gg`` (+ l1_weight x |mu_hat - target|, the released code's T1)."""
    if cfg.likelihood == "exact":
        nll = generalized_gaussian_nll(target, gg.mu, gg.alpha, gg.beta)
    else:
        nll = official_likelihood(target, gg, tuple(cfg.official_residual_range))
    loss = cfg.nll_weight * nll.mean()
    if cfg.l1_weight:
        loss = loss + cfg.l1_weight * (gg.mu.float() - target.float()).abs().mean()
    return loss


def probvlm_loss(
    z_v: Tensor, z_t: Tensor, image: GG, text: GG, cfg: ProbVLMConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq 8 on a batch of pairs: (loss, its parts)."""
    parts = {
        "rec_image": loss_term(z_v, image, cfg),  # eq 3, vision
        "rec_text": loss_term(z_t, text, cfg),  # eq 3, text
        "cross": loss_term(z_t, image, cfg) + loss_term(z_v, text, cfg),  # eq 7
    }
    return parts["rec_image"] + parts["rec_text"] + cfg.lambda_cross * parts["cross"], parts


def aleatoric_variance(out: tuple[Tensor, Tensor, Tensor], cfg: ProbVLMConfig) -> Tensor:
    """Per-dimension aleatoric variance alpha^2 Gamma(3/beta) / Gamma(1/beta) (ProbVLM §3.2) of
    the adapter's heads; with ``uncertainty_clamps`` alpha and beta as the released code clamps
    them for its uncertainty (:data:`OFFICIAL_UNCERTAINTY_CLAMPS`)."""
    if cfg.uncertainty_clamps:
        c = OFFICIAL_UNCERTAINTY_CLAMPS
        alpha = (1.0 / (out[1].float() + c["alpha_eps"])).clamp(*c["alpha"])
        beta = (out[2].float() + c["beta_add"]).clamp(*c["beta"])
    else:
        gg = distribution(out, cfg.alpha_eps, cfg.beta_eps)
        alpha, beta = gg.alpha, gg.beta
    return generalized_gaussian_variance(alpha, beta)


@contextlib.contextmanager
def mc_dropout(module: nn.Module, p: float | None = None) -> Iterator[None]:
    """Every Dropout of ``module`` active (and with probability ``p`` when given) inside the
    block, whatever the module's mode; modes and probabilities are restored on exit."""
    dropouts = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    saved = [(m, m.training, m.p) for m in dropouts]
    try:
        for m in dropouts:
            m.train()
            if p is not None:
                m.p = float(p)
        yield
    finally:
        for m, mode, prob in saved:
            m.train(mode)
            m.p = prob


# ----------------------------------------------------------------------------------------------
# Cached embeddings of the splits
# ----------------------------------------------------------------------------------------------


@dataclass
class EmbeddedSplit:
    """Frozen embeddings of one split (invalid images and their captions dropped): images [I, D],
    captions [T, D] in image-major order, ``caption_image`` [T] (the image of each caption)."""

    image: Tensor
    text: Tensor
    caption_image: Tensor
    skipped_images: int = 0
    items: dict[str, list[str]] | None = None  # query ids (xmodal.protocols.uncertainty)


def _single_device(trainer_cfg: DictConfig) -> None:
    devices = trainer_cfg.devices
    one = devices in (1, "1") or (isinstance(devices, list | tuple) and len(devices) == 1)
    if not one or int(trainer_cfg.num_nodes) != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"method=probvlm trains two small MLPs on cached embeddings on one device, but "
            f"trainer.devices={devices}, trainer.num_nodes={trainer_cfg.num_nodes} (WORLD_SIZE="
            f"{os.environ.get('WORLD_SIZE', '1')}). Fix: trainer=gpu (or cpu). To encode a large "
            "dataset on several GPUs first, run `xmodal-eval evaluator=retrieval trainer=ddp "
            "data=<name> data.split=<train|val|test> backbone=<name>` once per split: it fills "
            "the same embedding cache entries."
        )


def _encoding_trainer(trainer_cfg: DictConfig) -> pl.Trainer:
    """A one-device inference trainer for the frozen encoders (the run's accelerator and
    precision, as the evaluators encode with); :func:`encode_splits` logs a line per split."""
    return pl.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=1,
        precision=trainer_cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def subset_split(split: Any, fraction: float, seed: int) -> Any:
    """round(fraction x images) (at least 1) images of a ``RetrievalSplit`` drawn without
    replacement by ``seed``, in their original order, with all their captions."""
    from xmodal.data.base import RetrievalSplit

    if not 0 < fraction <= 1:
        raise ValueError(f"method.train_fraction={fraction} must be in (0, 1]")
    if fraction == 1:
        return split
    n = len(split.image_paths)
    g = torch.Generator().manual_seed(int(seed))
    keep = torch.randperm(n, generator=g)[: max(1, round(fraction * n))].sort().values.tolist()
    new_index = {old: new for new, old in enumerate(keep)}
    pairs = [
        (t, new_index[i]) for t, i in zip(split.captions, split.caption_image) if i in new_index
    ]
    return RetrievalSplit(
        f"{split.name}[{fraction:g}]",
        [split.image_paths[i] for i in keep],
        [t for t, _ in pairs],
        [i for _, i in pairs],
    )


def encode_splits(
    cfg: DictConfig,
    roles: dict[str, tuple[DictConfig, str | None]],
    use_cache: bool = True,
    train_fraction: float = 1.0,
) -> tuple[dict[str, EmbeddedSplit], float | None]:
    """Frozen embeddings of every split in ``roles`` (role -> (data config, split name)), through
    the embedding cache under :func:`xmodal.protocols.retrieval.embedding_key`, the keys the
    evaluators use: a warm cache encodes nothing (the backbone is built for its identity and
    transform, and to read its logit scale). ``train_fraction`` < 1 keeps that share of the
    ``train`` role's images (by ``cfg.seed``). Returns the splits and exp(logit_scale) (or
    None)."""
    from xmodal import backbones
    from xmodal.data.datamodule import load_split
    from xmodal.data.images import ImageDataset
    from xmodal.protocols.retrieval import drop_invalid_images, embedding_key
    from xmodal.protocols.uncertainty import retrieval_items
    from xmodal.retrieval.cache import EmbeddingCache
    from xmodal.retrieval.encode import TextDataset, encode_cached, text_collate

    model, preprocess, tokenizer = backbones.build(cfg.backbone)
    scale = getattr(model, "logit_scale", None)
    logit_scale = float(scale.detach().float().exp()) if isinstance(scale, Tensor) else None
    cache = EmbeddingCache(cfg.paths.cache_dir, enabled=use_cache)
    trainer: pl.Trainer | None = None
    out = {}
    for role, (data_cfg, split_name) in roles.items():
        if not split_name:
            continue
        split = load_split(data_cfg, split_name)
        if role == "train":
            split = subset_split(split, train_fraction, cfg.seed)
        emb = {}
        for kind, items in (("image", split.image_paths), ("text", split.captions)):
            key = embedding_key(data_cfg, cfg.backbone, preprocess, kind, items)
            hit = cache.load(key)
            log.info(
                "ProbVLM %s split (%s): %d %ss %s",
                role,
                split_name,
                len(items),
                kind,
                "from the cache" if hit is not None else "encoding",
            )
            if hit is not None:
                emb[kind] = (hit["emb"], hit["valid"])
                continue
            if trainer is None:
                trainer = _encoding_trainer(cfg.trainer)
            if kind == "image":
                dataset = ImageDataset(items, preprocess, on_corrupt=data_cfg.on_corrupt)
                kwargs = {}
            else:
                dataset, kwargs = TextDataset(items), {"collate_fn": text_collate(tokenizer)}
            loader = {"batch_size": data_cfg.batch_size, "num_workers": data_cfg.num_workers}
            emb[kind] = encode_cached(cache, key, trainer, model, dataset, kind, **kwargs, **loader)
        image, text, caption_image, skipped = drop_invalid_images(
            split, emb["image"][0], emb["text"][0], emb["image"][1]
        )
        items = retrieval_items(split, data_cfg.root, emb["image"][1])
        out[role] = EmbeddedSplit(image.float(), text.float(), caption_image, skipped, items)
    return out, logit_scale


def normalise_inputs(split: EmbeddedSplit, how: str, logit_scale: float | None) -> EmbeddedSplit:
    """The adapters' inputs: ``unit`` (both L2-normalised), ``raw``, or ``official`` (unit text,
    unit image x exp(logit_scale): what the released code's CLIP wrapper returns)."""
    if how == "raw":
        return split
    image, text = F.normalize(split.image, dim=-1), F.normalize(split.text, dim=-1)
    if how == "official":
        if logit_scale is None:
            raise ValueError(
                "method.input_norm=official scales image embeddings by exp(logit_scale), but this "
                "backbone has no logit_scale; use method.input_norm=unit"
            )
        image = image * logit_scale
    return EmbeddedSplit(image, text, split.caption_image, split.skipped_images, split.items)


class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class ProbVLMDataModule(pl.LightningDataModule):
    """(image, caption) embedding pairs, one per caption (the released loaders' unit), shuffled
    by seed and epoch for training; val pairs in order; test images and captions as two loaders
    of ``(index, embedding)``. Batches gather rows of the cached tensors (no per-item copies)."""

    def __init__(self, splits: dict[str, EmbeddedSplit], batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.splits, self.batch_size, self.seed = splits, int(batch_size), seed

    def _pairs(self, role: str) -> Any:
        split = self.splits[role]

        def collate(idx: list[int]) -> tuple[Tensor, Tensor]:
            t = torch.tensor(idx, dtype=torch.long)
            return split.image[split.caption_image[t]], split.text[t]

        return _Indices(len(split.text)), collate

    def train_dataloader(self) -> DataLoader:
        from xmodal.data.datamodule import train_loader

        dataset, collate = self._pairs("train")
        return train_loader(dataset, self.batch_size, self.trainer, self.seed, collate)

    def val_dataloader(self) -> list[DataLoader]:
        if "val" not in self.splits:
            return []
        dataset, collate = self._pairs("val")
        return [DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate)]

    def test_dataloader(self) -> list[DataLoader]:
        split = self.splits["test"]
        loaders = []
        for emb in (split.image, split.text):

            def collate(idx: list[int], emb: Tensor = emb) -> tuple[Tensor, Tensor]:
                t = torch.tensor(idx, dtype=torch.long)
                return t, emb[t]

            loaders.append(
                DataLoader(_Indices(len(emb)), batch_size=self.batch_size, collate_fn=collate)
            )
        return loaders


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


class ProbVLM(pl.LightningModule):
    """Two adapters (image, text) trained by eq 8 on frozen embeddings; uncertainty at test."""

    def __init__(
        self,
        embed_dim: int,
        cfg: ProbVLMConfig,
        run_dir: str | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.cfg = resolve_config(cfg)
        self.save_hyperparameters({"config": config} if config else {})
        c = self.cfg
        self.adapters = nn.ModuleDict(
            {
                kind: BayesCapAdapter(embed_dim, c.hidden_dim, c.dropout, c.head_activation)
                for kind in ("image", "text")
            }
        )
        # the initial weights, kept (frozen) to measure what training bought
        self.untrained = copy.deepcopy(self.adapters).requires_grad_(False)
        self.run_dir = Path(run_dir) if run_dir else None
        self.datamodule: ProbVLMDataModule | None = None
        self.extra_metrics: dict[str, Any] = {}
        self._val: list[Tensor] = []
        self._test: dict[int, list[dict[str, Tensor]]] = {}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> tuple[ProbVLM, ProbVLMDataModule]:
        """Encode (or load from the cache) the train / val / test splits, then build the module
        and the datamodule of embedding pairs."""
        from xmodal.data.datamodule import ensure_shapes_world

        _single_device(cfg.trainer)
        m: ProbVLMConfig = resolve_config(OmegaConf.to_object(cfg.method))
        test_data = cfg.method.get("test_data") or cfg.data
        if cfg.method.get("test_data"):
            ensure_shapes_world(test_data, cfg.paths.shapes_dir)
        roles = {
            "train": (cfg.data, cfg.data.train_split),
            "val": (cfg.data, cfg.data.val_split),
            "test": (test_data, test_data.split),
        }
        raw, logit_scale = encode_splits(cfg, roles, m.cache, m.train_fraction)
        splits = {k: normalise_inputs(v, m.input_norm, logit_scale) for k, v in raw.items()}
        embed_dim = int(splits["train"].image.shape[1])
        # encoding on a cache miss draws from the global RNG (the loaders' base seeds): seed again
        # so that the adapters and training's dropout do not depend on the cache state
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = cls(
            embed_dim, m, run_dir=cfg.run_dir, config=OmegaConf.to_container(cfg, resolve=True)
        )
        datamodule = ProbVLMDataModule(splits, cfg.data.batch_size, seed=cfg.seed)
        module.datamodule = datamodule
        module.extra_metrics["test/skipped_images"] = splits["test"].skipped_images
        return module, datamodule

    def forward(self, z: Tensor, kind: str) -> GG:
        """The distribution of the frozen embeddings ``z`` of ``kind`` (image | text)."""
        return distribution(self.adapters[kind](z), self.cfg.alpha_eps, self.cfg.beta_eps)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        z_v, z_t = batch
        loss, parts = probvlm_loss(z_v, z_t, self(z_v, "image"), self(z_t, "text"), self.cfg)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.adapters.parameters(), lr=self.cfg.lr)
        if self.cfg.lr_schedule == "constant":
            return optimizer
        epochs = max(1, int(self.trainer.max_epochs or 1))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    # -- validation: the released code's reconstruction error, and the likelihood -----------
    def _reconstruction(self, z: Tensor, kind: str, adapters: nn.ModuleDict) -> dict[str, Tensor]:
        """Per item: mean |mu_hat - z| and the mean generalized-Gaussian NLL of z per dimension."""
        out = adapters[kind](z)
        gg = distribution(out, self.cfg.alpha_eps, self.cfg.beta_eps)
        nll = generalized_gaussian_nll(z, gg.mu, gg.alpha, gg.beta).mean(-1)
        return {"mae": (gg.mu.float() - z.float()).abs().mean(-1), "nll": nll, "out": out}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        z_v, z_t = batch
        image = self._reconstruction(z_v, "image", self.adapters)
        text = self._reconstruction(z_t, "text", self.adapters)
        self._val.append(torch.stack([image["mae"] + text["mae"], image["nll"], text["nll"]], 1))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        values = torch.cat(self._val).double().mean(0)
        self._val.clear()
        self.log("val/MAE", values[0], prog_bar=True)  # eval_ProbVLM: image + text MAE per pair
        self.log("val/image_NLL", values[1])
        self.log("val/text_NLL", values[2])
        self.log("val/NLL", (values[1] + values[2]) / 2)

    # -- test: uncertainty through uCLIP's protocol ------------------------------------------
    def test_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        idx, z = batch
        kind = ("image", "text")[dataloader_idx]
        c = self.cfg
        trained = self._reconstruction(z, kind, self.adapters)
        untrained = self._reconstruction(z, kind, self.untrained)
        row = {
            "idx": idx,
            "mu": trained["out"][0].float(),
            "aleatoric": aleatoric_variance(trained["out"], c).mean(-1),
            "nll": trained["nll"],
            "mae": trained["mae"],
            "nll_untrained": untrained["nll"],
            "mae_untrained": untrained["mae"],
        }
        if c.mc_passes >= 2:
            with mc_dropout(self.adapters[kind], c.mc_dropout):
                means = torch.stack([self.adapters[kind](z)[0].float() for _ in range(c.mc_passes)])
            row["epistemic"] = means.var(0, unbiased=False).mean(-1)  # (1/M) sum (z_m - mean)^2
            row["total"] = row["aleatoric"] + row["epistemic"]  # eq 9
        self._test.setdefault(dataloader_idx, []).append(row)

    def _gathered(self, dataloader_idx: int) -> dict[str, Tensor]:
        rows = self._test[dataloader_idx]
        idx = torch.cat([r["idx"] for r in rows]).cpu()
        order = torch.argsort(idx)
        return {k: torch.cat([r[k] for r in rows]).cpu()[order] for k in rows[0] if k != "idx"}

    def on_test_epoch_end(self) -> None:
        from xmodal.metrics.calibration import calibration_report
        from xmodal.protocols.uclip import Posterior, write_calibration_outputs

        if not self._test:
            return
        c = self.cfg
        image, text = self._gathered(0), self._gathered(1)
        self._test.clear()
        split = self.datamodule.splits["test"]
        if c.rank_with == "frozen":
            text_rank, image_rank = split.text, split.image
        else:
            text_rank, image_rank = text["mu"], image["mu"]
        posterior = Posterior(
            text_rank[None], image_rank[None], split.caption_image, depth=max(c.ks)
        )
        names = list(dict.fromkeys([c.uncertainty, *c.compare]))
        confidences = {u: (-text[u].double(), -image[u].double()) for u in names}
        metrics, curves = calibration_report(
            confidences,
            posterior.ranks(),
            steps={"t2i": c.rejection_step_t2i, "i2t": c.rejection_step_i2t},
            ks=c.ks,
            num_bins=c.num_bins,
            ties=c.ties,
            oracle=posterior.oracle(),
            pcmepp=c.pcmepp,
        )
        for name, values in (("image", image), ("text", text)):
            for key in ("nll", "mae", "nll_untrained", "mae_untrained"):
                metrics[f"test/{name}/recon_{key}"] = float(values[key].double().mean())
            for u in names:
                metrics[f"test/{name}/mean_{u}"] = float(values[u].double().mean())
        for key in ("nll", "mae", "nll_untrained", "mae_untrained"):  # both modalities
            both = (metrics[f"test/image/recon_{key}"] + metrics[f"test/text/recon_{key}"]) / 2
            metrics[f"test/recon_{key}"] = both
        metrics["test/num_images"] = int(split.image.shape[0])
        metrics["test/num_texts"] = int(split.text.shape[0])
        for key, value in metrics.items():
            if isinstance(value, float) and math.isfinite(value):
                self.log(key, value)
        self.extra_metrics.update(metrics)
        if c.plots and self.run_dir is not None and self.trainer.global_rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_calibration_outputs(self.run_dir, curves, c.ks)
        if split.items is not None and self.run_dir is not None and self.trainer.global_rank == 0:
            self._write_uncertainty(split.items, posterior.ranks(), image, text, names)

    def _write_uncertainty(
        self,
        items: dict[str, list[str]],
        ranks: dict[str, Tensor],
        image: dict[str, Tensor],
        text: dict[str, Tensor],
        names: list[str],
    ) -> None:
        """Each query's predicted variances (``method.uncertainty`` first) to
        ``uncertainty/test_{i2t,t2i}.csv`` (:mod:`xmodal.protocols.uncertainty`), scored against
        the data's ambiguity when it records one."""
        from xmodal.protocols.uncertainty import write_retrieval_csvs

        uncertainties = {u: {"i2t": image[u].double(), "t2i": text[u].double()} for u in names}
        write_retrieval_csvs(self.run_dir, items, ranks, uncertainties)
