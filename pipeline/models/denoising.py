"""The denoising corruption of DeP/DDeP and what the network is asked to recover from it."""

from __future__ import annotations

import torch

from pipeline.config.params import DecoderPretrainConfig

DENOISE_CHANNELS = 3  # a denoiser's head predicts the noise of each image channel


def noisy_input(x: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor,
                variance_preserving: bool = True) -> torch.Tensor:
    """x̃ = √γ·x + √(1−γ)·ε with γ = 1/(1+σ²), i.e. (x + σε)/√(1+σ²); or x + σε when not
    variance-preserving.

    Args:
        x: clean images scaled to [-1, 1], N×C×H×W.
        sigma: the noise level σ, a number or one value per example (shape N).
        noise: ε ~ N(0, I), the same shape as `x`.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    noisy = x + sigma * noise
    return noisy / torch.sqrt(1.0 + sigma**2) if variance_preserving else noisy


def sample_sigma(count: int, sigma_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """σ per example, uniform in `sigma_range`. A fixed σ draws nothing, so it leaves the
    generator (and with it every later batch) exactly as a pipeline without the option."""
    low, high = sigma_range
    if low == high:
        return torch.full((count,), float(low))
    return low + (high - low) * torch.rand(count, generator=generator)


def corrupt(x: torch.Tensor, cfg: DecoderPretrainConfig, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising example per image: (noisy input, σ per example, regression target)."""
    noise = torch.randn(x.shape, generator=generator).to(x.device, non_blocking=True)
    sigma = sample_sigma(len(x), cfg.sigma_range, generator)
    target = noise if cfg.target == "noise" else x
    return noisy_input(x, sigma, noise, cfg.variance_preserving), sigma, target
