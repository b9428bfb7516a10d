"""Schemas of the trainable methods (``conf/method/*.yaml``), torch-free.

They live apart from the methods' code so that composing a config (``xmodal.config``) never
imports torch or Lightning; each method module imports its own schema from here. Tags in the
comments: [R] reconstructed, [F] the authors' framework, [B] both paper and framework (see the
method's spec and ``docs/<method>.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmodal.errors import ConfigError, check_choice

#: HUG eq 16: the negatives of the fine-grained contrast.
FC_NEGATIVES = ("component", "instance", "modality")
HUG_VARIANTS = ("paper", "official")
HUG_TEXT_PASSES = ("skip", "zero_token", "cls")  # hug.md §2 options (a), (b), (c)


@dataclass
class ClipPretrainConfig:
    """``method=clip_pretrain``: contrastive pretraining of a (tiny) CLIP on image-caption pairs."""

    _target_: str = "xmodal.methods.clip_pretrain.ClipPretrain"
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    export_name: str | None = None  # also save the backbone to paths.checkpoint_dir/<name>.pt
    monitor: str = "val/R@1"  # checkpoint metric (mean of t2i and i2t R@1, percent)


@dataclass
class RUIRConfig:
    """``method=ruir`` (methods/ruir.md). [R] = reconstructed, [F] = the authors' framework."""

    _target_: str = "xmodal.methods.ruir.RUIR"
    # -- model (§2-3)
    train_backbone: str = "both"  # [R] both | image | text | none
    backbone_lr_scale: float = 0.1  # [R] backbone lr = lr x this
    norm_inputs: bool = True  # [R] L2-normalise v_r, t (and v_t) before the UA blocks
    n_ua: int = 2  # [R] UA blocks per branch
    ua_mode: str = "stacked"  # [R] stacked | parallel
    hidden_mult: int = 2  # [R] UA hidden width d_h = hidden_mult x d
    dropout: float = 0.5  # [R] UA hidden dropout (CLIP4Cir/PLI combiner value)
    # [R] log-variance head: zero weights and this bias; null: the bias that makes the initial
    # noise norm sigma sqrt(d) init_noise_ratio x |mu| (any d); -5.0 is the spec's fixed value
    logvar_init: float | None = None
    init_noise_ratio: float = 0.1
    logvar_range: list[float] = field(default_factory=lambda: [-60.0, 20.0])  # clamp, stability
    norm_mean: bool = False  # L2-normalise every UA block's mean: sigma alone sets noise/signal
    # -- losses (§4)
    isu: bool = True  # stochastic ranking list (M samples); false: deterministic InfoNCE on mu
    csu: bool = True
    dr: bool = True
    num_samples: int = 5  # [R] M
    tau: float = 0.07  # [F]
    learn_tau: bool = False  # learnable temperature initialised at tau
    theta: float = 0.9  # [R] CSU similarity threshold
    csu_space: str = "query"  # [B] query: cos(mu_s^i, mu_t^j) (the paper's "similarity above
    # theta to the source feature"); [R] target: cos(mu_t^i, mu_t^j)
    csu_replaces_isu: bool = False  # [R] L = lambda_CSU L_CSU + ... instead of L_ISU + ...
    lambda_csu: float = 1.0  # [R]
    lambda_dr: float = 0.1  # [R]
    dr_on: str = "normalized"  # [R] W2 on L2-normalised means (normalized) or raw means
    lambda_kl: float = 0.0  # KL of both Gaussians to N(0, s^2 I) per dimension (0: off)
    kl_prior_std: float | None = None  # s; null: 1/sqrt(d), a noise norm of 1 = a unit mean's
    attenuation: bool = False  # learned loss attenuation of the ranking losses by the query's
    # variance (Kendall & Gal 2017; not in the paper): sigma grows with the query's ranking loss
    # -- training (§5)
    lr: float = 1e-5  # [F]
    weight_decay: float = 5e-5  # [F]
    warmup_epochs: int = 5  # [F] linear warm-up from gamma^2 x lr
    milestones: list[int] = field(default_factory=lambda: [35, 45])  # [F] lr x gamma at each
    gamma: float = 0.1  # [F]
    early_stopping_patience: int | None = None  # [R] epochs without a better monitor value
    text_mode: str = "both_orders"  # [F] xmodal.data.cir.TEXT_MODES
    # -- evaluation
    monitor: str = "val/R@10"  # best checkpoint (FashionIQ: mean over categories)
    submission_split: str | None = "test1"  # CIRR: also write the test-server files for it
    export_uncertainty: bool = True  # per-query uncertainty + calibration at test time

    def check(self) -> RUIRConfig:
        """Refuse values outside their choices (ConfigError naming the key); returns self."""
        for key, allowed in (
            ("train_backbone", ("both", "image", "text", "none")),
            ("ua_mode", ("stacked", "parallel")),
            ("csu_space", ("target", "query")),
            ("dr_on", ("normalized", "raw")),
        ):
            check_choice(f"method.{key}", getattr(self, key), allowed)
        return self


@dataclass
class HUGConfig:
    """``method=hug`` (methods/hug.md). The defaults are the paper's full model (Table 3 row 7)."""

    _target_: str = "xmodal.methods.hug.HUG"
    variant: str = "paper"  # paper | official (the released code, hug.md §8)
    # -- model
    text_pass: str | None = None  # skip | zero_token | cls; null: skip (paper), cls (official)
    estimator_heads: int = 4
    estimator_dropout: float = 0.1
    # -- Table 3 ablation flags
    prob: bool = True  # false: row 0, deterministic InfoNCE on mean-pooled normalised tokens
    granularity: str = "fine"  # fine | global (row 1: one Gaussian per item, GPO-pooled sigma)
    fc_neg: list[str] = field(default_factory=lambda: list(FC_NEGATIVES))  # eq 16 negatives
    use_sigma_m: bool = True  # false: sigma_q^2 = mean(sigma_r^2, sigma_t^2) (rows 0-4)
    fusion: str = "dynamic"  # dynamic (eqs 10-11) | static (mean over the sources)
    # -- losses
    lambda_fc: float = 0.5
    lambda_cord: float = 0.1
    hc_neg_scale: str = "batch"  # batch: B * mean over the B-1 negatives | sum: their sum
    fc_on: str = "std"  # the vectors contrasted in eq 16: std (sigma) | var (sigma^2)
    mismatch: str | None = None  # roll | randperm (texts of other triplets for eq 9); null: variant
    point_temperature: float = 0.07  # row 0 InfoNCE
    official_fc_temperature: float = 0.07
    official_cord_margin: float = 0.2
    # -- optimisation (hug.md §4)
    lr: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float | None = None  # null: 1e-7 (paper), 1e-8 (official)
    weight_decay: float = 0.01
    eta_min: float = 1e-6  # CosineAnnealingLR per epoch, T_max = trainer.max_epochs
    grad_clip: float | None = 1.0  # gradient norm clipping
    augment: bool = True  # flip + colour jitter on training images (the released code's)
    max_words: int = 50  # blip_caption truncation
    # -- evaluation
    chunk_size: int = 256  # queries per ranking chunk
    export_uncertainty: bool = True  # per-query uncertainties of the test split to the run dir
    monitor: str = "val/avg"  # FashionIQ (R@10+R@50)/2 averaged over categories; CIRR (R@5+Rs@1)/2

    def check(self) -> HUGConfig:
        """Refuse values outside their choices and impossible combinations; returns self."""
        for key, allowed in (
            ("variant", HUG_VARIANTS),
            ("text_pass", (None, *HUG_TEXT_PASSES)),
            ("granularity", ("fine", "global")),
            ("fusion", ("dynamic", "static")),
            ("fc_on", ("std", "var")),
            ("hc_neg_scale", ("batch", "sum")),
            ("mismatch", (None, "roll", "randperm")),
        ):
            check_choice(f"method.{key}", getattr(self, key), allowed)
        for kind in self.fc_neg:
            check_choice("method.fc_neg[]", kind, FC_NEGATIVES)
        if self.granularity == "global" and self.fc_neg:
            raise ConfigError("granularity=global has one component per item: set fc_neg=[]")
        if self.fusion == "dynamic" and not self.use_sigma_m:
            raise ConfigError("fusion=dynamic weighs sigma_r, sigma_t and sigma_m: set use_sigma_m")
        full = self.prob and self.granularity == "fine" and self.use_sigma_m
        if self.variant == "official" and not (full and self.fusion == "dynamic"):
            raise ConfigError(
                "variant=official is the released full model; the ablation flags (prob, "
                "granularity, use_sigma_m, fusion) apply to variant=paper"
            )
        return self


#: ProbVLM: what ``method.variant`` switches (docs/probvlm.md), and the uncertainties it reports.
PROBVLM_VARIANTS = ("paper", "official")
PROBVLM_UNCERTAINTIES = ("aleatoric", "epistemic", "total")


@dataclass
class ProbVLMConfig:
    """``method=probvlm`` (docs/probvlm.md): BayesCap-style generalized-Gaussian adapters on frozen
    CLIP embeddings. [P] the paper (Upadhyay et al., ICCV 2023), [C] the released code
    (ExplainableML/ProbVLM), [R] ours. A null switch takes its ``variant``'s value."""

    _target_: str = "xmodal.methods.probvlm.ProbVLM"
    variant: str = "paper"  # paper: eqs 3, 7, 8 | official: the released training code
    # -- adapters, one per modality: z + MLP(z) -> heads (mu_hat, 1/alpha, beta)
    hidden_dim: int = 256  # [P][C] input -> 256 -> 256 -> input
    dropout: float = 0.1  # [P][C] BayesCap_for_CLIP default (the CUB notebook uses 0.05)
    alpha_eps: float = 1e-4  # [C] alpha = 1 / (head + alpha_eps)
    beta_eps: float = 1e-4  # [C] beta = head + beta_eps
    head_activation: str | None = None  # last layer of the 1/alpha and beta heads: relu [C] |
    # softplus [R] (a relu unit negative for every input is dead: beta stays at beta_eps, costing
    # lgamma(1/beta_eps) ~ 8e4 nats under eq 3); null: softplus (paper), relu (official)
    input_norm: str | None = None  # unit | raw | official (unit text, unit image x exp(logit
    # scale), what the released CLIP wrapper returns); null: unit (paper), official (official)
    # -- loss: L = L_rec^V + L_rec^T + lambda_cross (L_cross^VT + L_cross^TV)   (eq 8)
    likelihood: str | None = None  # exact (eq 3) | official (residual |r| beta / alpha, clamped)
    lambda_cross: float = 1e-4  # [C] cross_modal_lambda (the paper gives no value)
    l1_weight: float | None = None  # [C] T1, an L1 identity term in every loss term; null: 0 / 1
    nll_weight: float | None = None  # [C] T2, weight of the likelihood term; null: 1 / 5e-2
    official_residual_range: list[float] = field(default_factory=lambda: [1e-4, 1e3])  # [C]
    # -- optimisation: Adam, per-caption (image, caption) pairs, data.batch_size 64 [C]
    train_fraction: float = 1.0  # [R] share of the train split's images, drawn by seed, with all
    # their captions; the shapes demo trains on 0.1 to stay fast
    lr: float = 1e-4  # [P][C]
    lr_schedule: str = "constant"  # constant: what the code runs | cosine: what it builds
    # -- uncertainty out (the uCLIP protocol, evaluator=uclip's bins, keys and plots)
    uncertainty: str = "aleatoric"  # reported under test/<d>/...: aleatoric | epistemic | total
    compare: list[str] = field(default_factory=lambda: ["epistemic", "total"])  # test/<u>/<d>/
    mc_passes: int = 15  # [C] n_fw: dropout passes for the epistemic part (0: none)
    mc_dropout: float | None = None  # null: the training dropout [P]; the code forces 0.3 [C]
    uncertainty_clamps: bool | None = None  # [C] get_GGuncer's clamps of alpha and beta; null:
    # false (paper) / true (official)
    rank_with: str = "frozen"  # frozen: the CLIP embeddings ([P] "same retrieval performance")
    # | mean: the adapters' means
    num_bins: int = 10
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    rejection_step_t2i: int = 500
    rejection_step_i2t: int = 100
    ties: str = "average"  # average | index, as evaluator=uclip
    pcmepp: bool = False  # PCME++'s protocol too (.../pcmepp/pearson), as evaluator=uclip
    plots: bool = True  # calibration.png, rejection.png, curves.json in the run dir
    cache: bool = True  # the embedding cache (keys shared with the evaluators)
    test_data: Any = None  # a data config (`/data@method.test_data: <name>` in an experiment):
    # test on its test split instead (the paper's COCO-trained Flickr column)
    monitor: str = "val/MAE"  # [C] eval_ProbVLM: mean absolute reconstruction error
    monitor_mode: str = "min"
