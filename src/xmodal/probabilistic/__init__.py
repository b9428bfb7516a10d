"""Probabilistic-embedding maths shared by RUIR, HUG and ProbVLM: one place, tested once.

Gaussian embeddings are diagonal Gaussians N(mu, diag(sigma^2)); ``sigma`` is always a standard
deviation. Every Gaussian function sums over all trailing (embedding) dimensions, so a HUG
embedding [B, K, D] and a RUIR embedding [B, D] use the same code. ProbVLM's generalized Gaussian
(scale ``alpha``, shape ``beta``) is element-wise: :func:`generalized_gaussian_nll`,
:func:`generalized_gaussian_variance`, :func:`generalized_gaussian_sample`.

Every function here is :func:`exact`: it runs with autocast disabled, on inputs of at least float32
(float64 stays float64), so a ``16-mixed`` / ``bf16-mixed`` trainer changes the precision of the
networks, never of a distance or a loss. Under bf16 autocast the one matrix product of a pairwise
distance on [B, 32 x 768] HUG embeddings (||mu||^2 ~ 1e4, distances ~ 200) was off by up to 27 %.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)


def _full(x: object) -> object:
    """A float16 / bfloat16 tensor as float32; anything else unchanged."""
    if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def exact(fn: F) -> F:
    """Run ``fn`` with autocast off and its float16 / bfloat16 tensor arguments cast to float32.

    For losses and distances: autocast would run their matrix products in 16 bits, whose rounding
    (a relative 4e-3 for bfloat16) is amplified by the cancellations of ||a||^2 + ||b||^2 - 2 a.b or
    of a log-softmax over logits / tau. Inputs that autocast already made 16-bit are used as given
    (their values are exact), only the arithmetic is done in float32 (float64 inputs stay float64).
    """

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        device = next(
            (a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu"
        )
        with torch.autocast(device, enabled=False):
            return fn(*map(_full, args), **{k: _full(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


@exact
def sigma_from_logvar(logvar: Tensor) -> Tensor:
    """Standard deviation from a log-variance: exp(logvar / 2)."""
    return torch.exp(0.5 * logvar)


@exact
def reparameterize(
    mu: Tensor, sigma: Tensor, num_samples: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Samples z = mu + sigma * eps, eps ~ N(0, I); returns [num_samples, *mu.shape]."""
    dtype = torch.promote_types(mu.dtype, sigma.dtype)
    eps = torch.randn((num_samples, *mu.shape), dtype=dtype, device=mu.device, generator=generator)
    return mu.unsqueeze(0) + sigma.unsqueeze(0) * eps


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


@exact
def wasserstein2(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance between matched diagonal Gaussians, per pair.

    W2^2(N(mu1, sigma1^2), N(mu2, sigma2^2)) = ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2 (closed form
    for commuting, here diagonal, covariances). Inputs [B, ...]; returns [B].
    """
    return _flat(mu1 - mu2).pow(2).sum(-1) + _flat(sigma1 - sigma2).pow(2).sum(-1)


@exact
def pairwise_sq_distance(x: Tensor, y: Tensor) -> Tensor:
    """||x_p - y_r||^2 for x [P, D], y [R, D] -> [P, R].

    As ||x||^2 + ||y||^2 - 2 x.y: one matrix product, no [P, R, D] tensor, no square root (the
    gradient is smooth at 0); clamped at 0 against rounding. In float32 (autocast off) the
    cancellation costs ~1e-6 ||x||^2 absolute: ~1e-2 on HUG's ||mu||^2 ~ 1e4 against distances of
    ~200, a relative 6e-5 (under bf16 autocast it cost up to 27 %). This assumes float32 matrix
    products are float32, torch's default: ``torch.set_float32_matmul_precision("high")`` would
    let CUDA run them in TF32 and bring the cancellation back.
    """
    return (x.pow(2).sum(-1)[:, None] + y.pow(2).sum(-1)[None, :] - 2 * x @ y.T).clamp_min(0)


@exact
def expected_distance(mu_q: Tensor, sigma_q: Tensor, mu_c: Tensor, sigma_c: Tensor) -> Tensor:
    """Pairwise expected squared distance E||z_q - z_c||^2 of independent Gaussians (HUG eqs 14-15).

    d(z_q, z_c) = ||mu_q - mu_c||^2 + ||sigma_q||^2 + ||sigma_c||^2, summed over every trailing
    dimension. Inputs [Bq, ...] and [Bc, ...]; returns [Bq, Bc] (mean term by
    :func:`pairwise_sq_distance`).
    """
    sq = _flat(sigma_q).pow(2).sum(-1)
    sc = _flat(sigma_c).pow(2).sum(-1)
    return pairwise_sq_distance(_flat(mu_q), _flat(mu_c)) + sq[:, None] + sc[None, :]


@exact
def matched_expected_distance(
    mu_q: Tensor, sigma_q: Tensor, mu_c: Tensor, sigma_c: Tensor
) -> Tensor:
    """The diagonal of ``expected_distance`` (pair i with pair i), without the matrix: [B]."""
    return (
        _flat(mu_q - mu_c).pow(2).sum(-1)
        + _flat(sigma_q).pow(2).sum(-1)
        + _flat(sigma_c).pow(2).sum(-1)
    )


@exact
def kl_to_prior(mu: Tensor, sigma: Tensor, prior_std: float = 1.0) -> Tensor:
    """KL(N(mu, diag sigma^2) || N(0, s^2 I)) per item, s = ``prior_std``: [B].

    = 1/2 sum_i (sigma_i^2 / s^2 + mu_i^2 / s^2 - 1 - log(sigma_i^2 / s^2)), summed over every
    trailing dimension (the variational-information-bottleneck term of PCME / DUL with s = 1).
    Its minimum over sigma is sigma = s, and it grows with ||mu||^2: it keeps the variances from
    collapsing and the means from growing without bound.
    """
    if prior_std <= 0:
        raise ValueError(f"the prior's standard deviation must be > 0, got {prior_std}")
    ratio = _flat(sigma).pow(2) / prior_std**2
    tiny = torch.finfo(ratio.dtype).tiny  # sigma = 0 gives a large finite KL, not inf / nan
    log_ratio = torch.log(ratio.clamp_min(tiny))
    return 0.5 * (ratio + _flat(mu).pow(2) / prior_std**2 - 1 - log_ratio).sum(-1)


# ----------------------------------------------------------------------------------------------
# The generalized Gaussian (ProbVLM): beta / (2 alpha Gamma(1/beta)) exp(-(|x - mu| / alpha)^beta)
# ----------------------------------------------------------------------------------------------

#: Cap on the exponent z = beta * log(|x - mu| / alpha) of the residual term exp(z); past it the
#: term continues linearly, exp(CAP) * (1 + z - CAP), so it stays finite with a live gradient.
#: exp(50) ~ 5e21 nats: a mean over ~1e16 such elements still fits float32.
GG_EXPONENT_CAP = 50.0


@exact
def generalized_gaussian_nll(x: Tensor, mu: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Element-wise negative log-density of the generalized Gaussian (scale ``alpha``, shape
    ``beta``) at ``x``:

        -log p(x) = (|x - mu| / alpha)^beta - log beta + log alpha + log 2 + lgamma(1 / beta)

    ProbVLM's eq 3 is this without the constant log 2. beta = 2 is a Gaussian with variance
    alpha^2 / 2, beta = 1 a Laplacian of scale alpha. Broadcasts its arguments.

    Finite everywhere, computed in log space: alpha and beta are floored at the dtype's smallest
    normal number and its machine epsilon (alpha -> 0 then costs -log(tiny) ~ 87 nats in float32,
    not inf; lgamma(1 / beta) stays finite); the residual term is exp(beta * (log|x - mu| -
    log alpha)), exactly 0 where x = mu (with a zero, not NaN, gradient there), and past the
    exponent :data:`GG_EXPONENT_CAP` it continues linearly, so alpha -> 0 or a large beta give a
    large finite loss whose gradient still points back (about exp(cap) beta / alpha in alpha:
    finite in float32 down to alpha ~ 1e-16 beta; alpha below the floor gets none). Runs in
    float32 (or float64) whatever autocast says (:func:`exact`).
    """
    info = torch.finfo(torch.promote_types(torch.promote_types(x.dtype, mu.dtype), alpha.dtype))
    alpha = alpha.clamp_min(info.tiny)
    beta = beta.clamp_min(info.eps)
    residual = (x - mu).abs()
    nonzero = residual > 0
    log_ratio = torch.log(torch.where(nonzero, residual, torch.ones_like(residual))) - alpha.log()
    z = beta * log_ratio
    capped = torch.exp(z.clamp_max(GG_EXPONENT_CAP))
    power = torch.where(
        z > GG_EXPONENT_CAP, capped * (1 + z - GG_EXPONENT_CAP), capped
    )  # (|x - mu| / alpha)^beta
    power = torch.where(nonzero, power, torch.zeros_like(power))
    return power - beta.log() + alpha.log() + math.log(2.0) + torch.lgamma(beta.reciprocal())


@exact
def generalized_gaussian_variance(alpha: Tensor, beta: Tensor) -> Tensor:
    """Element-wise variance of the generalized Gaussian: alpha^2 Gamma(3/beta) / Gamma(1/beta)
    (ProbVLM's aleatoric uncertainty). The Gamma ratio is taken in log space (lgamma), so it
    overflows only where the variance itself exceeds the dtype (inf for beta below ~0.07 at
    alpha = 1 in float32): beta -> inf gives alpha^2 / 3 (uniform on [mu - alpha, mu + alpha])."""
    return alpha.square() * torch.exp(torch.lgamma(3.0 / beta) - torch.lgamma(1.0 / beta))


@exact
def generalized_gaussian_sample(
    mu: Tensor, alpha: Tensor, beta: Tensor, num_samples: int = 1
) -> Tensor:
    """Draws x = mu + alpha * s * g^(1/beta) with g ~ Gamma(1/beta, 1) and a fair sign s (so that
    (|x - mu| / alpha)^beta is Gamma(1/beta, 1)-distributed): [num_samples, *broadcast shape].
    Uses the global RNG (``torch.manual_seed`` makes it reproducible)."""
    mu, alpha, beta = torch.broadcast_tensors(mu, alpha, beta)
    shape = (num_samples, *mu.shape)
    gamma = torch.distributions.Gamma(beta.reciprocal(), torch.ones_like(beta)).sample(
        (num_samples,)
    )
    sign = torch.randint(0, 2, shape, device=mu.device).to(mu.dtype) * 2 - 1
    return mu + alpha * sign * gamma.pow(beta.reciprocal())


__all__ = [
    "GG_EXPONENT_CAP",
    "exact",
    "expected_distance",
    "generalized_gaussian_nll",
    "generalized_gaussian_sample",
    "generalized_gaussian_variance",
    "kl_to_prior",
    "matched_expected_distance",
    "pairwise_sq_distance",
    "reparameterize",
    "sigma_from_logvar",
    "wasserstein2",
]
