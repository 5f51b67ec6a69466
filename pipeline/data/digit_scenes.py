"""The built-in digit scenes (`dataset=digits`, the recognition-bound control): real
handwritten digits alpha-blended onto crops of real photographs.

Everything comes from data that installed packages ship (scikit-learn's 8x8 digits, the
sample photos of scikit-image and scikit-learn), so the pipeline runs with no download.
Every scene is drawn from its own seeded generator, so a scene depends only on
(seed, split, index) and the dataset is identical on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config.params import DigitScenesConfig
from pipeline.data.photos import legible_colour, load_photos, photo_crop

CLASSES = ["background"] + [str(d) for d in range(10)]
_SPLIT_CODES = {"train": 1, "val": 2}
_STROKE_ALPHA = 0.5  # a pixel belongs to a digit where the digit covers at least half of it
_MIN_CONTRAST = 140.0  # RGB distance between a digit's colour and the photo under it


@dataclass
class DigitPool:
    """Handwritten digits (alpha in [0, 1], 8x8) and their classes 0-9."""

    alphas: np.ndarray
    classes: np.ndarray


def load_digit_pools(seed: int, val_fraction: float) -> tuple[DigitPool, DigitPool]:
    """Split scikit-learn's 1,797 digits into disjoint train and val pools, so val measures
    generalisation to handwriting the model has never seen."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_val = int(round(len(order) * val_fraction))
    alphas = (digits.images / 16.0).astype(np.float32)

    def pool(idx: np.ndarray) -> DigitPool:
        return DigitPool(alphas[idx], digits.target[idx].astype(np.int64))

    return pool(order[n_val:]), pool(order[:n_val])


# Every photo for both splits (val's digits are held out instead: the handwriting, not the photos).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "sklearn:china.jpg",
          "sklearn:flower.jpg")


def _digit_alpha(alpha8: np.ndarray, px: int) -> np.ndarray:
    return np.clip(np.asarray(Image.fromarray(alpha8, mode="F").resize((px, px), Image.BILINEAR)), 0, 1)


def _paste(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray | None, alpha: np.ndarray,
           top: int, left: int, label: int) -> None:
    px = alpha.shape[0]
    region = canvas[top:top + px, left:left + px]
    colour = legible_colour(rng, region, _MIN_CONTRAST)
    region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
    if mask is not None:
        mask[top:top + px, left:left + px][alpha >= _STROKE_ALPHA] = label


def make_scene(rng: np.random.Generator, pool: DigitPool, photos: list[np.ndarray], size: int,
               cfg: DigitScenesConfig) -> tuple[np.ndarray, np.ndarray]:
    """One scene: a photo crop with 2-4 digits on it, and its mask (0 = background, d+1 = digit d)."""
    canvas = photo_crop(rng, photos, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(cfg.min_digits, cfg.max_digits + 1)):
        k = rng.integers(len(pool.classes))
        px = int(rng.integers(cfg.min_digit_px, min(cfg.max_digit_px, size) + 1))
        top, left = rng.integers(size - px + 1), rng.integers(size - px + 1)
        _paste(rng, canvas, mask, _digit_alpha(pool.alphas[k], px), top, left, int(pool.classes[k]) + 1)
    return canvas.round().astype(np.uint8), mask


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def generate(seed: int, size: int, cfg: DigitScenesConfig, tuning: bool = False):
    """Yield (split, id, image, mask) for every train and val scene. `tuning`: the val scenes
    are more train scenes (the train digits, draws the train split does not have)."""
    train_pool, val_pool = load_digit_pools(seed, cfg.val_digit_fraction)
    photos = load_photos(PHOTOS)
    val_from, val_digits, val_first = ("train", train_pool, cfg.train_scenes) if tuning else ("val", val_pool, 0)
    for split, source, pool, first, count in (("train", "train", train_pool, 0, cfg.train_scenes),
                                              ("val", val_from, val_digits, val_first, cfg.val_scenes)):
        for i in range(count):
            image, mask = make_scene(scene_rng(seed, source, first + i), pool, photos, size, cfg)
            yield split, f"{split}-{i:05d}", image, mask
