"""The DDeP corruption: a variance-preserving mix of the image and Gaussian noise."""

from __future__ import annotations

import math

import torch


def noisy_input(x: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """x̃ = √γ·x + √(1−γ)·ε with γ = 1/(1+σ²), i.e. (x + σε)/√(1+σ²).

    Args:
        x: clean images scaled to [-1, 1].
        sigma: the noise level σ.
        noise: ε ~ N(0, I), the same shape as `x`.
    """
    gamma = 1.0 / (1.0 + sigma**2)
    return math.sqrt(gamma) * x + math.sqrt(1.0 - gamma) * noise
