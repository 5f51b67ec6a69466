"""Weakly incremental steps' data (WILSS, as FMWISS and the field before it define them): which
train images belong to which step, and what each step may know of them.

Step 0 learns the base classes from pixel labels; each later step t brings new classes C^t and
knows its images only by their tags (the classes of C^t present), never by masks. Splits are
named as the field names them: "15-5" is 15 base classes then one step of 5, "15-1" is 15 base
classes then 5 steps of 1 (PASCAL VOC's 20 object classes, in index order). Background (class
0) belongs to every step.

- **disjoint**: a step's images hold at least one of its classes and none from a later step, so
  each image belongs to exactly one step (the step of its latest class).
- **overlap**: a step's images hold at least one of its classes, whatever else (a later step's
  classes too, as background); an image may belong to several steps.

In a step's images, every class but the step's own is background: old classes (step t > 0 knows
them only through the previous model) and future ones alike.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from pipeline.data.shards import IGNORE_INDEX, DataError

PROTOCOLS = ("disjoint", "overlap")


def split_classes(num_classes: int, split: str) -> list[list[int]]:
    """The class ids of each step for a split named "B-N" over classes 1..num_classes - 1 (0 is
    background): step 0 the first B, then steps of N in index order until none are left."""
    objects = num_classes - 1
    try:
        base, step = (int(part) for part in split.split("-"))
    except ValueError:
        raise DataError(f"incremental split {split!r}: expected 'B-N' (B base classes, then steps of N "
                        "new classes), e.g. '15-5'") from None
    if base < 1 or step < 1 or base >= objects or (objects - base) % step:
        raise DataError(f"incremental split {split!r}: expected 1 <= B < {objects} base classes and the other "
                        f"{objects} - B object classes in whole steps of N")
    ids = list(range(1, num_classes))
    return [ids[:base]] + [ids[start:start + step] for start in range(base, objects, step)]


def present_classes(mask: np.ndarray) -> frozenset[int]:
    """The object classes a mask holds (background and ignored pixels left out)."""
    return frozenset(int(c) for c in np.unique(mask) if c not in (0, IGNORE_INDEX))


def step_images(present: Mapping[str, frozenset[int]], steps: list[list[int]], step: int,
                protocol: str) -> list[str]:
    """The ids of `step`'s images under `protocol`, in the order of `present`."""
    if protocol not in PROTOCOLS:
        raise DataError(f"incremental protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    own = set(steps[step])
    later = {c for classes in steps[step + 1:] for c in classes}
    return [eid for eid, classes in present.items()
            if classes & own and (protocol == "overlap" or not classes & later)]


def step_tags(classes: frozenset[int], steps: list[list[int]], step: int) -> list[int]:
    """An image's tags at `step`: the step's own classes it holds."""
    return sorted(classes & set(steps[step]))


def step_mask(mask: np.ndarray, steps: list[list[int]], step: int) -> np.ndarray:
    """A mask as `step` sees it (step 0's pixel labels; a later step's held-aside masks): every
    class but the step's own is background, ignored pixels stay ignored."""
    keep = np.zeros(256, dtype=bool)
    keep[[*steps[step], 0, IGNORE_INDEX]] = True
    return np.where(keep[mask], mask, 0).astype(np.uint8)


def read_tags(path: Path, classes: list[str], stems: Iterable[str]) -> dict[str, list[str]]:
    """A folder dataset's image-level labels: `tags.csv`, one image per row, its stem then the
    class names it shows (`street-12,car,person`). Checked whole, each problem named with its
    line: a stem that is no image of the folder, one listed twice, a row with no tag, a class
    not in classes.txt (or the background, which is never a tag)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; expected one row per tagged image: its stem, then its class names")
    known, objects = set(stems), set(classes[1:])
    tags: dict[str, list[str]] = {}
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            for line, row in enumerate(csv.reader(f), 1):
                row = [cell.strip() for cell in row]
                if not any(row):
                    continue
                stem, names = row[0], [name for name in row[1:] if name]
                where = f"{path}: line {line}"
                if stem not in known:
                    raise DataError(f"{where}: {stem!r} is not an image stem of the dataset; expected the stem of "
                                    "an image the tags describe")
                if stem in tags:
                    raise DataError(f"{where}: {stem!r} is tagged twice; expected one row per image")
                if not names:
                    raise DataError(f"{where}: {stem!r} has no tag; expected at least one class name after it")
                unknown = [name for name in names if name not in objects]
                if unknown:
                    raise DataError(f"{where}: {unknown[0]!r} is not an object class of classes.txt; expected "
                                    f"one of {', '.join(classes[1:])}")
                tags[stem] = sorted(set(names), key=classes.index)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        "expected comma-separated rows, saved as UTF-8") from None
    if not tags:
        raise DataError(f"{path}: tags no image; expected one row per tagged image: its stem, then its class names")
    return tags
