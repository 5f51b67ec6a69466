import math

import torch

from pipeline.config.params import DecoderPretrainConfig
from pipeline.models.denoising import corrupt, noisy_input, sample_sigma


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
    x = torch.full((1, 200_000), 0.5)
    noisy = noisy_input(x, sigma, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    assert abs(noisy.mean().item() - math.sqrt(gamma) * 0.5) < 2e-3
    assert abs(noisy.var().item() - (1 - gamma)) < 1e-3


def test_additive_form_keeps_the_mean_and_adds_sigma_squared():
    x = torch.full((1, 200_000), 0.5)
    noisy = noisy_input(x, 0.4, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)),
                        variance_preserving=False)
    assert abs(noisy.mean().item() - 0.5) < 3e-3
    assert abs(noisy.var().item() - 0.16) < 2e-3


def test_sigma_per_example_applies_to_its_own_image():
    x, eps = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    noisy = noisy_input(x, torch.tensor([0.1, 0.8]), eps, variance_preserving=False)
    assert torch.all(noisy[0] == 0.1) and torch.allclose(noisy[1], torch.full_like(noisy[1], 0.8))


def test_sigma_range_is_sampled_inside_it_and_a_fixed_sigma_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    drawn = sample_sigma(1000, (0.2, 0.3), generator)
    assert drawn.min() >= 0.2 and drawn.max() <= 0.3 and drawn.std() > 0.02
    before = generator.get_state()
    assert torch.all(sample_sigma(4, (0.2, 0.2), generator) == 0.2)
    assert torch.equal(generator.get_state(), before)  # the default keeps the pipeline's random stream


def test_corrupt_returns_the_noise_or_the_image_as_target():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    noisy, sigma, target = corrupt(x, DecoderPretrainConfig(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, noisy_input(x, 0.2, target))  # target is ε itself
    torch.testing.assert_close(sigma, torch.full((3,), 0.2))
    _, _, target = corrupt(x, DecoderPretrainConfig(target="image"), torch.Generator().manual_seed(0))
    assert torch.equal(target, x)
