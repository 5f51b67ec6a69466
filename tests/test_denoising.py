import math

import torch

from pipeline.denoising import noisy_input


def test_matches_both_forms_of_the_formula():
    x, eps = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    sigma = 0.4
    gamma = 1 / (1 + sigma**2)
    expected = math.sqrt(gamma) * x + math.sqrt(1 - gamma) * eps
    torch.testing.assert_close(noisy_input(x, sigma, eps), expected)
    torch.testing.assert_close(noisy_input(x, sigma, eps), (x + sigma * eps) / math.sqrt(1 + sigma**2))


def test_noisy_input_has_the_expected_mean_and_variance():
    """For x = 0.5 everywhere: mean √γ·0.5 and variance 1−γ."""
    sigma = 0.2
    gamma = 1 / (1 + sigma**2)
    x = torch.full((200_000,), 0.5)
    noisy = noisy_input(x, sigma, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    assert abs(noisy.mean().item() - math.sqrt(gamma) * 0.5) < 2e-3
    assert abs(noisy.var().item() - (1 - gamma)) < 1e-3
