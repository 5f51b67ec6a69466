"""Real photographs that installed packages ship (scikit-image's and scikit-learn's samples),
the backgrounds of the built-in datasets: no download, the same pixels on every machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Held apart by source: a built-in dataset's val scenes are drawn on photos its train scenes never use.
TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "brick", "grass", "immunohistochemistry", "stereo_motorcycle",
                "sklearn:china.jpg")
VAL_PHOTOS = ("rocket", "gravel", "hubble_deep_field", "sklearn:flower.jpg")


def tuning_photos(seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The train photos cut for the tuning split (`data.tuning`): (its train photos, its val
    photos), two of the eight held out by a draw from `seed`. Its val scenes are then on photos
    its train scenes never use, as val's are, and of the same kinds as the train photos."""
    held_out = set(np.random.default_rng([seed, 7]).choice(len(TRAIN_PHOTOS), size=2, replace=False).tolist())
    return (tuple(p for i, p in enumerate(TRAIN_PHOTOS) if i not in held_out),
            tuple(p for i, p in enumerate(TRAIN_PHOTOS) if i in held_out))


def sklearn_photo(name: str) -> np.ndarray:
    """One of scikit-learn's sample photos, decoded as its `load_sample_images` decodes them,
    read from the package's folder without importing scikit-learn (a second or more of every
    `prepare`)."""
    import importlib.util

    package = importlib.util.find_spec("sklearn")
    if package is None or package.origin is None:
        raise ImportError("scikit-learn is not installed: its sample photos are backgrounds of the built-in datasets")
    with Image.open(Path(package.origin).parent / "datasets" / "images" / name) as image:
        return np.asarray(image)


def load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """The named photos as uint8 RGB arrays (grey ones repeated over the three channels)."""
    from skimage import data as skdata

    photos = []
    for name in names:
        photo = sklearn_photo(name.split(":", 1)[1]) if name.startswith("sklearn:") else getattr(skdata, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo  # stereo pairs: the left view
        photos.append(np.ascontiguousarray(np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]))
    return photos


def photo_crop(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop of a random photo, resized to `size` and brightened or dimmed: float32 RGB."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    crop = int(rng.integers(size, max(size, min(h, w) // 2) + 1))
    top, left = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
    patch = Image.fromarray(photo[top:top + crop, left:left + crop]).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(patch, dtype=np.float32) * rng.uniform(0.6, 1.4), 0, 255)


def legible_colour(rng: np.random.Generator, region: np.ndarray, min_contrast: float = 140.0) -> np.ndarray:
    """A random colour, redrawn (a few times at most) until it stands out from the mean of the
    photo under it by `min_contrast` (RGB distance): a drawing nobody could see would only be
    label noise."""
    mean = region.reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - mean) >= min_contrast:
            break
    return colour
