"""Batched augmentations on tensors.

Geometric ops move images and label maps together through one affine sampling grid (bilinear
for images, nearest for labels, `IGNORE_INDEX` where the view leaves the image). Intensity ops
take images only, so they cannot touch a label by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.data import IGNORE_INDEX


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W -> float in [0, 1]."""
    return images.float().div_(255.0)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range the networks (and the denoising formula) assume."""
    return images * 2.0 - 1.0


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_view(images: torch.Tensor, labels: torch.Tensor | None, side_range: tuple[float, float],
                generator: torch.Generator, hflip: bool = True,
                aspect_range: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random zoom / crop / flip, identical for each image and its label map.

    `side_range` is the side of the viewed window relative to the image: below 1 crops and
    enlarges (inception-style crop), above 1 shrinks and pads. Output keeps the input size.
    """
    n = images.shape[0]
    side = _uniform(n, *side_range, generator)
    log_aspect = _uniform(n, math.log(aspect_range[0]), math.log(aspect_range[1]), generator)
    aspect = torch.exp(log_aspect).sqrt()
    sx, sy = side * aspect, side / aspect
    if side_range[1] <= 1.0:  # a crop: keep the window inside the image whatever the aspect
        shrink = torch.maximum(sx, sy).clamp(min=1.0)
        sx, sy = sx / shrink, sy / shrink
    tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sx).abs()
    ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sy).abs()
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if labels is None:
        return out, None
    # Shift labels by one so the zero padding marks "outside the image", then map it to ignore.
    shifted = F.grid_sample((labels.float() + 1).unsqueeze(1), grid, mode="nearest", align_corners=False)
    shifted = shifted.squeeze(1).long()
    return out, torch.where(shifted == 0, IGNORE_INDEX, shifted - 1).to(labels.dtype)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation per image (images in [0, 1])."""
    n = images.shape[0]
    shape = (n, 1, 1, 1)
    brightness = _uniform(n, 1 - strength, 1 + strength, generator).view(shape)
    contrast = _uniform(n, 1 - strength, 1 + strength, generator).view(shape)
    saturation = _uniform(n, 1 - strength, 1 + strength, generator).view(shape)
    x = images * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    return ((x - gray) * saturation + gray).clamp_(0, 1)


def gaussian_blur(images: torch.Tensor, probability: float, generator: torch.Generator,
                  sigma_range: tuple[float, float] = (0.3, 1.5)) -> torch.Tensor:
    """Blur a random subset of the images with a 5×5 Gaussian of random width."""
    n, c = images.shape[:2]
    chosen = torch.rand(n, generator=generator) < probability
    if not chosen.any():
        return images
    sigma = _uniform(int(chosen.sum()), *sigma_range, generator)
    offsets = torch.arange(5, dtype=torch.float32) - 2
    kernel_1d = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum(1, keepdim=True)
    kernels = (kernel_1d[:, :, None] * kernel_1d[:, None, :]).repeat_interleave(c, 0).unsqueeze(1)
    selected = images[chosen].reshape(1, -1, *images.shape[2:])
    blurred = F.conv2d(F.pad(selected, (2, 2, 2, 2), mode="reflect"), kernels, groups=kernels.shape[0])
    out = images.clone()
    out[chosen] = blurred.reshape(-1, c, *images.shape[2:])
    return out


def cutout(images: torch.Tensor, labels: torch.Tensor, max_fraction: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey out one random rectangle (up to `max_fraction` of the area) in half of the images;
    its pixels become ignore in the labels, since nothing in them can be recognised."""
    n, _, h, w = images.shape
    images, labels = images.clone(), labels.clone()
    for i in range(n):
        if max_fraction <= 0 or torch.rand(1, generator=generator).item() >= 0.5:
            continue
        area = torch.rand(1, generator=generator).item() * max_fraction
        ch, cw = max(1, int(h * math.sqrt(area))), max(1, int(w * math.sqrt(area)))
        top = int(torch.randint(h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(w - cw + 1, (1,), generator=generator))
        images[i, :, top:top + ch, left:left + cw] = 0.5
        labels[i, top:top + ch, left:left + cw] = IGNORE_INDEX
    return images, labels
