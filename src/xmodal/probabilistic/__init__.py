"""Gaussian-embedding maths shared by RUIR and HUG: one place, tested once.

Embeddings are diagonal Gaussians N(mu, diag(sigma^2)); ``sigma`` is always a standard deviation.
Every function sums over all trailing (embedding) dimensions, so a HUG embedding [B, K, D] and a
RUIR embedding [B, D] use the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sigma_from_logvar(logvar: Tensor) -> Tensor:
    """Standard deviation from a log-variance: exp(logvar / 2)."""
    return torch.exp(0.5 * logvar)


def reparameterize(
    mu: Tensor, sigma: Tensor, num_samples: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Samples z = mu + sigma * eps, eps ~ N(0, I); returns [num_samples, *mu.shape]."""
    eps = torch.randn(
        (num_samples, *mu.shape), dtype=mu.dtype, device=mu.device, generator=generator
    )
    return mu.unsqueeze(0) + sigma.unsqueeze(0) * eps


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def wasserstein2(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance between matched diagonal Gaussians, per pair.

    W2^2(N(mu1, sigma1^2), N(mu2, sigma2^2)) = ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2 (closed form
    for commuting, here diagonal, covariances). Inputs [B, ...]; returns [B].
    """
    return _flat(mu1 - mu2).pow(2).sum(-1) + _flat(sigma1 - sigma2).pow(2).sum(-1)


def pairwise_sq_distance(x: Tensor, y: Tensor) -> Tensor:
    """||x_p - y_r||^2 for x [P, D], y [R, D] -> [P, R], as ||x||^2 + ||y||^2 - 2 x.y (one matrix
    product, no [P, R, D] tensor; no square root, so the gradient is smooth at 0), clamped at 0
    against rounding."""
    return (x.pow(2).sum(-1)[:, None] + y.pow(2).sum(-1)[None, :] - 2 * x @ y.T).clamp_min(0)


def expected_distance(mu_q: Tensor, sigma_q: Tensor, mu_c: Tensor, sigma_c: Tensor) -> Tensor:
    """Pairwise expected squared distance E||z_q - z_c||^2 of independent Gaussians (HUG eqs 14-15).

    d(z_q, z_c) = ||mu_q - mu_c||^2 + ||sigma_q||^2 + ||sigma_c||^2, summed over every trailing
    dimension. Inputs [Bq, ...] and [Bc, ...]; returns [Bq, Bc] (mean term by
    :func:`pairwise_sq_distance`).
    """
    sq = _flat(sigma_q).pow(2).sum(-1)
    sc = _flat(sigma_c).pow(2).sum(-1)
    return pairwise_sq_distance(_flat(mu_q), _flat(mu_c)) + sq[:, None] + sc[None, :]


def matched_expected_distance(
    mu_q: Tensor, sigma_q: Tensor, mu_c: Tensor, sigma_c: Tensor
) -> Tensor:
    """The diagonal of ``expected_distance`` (pair i with pair i), without the matrix: [B]."""
    return (
        _flat(mu_q - mu_c).pow(2).sum(-1)
        + _flat(sigma_q).pow(2).sum(-1)
        + _flat(sigma_c).pow(2).sum(-1)
    )


__all__ = [
    "expected_distance",
    "matched_expected_distance",
    "pairwise_sq_distance",
    "reparameterize",
    "sigma_from_logvar",
    "wasserstein2",
]
