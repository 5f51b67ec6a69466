"""The supervised encoder's labeled source, an ImageNet stand-in: letters in the fonts that
matplotlib ships, on crops of real photographs, one letter per image, labelled by letter.

As ImageNet is for the paper's encoder, it is another labeled source than any segmentation
task: its classes (24 capital letters; I and O are left out, being a bar and a ring) are none of
any built-in task's, and no user's images are in it, so an encoder trained on it
(`stages/standin_encoder.py`, shipped in `encoders/weights/`) has seen no label of the task. Twenty fonts
(sans, serif, mono, regular, bold, italic), random size, rotation, placement and colour make
its features transfer beyond one typeface. Deterministic from (seed, index); no download.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.photos import TRAIN_PHOTOS, legible_colour, load_photos, photo_crop
from pipeline.data.png import encode_png
from pipeline.data.shards import CLASSIFY_SCHEMA, write_shards

LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSerif",
         "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "DejaVuSansMono", "DejaVuSansMono-Bold",
         "DejaVuSansMono-Oblique", "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
         "cmr10", "cmb10", "cmss10", "cmtt10", "cmti10")
_SPLIT_CODE = 3  # beside a scene dataset's train (1) and val (2): other draws from the same seed


def font_files() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [folder / f"{name}.ttf" for name in FONTS]


@cache
def _font(path: Path, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), px)


def make_glyph(rng: np.random.Generator, photos: list[np.ndarray], fonts: list[Path],
               size: int) -> tuple[np.ndarray, int]:
    """One example: a letter drawn over a photo crop, and its class."""
    canvas = photo_crop(rng, photos, size)
    label = int(rng.integers(len(LETTERS)))
    font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(size // 2, size * 9 // 10 + 1)))
    glyph = Image.new("L", (size * 2, size * 2), 0)
    ImageDraw.Draw(glyph).text((size, size), LETTERS[label], font=font, fill=255, anchor="mm")
    glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
    alpha = np.asarray(glyph.crop(glyph.getbbox() or (0, 0, 1, 1)), dtype=np.float32) / 255.0
    h, w = min(alpha.shape[0], size), min(alpha.shape[1], size)
    top, left = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
    alpha = alpha[:h, :w]
    region = canvas[top:top + h, left:left + w]
    colour = legible_colour(rng, region)
    region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
    return canvas.round().astype(np.uint8), label


def generate(seed: int, size: int, count: int):
    """Yield (id, image, label) for `count` letters (on the train photos only)."""
    photos, fonts = load_photos(TRAIN_PHOTOS), font_files()
    for i in range(count):
        image, label = make_glyph(np.random.default_rng([seed, _SPLIT_CODE, i]), photos, fonts, size)
        yield f"letter-{i:05d}", image, label


def write_letters(out_dir: Path, seed: int, size: int, count: int, shard_rows: int) -> int:
    """`count` letters as Parquet shards of image-level labels (`CLASSIFY_SCHEMA`)."""
    rows = ({"id": eid, "image": encode_png(image), "label": label} for eid, image, label in generate(seed, size, count))
    return write_shards(rows, CLASSIFY_SCHEMA, out_dir, shard_rows)
