"""Bring-your-own data: the `folder` format.

    root/images/<stem>.{png,jpg,...}    RGB images
    root/masks/<stem>.png               class indices, 255 = ignore (same stem as the image)
    root/unlabeled/<any>.{png,jpg,...}  optional, images only
    root/val/images, root/val/masks     optional; otherwise a seeded split of images/
    root/classes.txt                    one class name per line

Images are resized so the shorter side is `image_size` and centre-cropped to a square (masks
with nearest neighbour).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data import IGNORE_INDEX, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def read_classes(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing; expected one class name per line")
    classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not 2 <= len(classes) < IGNORE_INDEX:
        raise DataError(f"{path}: expected 2 to {IGNORE_INDEX - 1} class names (masks are 8-bit, "
                        f"{IGNORE_INDEX} = ignore), found {len(classes)}")
    return classes


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def square_resize(image: Image.Image, size: int, resample: int) -> np.ndarray:
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def load_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return square_resize(im.convert("RGB"), size, Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


def load_mask(path: Path, size: int, num_classes: int, image_path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{path}: mask mode {im.mode}; expected a single-channel PNG of class indices")
            with Image.open(image_path) as ref:
                if ref.size != im.size:
                    raise DataError(f"{path}: mask size {im.size} differs from image {image_path.name} {ref.size}")
            mask = square_resize(im, size, Image.NEAREST)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable mask ({err})") from None
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DataError(f"{path}: class value {int(mask[bad].max())} >= {num_classes} classes "
                        f"(and not the ignore value {IGNORE_INDEX})")
    return mask.astype(np.uint8)


def labeled_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[str, Path, Path]]:
    images = list_images(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no images found (expected {sorted(IMAGE_SUFFIXES)})")
    pairs = []
    for image in images:
        mask = masks_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"{mask}: missing mask for {image}")
        pairs.append((image.stem, image, mask))
    return pairs


def iter_folder(root: Path, size: int, num_classes: int, val_fraction: float,
                seed: int) -> Iterator[tuple[str, str, np.ndarray, np.ndarray | None]]:
    """Yield (split, id, image, mask) with split in train / val / unlabeled."""
    if not root.is_dir():
        raise DataError(f"{root}: data.root is not a folder")
    train = labeled_pairs(root / "images", root / "masks")
    if (root / "val" / "images").is_dir():
        val = labeled_pairs(root / "val" / "images", root / "val" / "masks")
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, int(round(len(train) * val_fraction)))
        if n_val >= len(train):
            raise DataError(f"{root / 'images'}: {len(train)} images are too few to split off a val set")
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    for split, pairs in (("train", train), ("val", val)):
        for stem, image, mask in pairs:
            yield split, stem, load_image(image, size), load_mask(mask, size, num_classes, image)
    for path in list_images(root / "unlabeled"):
        yield "unlabeled", f"unlabeled-{path.stem}", load_image(path, size), None
