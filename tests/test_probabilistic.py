"""Shared Gaussian maths against closed forms, Monte Carlo and autograd."""

from __future__ import annotations

import torch

from xmodal.probabilistic import (
    expected_distance,
    matched_expected_distance,
    reparameterize,
    sigma_from_logvar,
    wasserstein2,
)


def test_wasserstein2_closed_form_and_identity():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    s1, s2 = (
        torch.rand(3, 4, generator=g, dtype=torch.float64),
        torch.rand(3, 4, generator=g, dtype=torch.float64),
    )
    expected = ((mu1 - mu2) ** 2).sum(1) + ((s1 - s2) ** 2).sum(1)
    torch.testing.assert_close(wasserstein2(mu1, s1, mu2, s2), expected)
    assert torch.all(wasserstein2(mu1, s1, mu1, s1) == 0)
    inputs = tuple(t.clone().requires_grad_() for t in (mu1, s1, mu2, s2))
    assert torch.autograd.gradcheck(lambda *x: wasserstein2(*x), inputs)


def test_expected_distance_matches_pairwise_formula_and_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mq, mc = torch.randn(3, 2, 5, generator=g), torch.randn(4, 2, 5, generator=g)
    sq, sc = torch.rand(3, 2, 5, generator=g), torch.rand(4, 2, 5, generator=g)
    d = expected_distance(mq, sq, mc, sc)
    brute = torch.tensor(
        [
            [
                ((mq[i] - mc[j]) ** 2).sum() + (sq[i] ** 2).sum() + (sc[j] ** 2).sum()
                for j in range(4)
            ]
            for i in range(3)
        ]
    )
    torch.testing.assert_close(d, brute, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        matched_expected_distance(mq, sq, mc[:3], sc[:3]),
        torch.diagonal(expected_distance(mq, sq, mc[:3], sc[:3])),
    )
    # E||z_q - z_c||^2 by sampling (1e6 draws) agrees to 1e-2 relative
    zq = reparameterize(mq[0].double(), sq[0].double(), 1_000_000, generator=g)
    zc = reparameterize(mc[0].double(), sc[0].double(), 1_000_000, generator=g)
    mc_est = ((zq - zc) ** 2).sum((1, 2)).mean()
    assert abs(mc_est / d[0, 0].double() - 1) < 1e-2


def test_reparameterize_statistics_and_zero_sigma():
    mu, logvar = torch.tensor([1.0, -2.0]), torch.log(torch.tensor([4.0, 0.25]))
    z = reparameterize(
        mu, sigma_from_logvar(logvar), 200_000, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(z.mean(0), mu, atol=2e-2, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([2.0, 0.5]), atol=2e-2, rtol=0)
    assert torch.equal(reparameterize(mu, torch.zeros(2), 3), mu.expand(3, 2))


def test_expected_distance_is_finite_for_large_distances_and_tiny_variances():
    mq = torch.full((2, 8), 1e4)
    mc = torch.zeros(3, 8)
    d = expected_distance(mq, torch.full((2, 8), 1e-20), mc, torch.zeros(3, 8))
    assert torch.isfinite(d).all() and torch.all(d > 0)
