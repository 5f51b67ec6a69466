"""Batched augmentations on tensors.

Geometric ops move images and label maps together through one affine sampling grid (bilinear
for images, nearest for labels, `IGNORE_INDEX` where the view leaves the image). Intensity ops
take images only, so they cannot touch a label by construction.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipeline.data.shards import IGNORE_INDEX


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W -> float in [0, 1]."""
    return images.float().div_(255.0)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range the networks (and the denoising formula) assume."""
    return images * 2.0 - 1.0


def _outside_autocast(device: torch.device):
    """Float32 ops inside a GPU step's bf16 autocast (the only autocast the stages turn on)."""
    return torch.autocast("cuda", enabled=False) if device.type == "cuda" else nullcontext()


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_view(images: torch.Tensor, labels: torch.Tensor | None, side_range: tuple[float, float],
                generator: torch.Generator, hflip: bool = True,
                aspect_range: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random zoom / crop / flip, identical for each image and its label map (N×H×W, or
    N×C×H×W for several per-pixel maps that move together, e.g. label and confidence).

    `side_range` is the side of the viewed window relative to the image: below 1 crops and
    enlarges (inception-style crop), above 1 shrinks and pads. Output keeps the input size.
    The draws come from `generator` on the host; the sampling runs where the images are, in
    float32 even inside a GPU step's bf16 autocast, which would round the grid (its `bmm`) to
    whole pixels at 512² and more.
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
    with _outside_autocast(images.device):
        grid = F.affine_grid(theta.to(images.device, non_blocking=True), list(images.shape), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if labels is None:
            return out, None
        # Shift labels by one so the zero padding marks "outside the image", then map it to ignore.
        maps = labels if labels.ndim == 4 else labels.unsqueeze(1)
        shifted = F.grid_sample(maps.float() + 1, grid, mode="nearest", align_corners=False).long()
    shifted = shifted if labels.ndim == 4 else shifted.squeeze(1)
    return out, torch.where(shifted == 0, IGNORE_INDEX, shifted - 1).to(labels.dtype)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation per image (images in [0, 1])."""
    n = images.shape[0]
    factors = torch.stack([_uniform(n, 1 - strength, 1 + strength, generator) for _ in range(3)])
    brightness, contrast, saturation = factors.view(3, n, 1, 1, 1).to(images.device, non_blocking=True)
    x = images * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    return ((x - gray) * saturation + gray).clamp_(0, 1)


# ------------------------------------------------------------ strong (RandAugment-style) ops
# Each op takes one uint8 3×H×W image, a magnitude m in [0, 1] and the generator that draws
# anything else it needs (signs, channels, boxes), and returns a uint8 image of the same size.
# They see the image only: a label cannot be touched by construction.

def _sign(generator: torch.Generator) -> float:
    return 1.0 if torch.rand(1, generator=generator).item() < 0.5 else -1.0


def _factor(m: float, reach: float, generator: torch.Generator) -> float:
    """1 ± reach·m: how far an enhancement moves away from the identity."""
    return 1.0 + _sign(generator) * reach * m


def _per_channel_brightness(img: torch.Tensor, m: float, g: torch.Generator) -> torch.Tensor:
    scale = 1.0 + (torch.rand(3, 1, 1, generator=g) * 2 - 1) * 0.6 * m
    return (img.float() * scale).round_().clamp_(0, 255).to(torch.uint8)


def _hsv_shift(img: torch.Tensor, m: float, g: torch.Generator) -> torch.Tensor:
    return TF.adjust_saturation(TF.adjust_hue(img, _sign(g) * 0.3 * m), _factor(m, 0.8, g))


def _channel_invert(img: torch.Tensor, m: float, g: torch.Generator) -> torch.Tensor:
    chosen = torch.rand(3, generator=g) < 0.5
    chosen[torch.randint(3, (1,), generator=g)] = True
    return torch.where(chosen[:, None, None], 255 - img, img)


def _gaussian_noise(img: torch.Tensor, m: float, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(img.shape, generator=g) * (4.0 + 36.0 * m)
    return (img.float() + noise).round_().clamp_(0, 255).to(torch.uint8)


def _coarse_dropout(img: torch.Tensor, m: float, g: torch.Generator) -> torch.Tensor:
    _, h, w = img.shape
    side = 0.15 + 0.35 * m
    bh, bw = max(1, int(h * side)), max(1, int(w * side))
    top, left = int(torch.randint(h - bh + 1, (1,), generator=g)), int(torch.randint(w - bw + 1, (1,), generator=g))
    return TF.erase(img, top, left, bh, bw, torch.tensor(128, dtype=torch.uint8))


def _jpeg(img: torch.Tensor, m: float, g: torch.Generator) -> torch.Tensor:
    """JPEG compression artefacts, quality 95 down to 10 (Pillow's codec; torchvision's is deprecated)."""
    buffer = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=round(95 - 85 * m))
    return torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1).contiguous()


STRONG_OPS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "contrast": lambda img, m, g: TF.adjust_contrast(img, _factor(m, 0.9, g)),
    "brightness": lambda img, m, g: TF.adjust_brightness(img, _factor(m, 0.9, g)),
    "channel_brightness": _per_channel_brightness,
    "equalize": lambda img, m, g: TF.equalize(img),
    "hsv_shift": _hsv_shift,
    "channel_invert": _channel_invert,
    "blur": lambda img, m, g: TF.gaussian_blur(img, [5, 5], [0.1 + 1.9 * m] * 2),
    "gaussian_noise": _gaussian_noise,
    "channel_shuffle": lambda img, m, g: TF.permute_channels(img, torch.randperm(3, generator=g).tolist()),
    "coarse_dropout": _coarse_dropout,
    "solarize": lambda img, m, g: TF.solarize(img, 255.0 * (1.0 - 0.9 * m)),
    "posterize": lambda img, m, g: TF.posterize(img, 8 - round(4 * m)),
    "sharpness": lambda img, m, g: TF.adjust_sharpness(img, _factor(m, 0.9, g)),
    "jpeg": _jpeg,
}


def rand_augment(images: torch.Tensor, num_ops: int, generator: torch.Generator) -> torch.Tensor:
    """RandAugment as Simple Baseline uses it: for each uint8 image, `num_ops` different
    intensity ops (uniformly among `STRONG_OPS`), each at a magnitude drawn from U[0, 1]."""
    names = list(STRONG_OPS)
    out = images.clone()
    for i in range(len(images)):
        for op in torch.randperm(len(names), generator=generator)[:num_ops].tolist():
            out[i] = STRONG_OPS[names[op]](out[i], torch.rand(1, generator=generator).item(), generator)
    return out
