"""The generalized Gaussian of ProbVLM (xmodal.probabilistic) against closed forms, scipy, numerical
integration and sampling; finite at its limits; exact under bf16 / fp16 autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from xmodal.probabilistic import (
    GG_EXPONENT_CAP,
    generalized_gaussian_nll,
    generalized_gaussian_sample,
    generalized_gaussian_variance,
)

D = torch.float64


def _grid(g: torch.Generator, n: int = 64) -> tuple[torch.Tensor, ...]:
    x = torch.randn(n, generator=g, dtype=D) * 2
    mu = torch.randn(n, generator=g, dtype=D)
    alpha = torch.rand(n, generator=g, dtype=D) * 2 + 0.05
    return x, mu, alpha


def test_beta_two_is_a_gaussian_with_variance_alpha_squared_over_two():
    x, mu, alpha = _grid(torch.Generator().manual_seed(0))
    sigma = alpha / math.sqrt(2)
    expected = -torch.distributions.Normal(mu, sigma).log_prob(x)
    torch.testing.assert_close(
        generalized_gaussian_nll(x, mu, alpha, torch.tensor(2.0, dtype=D)), expected
    )
    # by hand: (r / alpha)^2 + log alpha + log sqrt(pi)
    by_hand = ((x - mu) / alpha) ** 2 + alpha.log() + 0.5 * math.log(math.pi)
    torch.testing.assert_close(
        generalized_gaussian_nll(x, mu, alpha, 2.0 * torch.ones_like(x)), by_hand
    )
    torch.testing.assert_close(
        generalized_gaussian_variance(alpha, torch.full_like(alpha, 2.0)), sigma**2
    )


def test_beta_one_is_a_laplacian_of_scale_alpha():
    x, mu, alpha = _grid(torch.Generator().manual_seed(1))
    one = torch.ones_like(x)
    expected = -torch.distributions.Laplace(mu, alpha).log_prob(x)
    torch.testing.assert_close(generalized_gaussian_nll(x, mu, alpha, one), expected)
    torch.testing.assert_close(
        generalized_gaussian_nll(x, mu, alpha, one), (x - mu).abs() / alpha + torch.log(2 * alpha)
    )
    torch.testing.assert_close(generalized_gaussian_variance(alpha, one), 2 * alpha**2)


@pytest.mark.parametrize("beta", [0.4, 0.8, 1.5, 3.0, 7.0])
def test_any_beta_matches_scipy_gennorm_and_integrates_to_one(beta):
    x, mu, alpha = _grid(torch.Generator().manual_seed(2))
    b = torch.full_like(x, beta)
    ours = generalized_gaussian_nll(x, mu, alpha, b).numpy()
    reference = -stats.gennorm.logpdf(x.numpy(), beta, loc=mu.numpy(), scale=alpha.numpy())
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        generalized_gaussian_variance(alpha, b).numpy(),
        stats.gennorm.var(beta, scale=alpha.numpy()),
        rtol=1e-10,
    )
    # the density exp(-nll) integrates to 1 (mu = 0.3, alpha = 0.7): twice the integral over
    # r = |x - mu| in [0, alpha 60^(1/beta)] (the tail beyond holds Q(1/beta, 60) < 1e-20), on a
    # geometric grid that resolves the cusp at r = 0 for beta < 1
    top = math.log10(0.7 * 60 ** (1 / beta))
    r = torch.cat([torch.zeros(1, dtype=D), torch.logspace(-12, top, 400_001, dtype=D)])
    one = torch.ones((), dtype=D)
    density = torch.exp(-generalized_gaussian_nll(0.3 + r, 0.3 * one, 0.7 * one, beta * one))
    assert abs(2 * torch.trapezoid(density, r).item() - 1) < 1e-6


def test_large_beta_tends_to_the_uniform_variance():
    alpha = torch.tensor([0.5, 3.0], dtype=D)
    var = generalized_gaussian_variance(alpha, torch.full_like(alpha, 1e6))
    torch.testing.assert_close(var, alpha**2 / 3, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_at_the_limits(dtype):
    """alpha -> 0 (down to exactly 0), large beta, x = mu exactly, tiny beta: never inf or NaN,
    gradients included (alpha >= 1e-10 here: past the cap the gradient in alpha is about
    exp(cap) beta / alpha, inf in float32 below alpha ~ 1e-16 beta, where the true one is larger
    still); past the exponent cap the loss keeps growing (linear continuation)."""
    x = torch.tensor([0.5, 0.5, 0.0, 0.3, 2.0, 0.5, 1e-3], dtype=dtype)
    mu = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0], dtype=dtype)
    alpha = torch.tensor([0.0, 1e-8, 0.0, 0.0, 1.0, 1.0, 1e-10], dtype=dtype, requires_grad=True)
    beta = torch.tensor([2.0, 1e4, 2.0, 1e6, 1e6, 1e-12, 50.0], dtype=dtype, requires_grad=True)
    nll = generalized_gaussian_nll(x, mu, alpha, beta)
    assert torch.isfinite(nll).all(), nll
    nll.sum().backward()
    assert torch.isfinite(alpha.grad).all() and torch.isfinite(beta.grad).all()
    # a smaller scale on a non-zero residual always costs more, even far past the cap
    a = torch.tensor([1e-2, 1e-6, 1e-20, 1e-35], dtype=torch.float32)
    costs = generalized_gaussian_nll(torch.tensor(1.0), torch.tensor(0.0), a, torch.tensor(8.0))
    assert torch.isfinite(costs).all() and (costs.diff() > 0).all()
    assert 8 * math.log(1 / 1e-6) > GG_EXPONENT_CAP  # the last three are past the cap
    # x = mu exactly: the residual term is 0 and its gradient too (not NaN)
    xm = torch.tensor([1.0], dtype=dtype, requires_grad=True)
    out = generalized_gaussian_nll(
        xm,
        torch.tensor([1.0], dtype=dtype),
        torch.tensor([0.5], dtype=dtype),
        torch.tensor([0.5], dtype=dtype),
    )
    out.backward()
    assert xm.grad.item() == 0.0
    # alpha = 0 and x = mu: log alpha floored, finite
    assert torch.isfinite(
        generalized_gaussian_nll(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.ones(1))
    ).all()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_variance_and_entropy_against_sampling(beta):
    """Sample variance of 400k draws vs alpha^2 Gamma(3/b) / Gamma(1/b) (within 5 standard
    errors of the sample variance), and the mean NLL of the draws vs the closed-form entropy
    1/b + log(2 alpha Gamma(1/b) / b)."""
    torch.manual_seed(3)
    n, mu, alpha = 400_000, torch.tensor([0.2, -1.0], dtype=D), torch.tensor([0.3, 2.0], dtype=D)
    b = torch.full_like(alpha, beta)
    draws = generalized_gaussian_sample(mu, alpha, b, n)
    assert draws.shape == (n, 2) and draws.dtype == D
    var = generalized_gaussian_variance(alpha, b)
    kurtosis = math.gamma(5 / beta) * math.gamma(1 / beta) / math.gamma(3 / beta) ** 2
    tol = 5 * math.sqrt((kurtosis - 1) / n)
    assert ((draws.var(0) / var - 1).abs() < tol).all(), (draws.var(0), var, tol)
    assert ((draws.mean(0) - mu).abs() < 5 * (var / n).sqrt()).all()
    entropy = 1 / beta + torch.log(2 * alpha * math.gamma(1 / beta) / beta)
    nll = generalized_gaussian_nll(draws, mu, alpha, b)
    assert ((nll.mean(0) - entropy).abs() < 5 * nll.std(0) / math.sqrt(n)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_under_autocast_at_clip_widths(dtype):
    """ViT-L width (768), a batch of 64: inputs already 16-bit (what an adapter's Linear hands over
    under autocast) give float32 results equal to the float64 maths on the same values."""
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(64, 768, generator=g), dim=-1) * 10
    mu = (z + 0.01 * torch.randn(64, 768, generator=g)).to(dtype)
    alpha = (torch.rand(64, 768, generator=g) * 0.05 + 1e-3).to(dtype)
    beta = (torch.rand(64, 768, generator=g) * 3 + 0.5).to(dtype)
    z16 = z.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        nll = generalized_gaussian_nll(z16, mu, alpha, beta)
        var = generalized_gaussian_variance(alpha, beta)
    assert nll.dtype == torch.float32 and var.dtype == torch.float32
    ref = generalized_gaussian_nll(*(t.double() for t in (z16, mu, alpha, beta)))
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        var.double(),
        generalized_gaussian_variance(alpha.double(), beta.double()),
        rtol=1e-5,
        atol=0,
    )
    # the same maths done in the 16-bit dtype is far off: the check above has teeth
    naive = (
        ((z16 - mu).abs() / alpha).pow(beta)
        - beta.log()
        + alpha.log()
        + math.log(2)
        + torch.lgamma(beta.reciprocal())
    )
    assert (naive.double() - ref).abs().max() > 1e-2
