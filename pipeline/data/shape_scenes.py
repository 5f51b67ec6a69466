"""The built-in "shape scenes": drawn objects on real photographs, where telling the classes
apart is a matter of shape, extent and boundary, i.e. of dense prediction.

Six classes, each in any colour, so colour never gives one away: thin `wire`s, smooth solid
`blob`s, hollow `ring`s (a blob's outline: its inside is the photo), sharp-cornered `star`s, and
two textures filling blob-shaped regions (`stripes`, `dots`). Two to five objects per scene may
overlap and touch; a later one covers an earlier one in the image and in the mask. Shapes are
drawn at four times the size and averaged down, and a pixel belongs to an object where the
object covers at least half of it, so thin wires stay one to three pixels wide.

Val scenes are drawn on photos that train scenes never use (`photos.VAL_PHOTOS`). The tuning
split holds two train photos out the same way (`photos.tuning_photos`). Every scene
comes from its own seeded generator, so a scene depends only on (seed, split, index) and the
dataset is identical on every machine; nothing is downloaded.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config.params import ShapeScenesConfig
from pipeline.data.photos import (
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    legible_colour,
    load_photos,
    photo_crop,
    tuning_photos,
)

CLASSES = ["background", "wire", "blob", "ring", "star", "stripes", "dots"]
_SPLIT_CODES = {"train": 1, "val": 2, "tuning": 3}
_SUPERSAMPLE = 4
_COVERED = 0.5


def _outline(rng: np.random.Generator, centre: tuple[float, float], radius: float, points: int = 48) -> list:
    """A smooth closed curve around `centre`: a circle whose radius wanders with a few low harmonics."""
    harmonics = [(rng.uniform(0, 0.25 / k), k, rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4)]
    out = []
    for i in range(points):
        t = 2 * math.pi * i / points
        r = radius * (1 + sum(a * math.cos(k * t + phase) for a, k, phase in harmonics))
        out.append((centre[0] + r * math.cos(t), centre[1] + r * math.sin(t)))
    return out


def _star(rng: np.random.Generator, centre: tuple[float, float], radius: float) -> list:
    spikes = int(rng.integers(4, 8))
    inner = rng.uniform(0.35, 0.55)
    turn = rng.uniform(0, 2 * math.pi)
    return [(centre[0] + radius * (1 if i % 2 == 0 else inner) * math.cos(turn + math.pi * i / spikes),
             centre[1] + radius * (1 if i % 2 == 0 else inner) * math.sin(turn + math.pi * i / spikes))
            for i in range(2 * spikes)]


def _wire(rng: np.random.Generator, size: float) -> list:
    """A smooth open curve across much of the scene: a cubic Bézier through four random points."""
    p = rng.uniform(0, size, (4, 2))
    t = np.linspace(0, 1, 40)[:, None]
    curve = ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3])
    return [tuple(xy) for xy in curve]


def _coverage(draw_shape, size: int) -> np.ndarray:
    """How much of each pixel a shape covers (0-1), drawn white on black at `_SUPERSAMPLE` × size."""
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(big), _SUPERSAMPLE)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, kind: str, size: int, region: np.ndarray) -> np.ndarray:
    """A size×size RGB pattern of two legible colours: oriented stripes or a grid of dots."""
    first, second = legible_colour(rng, region), legible_colour(rng, region)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    if kind == "stripes":
        period = rng.uniform(3.0, 6.0)
        on = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period) > 0
    else:
        period = rng.uniform(4.0, 7.0)
        u, v = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        on = du ** 2 + dv ** 2 <= (period * rng.uniform(0.22, 0.32)) ** 2
    return np.where(on[..., None], first, second).astype(np.float32)


def _draw_object(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, label: int,
                 cfg: ShapeScenesConfig) -> None:
    size = canvas.shape[0]
    name = CLASSES[label]
    radius = rng.uniform(cfg.min_radius_fraction, cfg.max_radius_fraction) * size
    centre = tuple(rng.uniform(radius * 0.5, size - radius * 0.5, 2))
    if name == "wire":
        width = rng.uniform(cfg.min_wire_px, cfg.max_wire_px)
        line = _wire(rng, size)
        alpha = _coverage(lambda d, s: d.line([(x * s, y * s) for x, y in line], fill=255, width=round(width * s),
                                              joint="curve"), size)
    elif name == "star":
        polygon = _star(rng, centre, radius)
        alpha = _coverage(lambda d, s: d.polygon([(x * s, y * s) for x, y in polygon], fill=255), size)
    else:
        polygon = _outline(rng, centre, radius)
        if name == "ring":
            width = rng.uniform(0.15, 0.3) * radius
            closed = polygon + polygon[:1]
            alpha = _coverage(lambda d, s: d.line([(x * s, y * s) for x, y in closed], fill=255,
                                                  width=round(width * s), joint="curve"), size)
        else:
            alpha = _coverage(lambda d, s: d.polygon([(x * s, y * s) for x, y in polygon], fill=255), size)
    covered = alpha >= _COVERED
    if not covered.any():
        return
    region = canvas[covered]
    paint = (_texture(rng, name, size, region) if name in ("stripes", "dots")
             else np.broadcast_to(legible_colour(rng, region), canvas.shape))
    canvas[:] = canvas * (1 - alpha[..., None]) + paint * alpha[..., None]
    mask[covered] = label


def make_scene(rng: np.random.Generator, photos: list[np.ndarray], size: int,
               cfg: ShapeScenesConfig) -> tuple[np.ndarray, np.ndarray]:
    """One scene: a photo crop with `min_objects`-`max_objects` objects, and its mask (class indices)."""
    canvas = photo_crop(rng, photos, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(cfg.min_objects, cfg.max_objects + 1)):
        _draw_object(rng, canvas, mask, int(rng.integers(1, len(CLASSES))), cfg)
    return canvas.round().astype(np.uint8), mask


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def scene_photo(seed: int, split: str, index: int, photos: int) -> int:
    """Which of its split's `photos` photos a scene is drawn on: `photo_crop`'s first draw."""
    return int(scene_rng(seed, split, index).integers(photos))


def generate(seed: int, size: int, cfg: ShapeScenesConfig, tuning: bool = False):
    """Yield (split, id, image, mask) for every train and val scene. `tuning`: the tuning
    split's, its train scenes on six of the train photos and its val scenes on the other two."""
    if tuning:
        (train_photos, val_photos), val_source = tuning_photos(seed), "tuning"
    else:
        train_photos, val_photos, val_source = TRAIN_PHOTOS, VAL_PHOTOS, "val"
    for split, source, names, count in (("train", "train", train_photos, cfg.train_scenes),
                                        ("val", val_source, val_photos, cfg.val_scenes)):
        photos = load_photos(names)
        for i in range(count):
            image, mask = make_scene(scene_rng(seed, source, i), photos, size, cfg)
            yield split, f"{split}-{i:05d}", image, mask
