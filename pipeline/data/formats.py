"""Datasets on disk: what `prepare` reads for each file-based `data.format`.

A format lists its examples (split, id, image file, mask file) from its official layout,
names its classes and their colours, and maps raw mask values to class ids through a
256-entry table: a class id, 255 (ignore), or INVALID for a value the format never writes,
which is an error naming the file (e.g. a Cityscapes trainId mask given where labelIds are
expected). Images are turned as displayed (their EXIF orientation applied; masks are PNGs
drawn over the displayed image and have none). Images and masks are then resized so the
shorter side is `data.image_size` and either centre-cropped to a square (`data.fit: crop`)
or cut into squares that cover the whole image (`data.fit: tiles`, ids `<id>_t<k>`), so
every val pixel is scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.config.params import DataConfig
from pipeline.data.shards import IGNORE_INDEX, DataError

INVALID = -1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MASK_MODES = ("L", "P", "I", "I;16")


@dataclass(frozen=True)
class Example:
    split: str  # train | val | unlabeled
    id: str
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    classes: Callable[[Path], Sequence[str]]  # data.root -> class names
    list_examples: Callable[[Path, DataConfig], list[Example]]
    label_table: Callable[[int], np.ndarray]  # num_classes -> 256 raw values -> id / 255 / INVALID
    ignore: str  # how the format's masks mark pixels that are not scored, for docs and errors
    palette: Callable[[int], np.ndarray]  # num_classes -> 256×3 uint8 (255 = ignore)


# ---- label tables --------------------------------------------------------------------------

def identity_table(num_classes: int) -> np.ndarray:
    table = np.full(256, INVALID, dtype=np.int16)
    table[:num_classes] = np.arange(num_classes)
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


def zero_is_ignore_table(num_classes: int) -> np.ndarray:
    """0 = unlabeled/other → ignore; class k is stored as k + 1."""
    table = np.full(256, INVALID, dtype=np.int16)
    table[0] = IGNORE_INDEX
    table[1:num_classes + 1] = np.arange(num_classes)
    return table


# Cityscapes labelId → trainId for the 19 evaluated classes (cityscapesScripts' labels.py);
# every other labelId (0–33) is ignored.
CITYSCAPES_TRAIN_LABEL_IDS = {
    "road": 7, "sidewalk": 8, "building": 11, "wall": 12, "fence": 13, "pole": 17,
    "traffic light": 19, "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23,
    "person": 24, "rider": 25, "car": 26, "truck": 27, "bus": 28, "train": 31,
    "motorcycle": 32, "bicycle": 33,
}
CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]


def cityscapes_table(num_classes: int) -> np.ndarray:
    table = np.full(256, INVALID, dtype=np.int16)
    table[:34] = IGNORE_INDEX
    for train_id, label_id in enumerate(CITYSCAPES_TRAIN_LABEL_IDS.values()):
        table[label_id] = train_id
    return table


# ---- palettes ------------------------------------------------------------------------------

def voc_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map: the bits of the class index spread over R, G and B from
    the most significant bit down; ignore (255) drawn white."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value = index
        for bit in range(8):
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
    colours[IGNORE_INDEX] = 255
    return colours


def fixed_palette(colours: list[tuple[int, int, int]]) -> Callable[[int], np.ndarray]:
    def palette(num_classes: int) -> np.ndarray:
        table = voc_palette(num_classes)
        table[:len(colours)] = colours
        return table

    return palette


# ---- reading files -------------------------------------------------------------------------

def read_image(path: Path) -> Image.Image:
    """An image file as RGB (grayscale and RGBA are converted; alpha is dropped), turned as
    it is displayed: a photo stored sideways with an EXIF Orientation tag (phones do this) is
    rotated/flipped upright, so its mask, drawn over the displayed image, lines up."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "F"):  # 16-bit / float photos: scale to 8 bits
                array = np.asarray(im, dtype=np.float64)
                span = max(float(array.max() - array.min()), 1e-12)
                im = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
            return im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def read_mask(path: Path, image_size: tuple[int, int], table: np.ndarray, fmt: DatasetFormat) -> np.ndarray:
    """A mask file as class ids (uint8, 255 = ignore) at the image's size, checked."""
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise DataError(f"{path}: mask mode {im.mode}; expected a single-channel PNG of "
                                f"{fmt.name} label indices ({fmt.ignore})")
            if im.size != image_size:
                raise DataError(f"{path}: mask size {im.size} differs from its image's {image_size} "
                                "(width, height as displayed, after the image's EXIF orientation)")
            raw = np.asarray(im)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise DataError(f"{path}: not a readable mask ({type(err).__name__}: {err})") from None
    if raw.size and (raw.max() > 255 or raw.min() < 0):
        raise DataError(f"{path}: mask values {int(raw.min())}..{int(raw.max())} do not fit the 8-bit label range")
    ids = table[raw.astype(np.uint8)]
    bad = ids == INVALID
    if bad.any():
        raise DataError(f"{path}: mask value {int(raw[bad].max())} is not a {fmt.name} label "
                        f"({fmt.ignore})")
    return ids.astype(np.uint8)


def square_layout(width: int, height: int, size: int, fit: str) -> tuple[tuple[int, int], list[tuple]]:
    """Where the squares of an image lie: the size it is resized to (shorter side `size`) and
    the (left, top, right, bottom) boxes in it — one centred ('crop') or evenly spaced ones
    covering the longer side ('tiles'; they overlap when it is not a multiple of `size`)."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    long_side = max(nw, nh)
    count = 1 if fit == "crop" else math.ceil(long_side / size)
    if count == 1:
        starts = [(long_side - size) // 2]
    else:
        starts = [round(k * (long_side - size) / (count - 1)) for k in range(count)]
    return (nw, nh), [(s, 0, s + size, size) if nw >= nh else (0, s, size, s + size) for s in starts]


def squares(image: Image.Image, size: int, fit: str, resample: int) -> list[np.ndarray]:
    resized, boxes = square_layout(*image.size, size, fit)
    image = image.resize(resized, resample)
    return [np.asarray(image.crop(box)) for box in boxes]


def load_example(example: Example, fmt: DatasetFormat, table: np.ndarray,
                 cfg: DataConfig) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Yield (id, image, mask) squares of one example; masks mapped to class ids."""
    image = read_image(example.image)
    images = squares(image, cfg.image_size, cfg.fit, Image.BILINEAR)
    masks: list[np.ndarray | None] = [None] * len(images)
    if example.mask is not None:
        mask = read_mask(example.mask, image.size, table, fmt)
        masks = squares(Image.fromarray(mask), cfg.image_size, cfg.fit, Image.NEAREST)
    for k, (tile, mask_tile) in enumerate(zip(images, masks)):
        yield (example.id if len(images) == 1 else f"{example.id}_t{k}"), tile, mask_tile


# ---- listing files in each layout ----------------------------------------------------------

def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: missing; expected {what}")
    return path


def locate(root: Path, marker: str, *parents: str) -> Path:
    """The dataset folder holding `marker`, given it or one of the folders that contain it
    as distributed (e.g. VOCdevkit/VOC2012)."""
    for candidate in (root, *(root / p for p in parents)):
        if (candidate / marker).is_dir():
            return candidate
    tried = ", ".join(str(p / marker) for p in (root, *(root / p for p in parents)))
    raise DataError(f"{root}: data.root does not hold the expected layout (looked for {tried})")


def read_text_lines(path: Path, expected: str) -> list[str]:
    """The lines of a small text file the user wrote: UTF-8, a byte-order mark (Windows
    editors write one) dropped so it does not become part of the first name."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        f"expected {expected}, saved as UTF-8") from None


def read_id_list(path: Path) -> list[str]:
    """Ids from a split file: one per line, the first token; a path token gives its stem
    (so `JPEGImages/2007_000032.jpg SegmentationClass/...` lines work too)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; expected one image id per line")
    tokens = [line.split()[0] for line in read_text_lines(path, "one image id per line") if line.strip()]
    ids = [Path(t).stem if "/" in t or Path(t).suffix.lower() in IMAGE_SUFFIXES else t for t in tokens]
    seen: set[str] = set()
    for eid in ids:
        if eid in seen:
            raise DataError(f"{path}: id {eid!r} is listed twice")
        seen.add(eid)
    return ids


def with_masks(split: str, images: dict[str, Path], masks: Path | None) -> list[Example]:
    """Examples for {id: image file}, each with `masks/<id>.png` (none when `masks` is None)."""
    examples = []
    for eid, image in images.items():
        if not image.is_file():
            raise DataError(f"{image}: missing image for id {eid!r}")
        mask = None if masks is None else masks / f"{eid}.png"
        if mask is not None and not mask.is_file():
            raise DataError(f"{mask}: missing mask for {image}")
        examples.append(Example(split, eid, image, mask))
    return examples


def paired(split: str, ids: list[str], images: Path, image_suffix: str, masks: Path | None) -> list[Example]:
    return with_masks(split, {eid: images / f"{eid}{image_suffix}" for eid in ids}, masks)


def read_folder_classes(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing; expected one class name per line")
    numbered = [(n, line.strip()) for n, line in enumerate(read_text_lines(path, "one class name per line"), 1)
                if line.strip()]
    first_line: dict[str, int] = {}
    for n, name in numbered:
        if name in first_line:
            raise DataError(f"{path}: class {name!r} is listed twice (lines {first_line[name]} and {n}); "
                            "expected each class name once")
        first_line[name] = n
    classes = [name for _, name in numbered]
    if not 2 <= len(classes) < IGNORE_INDEX:
        raise DataError(f"{path}: expected 2 to {IGNORE_INDEX - 1} class names (masks are 8-bit, "
                        f"{IGNORE_INDEX} = ignore), found {len(classes)}")
    return classes


def folder_pairs(split: str, images_dir: Path, masks_dir: Path) -> list[Example]:
    images = list_images(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no images found (expected {sorted(IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise DataError(f"{image}: same name as {by_stem[image.stem].name}; ids (file stems) must be unique")
        by_stem[image.stem] = image
    return with_masks(split, by_stem, masks_dir)


def list_folder(root: Path, cfg: DataConfig) -> list[Example]:
    """Bring-your-own data:

        root/images/<stem>.{png,jpg,...}    RGB images
        root/masks/<stem>.png               class indices, 255 = ignore (same stem as the image)
        root/unlabeled/<any>.{png,jpg,...}  optional, images only
        root/val/images, root/val/masks     optional; otherwise a seeded split of images/
        root/classes.txt                    one class name per line
    """
    if not root.is_dir():
        raise DataError(f"{root}: data.root is not a folder")
    train = folder_pairs("train", root / "images", root / "masks")
    if (root / "val" / "images").is_dir():
        val = folder_pairs("val", root / "val" / "images", root / "val" / "masks")
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        n_val = max(1, int(round(len(train) * cfg.val_fraction)))
        if n_val >= len(train):
            raise DataError(f"{root / 'images'}: {len(train)} images are too few to split off a val set")
        val = [replace(train[i], split="val") for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    unlabeled = [Example("unlabeled", f"unlabeled-{p.stem}", p, None) for p in list_images(root / "unlabeled")]
    return train + val + unlabeled


def list_cityscapes(root: Path, cfg: DataConfig) -> list[Example]:
    """leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png with
    gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png; with data.extra_images, the
    leftImg8bit/train_extra cities (the coarse set's images) join as unlabeled."""
    root = locate(root, "leftImg8bit")
    examples = []
    splits = [("train", "train"), ("val", "val")] + ([("train_extra", "unlabeled")] if cfg.extra_images else [])
    for folder, split in splits:
        images = sorted(require_dir(root / "leftImg8bit" / folder, f"Cityscapes {folder} cities").glob("*/*_leftImg8bit.png"))
        if not images:
            raise DataError(f"{root / 'leftImg8bit' / folder}: no <city>/*_leftImg8bit.png images")
        for image in images:
            eid = image.name[: -len("_leftImg8bit.png")]
            mask = None
            if split != "unlabeled":
                mask = root / "gtFine" / folder / image.parent.name / f"{eid}_gtFine_labelIds.png"
                if not mask.is_file():
                    raise DataError(f"{mask}: missing fine labelIds mask for {image}")
            examples.append(Example(split, eid, image, mask))
    return examples


def list_ade20k(root: Path, cfg: DataConfig) -> list[Example]:
    """ADEChallengeData2016/images/{training,validation}/<id>.jpg with
    annotations/{training,validation}/<id>.png."""
    root = locate(root, "images", "ADEChallengeData2016")
    examples = []
    for folder, split in (("training", "train"), ("validation", "val")):
        images = list_images(require_dir(root / "images" / folder, f"ADE20K {folder} images"))
        if not images:
            raise DataError(f"{root / 'images' / folder}: no images")
        ids = [p.stem for p in images]
        examples += paired(split, ids, root / "images" / folder, ".jpg", root / "annotations" / folder)
    return examples


VOC_AUG_LISTS = ("trainaug.txt", "train_aug.txt")  # mmsegmentation's name, DeepLab's name


def list_voc(root: Path, cfg: DataConfig) -> list[Example]:
    """VOC2012/JPEGImages/<id>.jpg with palette PNGs SegmentationClass/<id>.png, split by
    ImageSets/Segmentation/{train,val}.txt. With data.extra_images, the SBD augmented set
    (ids in ImageSets/Segmentation/trainaug.txt or train_aug.txt, masks in
    SegmentationClassAug/) joins train, minus any val image."""
    root = locate(root, "JPEGImages", "VOC2012", "VOCdevkit/VOC2012")
    sets = root / "ImageSets" / "Segmentation"
    val_ids = read_id_list(sets / "val.txt")
    train_ids = read_id_list(sets / "train.txt")
    examples = paired("train", train_ids, root / "JPEGImages", ".jpg", root / "SegmentationClass")
    if cfg.extra_images:
        known = set(train_ids) | set(val_ids)
        aug_list = next((sets / name for name in VOC_AUG_LISTS if (sets / name).is_file()), sets / VOC_AUG_LISTS[0])
        extra = [eid for eid in read_id_list(aug_list) if eid not in known]
        examples += paired("train", extra, root / "JPEGImages", ".jpg",
                           require_dir(root / "SegmentationClassAug", "the SBD augmented masks"))
    return examples + paired("val", val_ids, root / "JPEGImages", ".jpg", root / "SegmentationClass")


def list_pascal_context(root: Path, cfg: DataConfig) -> list[Example]:
    """VOC2010/JPEGImages/<id>.jpg with the 59-class label PNGs
    SegmentationClassContext/<id>.png, split by ImageSets/SegmentationContext/{train,val}.txt
    (the layout mmsegmentation's pascal_context converter writes)."""
    root = locate(root, "SegmentationClassContext", "VOC2010", "VOCdevkit/VOC2010")
    sets = root / "ImageSets" / "SegmentationContext"
    return [example for split, name in (("train", "train.txt"), ("val", "val.txt"))
            for example in paired(split, read_id_list(sets / name), root / "JPEGImages", ".jpg",
                                  root / "SegmentationClassContext")]


# ---- the formats ---------------------------------------------------------------------------

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
PASCAL_CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

FORMATS: dict[str, DatasetFormat] = {}


def register(fmt: DatasetFormat) -> None:
    FORMATS[fmt.name] = fmt


def fixed_classes(names: Sequence[str]) -> Callable[[Path], Sequence[str]]:
    return lambda root: names


register(DatasetFormat("folder", read_folder_classes, list_folder, identity_table,
                       "class indices below the number of classes in classes.txt, 255 = ignore",
                       voc_palette))
register(DatasetFormat("cityscapes", fixed_classes(tuple(CITYSCAPES_TRAIN_LABEL_IDS)), list_cityscapes, cityscapes_table,
                       "labelIds 0-33; the 19 evaluated classes become trainIds, the rest 255",
                       fixed_palette(CITYSCAPES_COLOURS)))
register(DatasetFormat("ade20k", fixed_classes(ADE20K_CLASSES), list_ade20k, zero_is_ignore_table,
                       "0 = other (ignored), class k stored as k+1 up to 150", voc_palette))
register(DatasetFormat("voc", fixed_classes(VOC_CLASSES), list_voc, identity_table,
                       "palette indices 0-20, 255 = boundary (ignored)", voc_palette))
register(DatasetFormat("pascal_context", fixed_classes(PASCAL_CONTEXT_CLASSES), list_pascal_context, zero_is_ignore_table,
                       "0 = background (ignored), class k stored as k+1 up to 59", voc_palette))


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise DataError(f"data.format {name!r}: no such dataset format (expected one of {sorted(FORMATS)})")
    return FORMATS[name]


def palette_for(manifest: dict) -> np.ndarray:
    """Colours for a prepared dataset's classes: the format's own, else the VOC colour map."""
    fmt = FORMATS.get(manifest.get("format", ""))
    return (fmt.palette if fmt else voc_palette)(manifest["num_classes"])
