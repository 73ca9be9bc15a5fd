"""Metrics against closed forms."""

import math

import pytest
import torch

from dtk.eval.metrics import fd, frechet_distance, gaussian_stats, mean_cosine


def test_fd_of_identical_sets_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert fd(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_shifted_and_scaled_gaussians_matches_the_formula():
    # Diagonal Gaussians: FD = ‖μ1−μ2‖² + Σ (σ1ᵢ − σ2ᵢ)²
    d = 8
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) / 4
    s1, s2 = torch.full((d,), 1.0, dtype=torch.float64), torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (s1 - s2).square().sum())
    assert frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2)) == pytest.approx(expected, rel=1e-10)
    # a full (non-diagonal) covariance rotated by the same orthogonal matrix keeps the value
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    got = frechet_distance(q @ mu1, q @ torch.diag(s1**2) @ q.T, q @ mu2, q @ torch.diag(s2**2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_fd_of_samples_converges_to_the_closed_form():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # μ shift: 4·1² = 4; σ 1 → 2 on 4 dims: 4·(2−1)² = 4
    assert fd(a, b) == pytest.approx(8.0, rel=0.05)


def test_stats_and_cosine():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    mu, cov = gaussian_stats(x)
    assert torch.allclose(mu, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(cov, torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=torch.float64))
    with pytest.raises(ValueError):
        gaussian_stats(x[:1])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert mean_cosine(a, b) == pytest.approx(0.5)
    assert math.isclose(mean_cosine(a, a), 1.0)
