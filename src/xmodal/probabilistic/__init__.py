"""Gaussian-embedding maths shared by RUIR and HUG: one place, tested once.

Embeddings are diagonal Gaussians N(mu, diag(sigma^2)); ``sigma`` is always a standard deviation.
Every function sums over all trailing (embedding) dimensions, so a HUG embedding [B, K, D] and a
RUIR embedding [B, D] use the same code.

Every function here is :func:`exact`: it runs with autocast disabled, on inputs of at least float32
(float64 stays float64), so a ``16-mixed`` / ``bf16-mixed`` trainer changes the precision of the
networks, never of a distance or a loss. Under bf16 autocast the one matrix product of a pairwise
distance on [B, 32 x 768] HUG embeddings (||mu||^2 ~ 1e4, distances ~ 200) was off by up to 27 %.
"""

from __future__ import annotations

import functools
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


__all__ = [
    "exact",
    "expected_distance",
    "kl_to_prior",
    "matched_expected_distance",
    "pairwise_sq_distance",
    "reparameterize",
    "sigma_from_logvar",
    "wasserstein2",
]
