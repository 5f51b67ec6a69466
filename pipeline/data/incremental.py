"""Weakly incremental steps' data (WILSS, as FMWISS and the field before it define them): which
train images belong to which step, and what each step may know of them.

Step 0 learns the base classes from pixel labels; each later step t brings new classes C^t and
knows its images only by their tags (the classes of C^t present), never by masks. The field's
named splits are step lists: PASCAL VOC's "15-5" is its first 15 object classes as the base,
then one step of the last 5; "15-1" five steps of one. Background belongs to every step.

- **disjoint**: a step's images hold at least one of its classes and none from a later step, so
  each image belongs to exactly one step (the step of its latest class).
- **overlap**: a step's images hold at least one of its classes, whatever else (a later step's
  classes too, as background); an image may belong to several steps.

In a step's images, every class but the step's own is background: old classes (step t > 0 knows
them only through the previous model) and future ones alike.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config.params import INCREMENTAL_PROTOCOLS
from pipeline.data.shards import IGNORE_INDEX, DataError


@dataclass(frozen=True)
class StepClasses:
    """The classes of an incremental setting in the order its models hold them: background, the
    base classes (step 0's, in the dataset's order), then each step's new ones as listed."""

    names: list[str]
    steps: list[list[int]]  # the ids (in that order) of each step's classes; step 0: the base classes
    table: np.ndarray  # a dataset class id -> its id in that order; ignored pixels stay ignored

    def remap(self, mask: np.ndarray) -> np.ndarray:
        return self.table[mask]


def step_classes(classes: list[str], new: dict[str, list[str]]) -> StepClasses:
    """`classes` (the dataset's, background first) reordered for `new` (step name -> its new
    classes, in step order): each new class named as the dataset names it, the background never
    new, and at least one class left for step 0."""
    known = {name: k for k, name in enumerate(classes)}
    for step, names in new.items():
        for name in names:
            if name not in known or known[name] == 0:
                raise DataError(f"incremental.steps.{step}.classes: {name!r} is not an object class of the "
                                f"dataset; expected one of {', '.join(classes[1:])}")
    later = {name for names in new.values() for name in names}
    base = [name for name in classes[1:] if name not in later]
    if not base:
        raise DataError("incremental.steps: every object class is new in some step, leaving none for step 0 "
                        "to learn from pixel labels; expected at least one base class")
    names = [classes[0], *base, *(name for names in new.values() for name in names)]
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[[known[name] for name in names]] = np.arange(len(names), dtype=np.uint8)
    bounds = np.cumsum([0, len(base), *(len(names) for names in new.values())]) + 1
    return StepClasses(names, [list(range(a, b)) for a, b in itertools.pairwise(bounds)], table)


def classes_at(manifest: dict, step: str) -> tuple[list[str], list[str]]:
    """(the classes the model before `step` holds, the step's new ones), in the setting's order,
    from a prepared manifest (`prepare` with incremental steps)."""
    setting = manifest.get("incremental")
    if not setting or step not in setting["steps"]:
        have = ", ".join(setting["steps"]) if setting else "none"
        raise DataError(f"incremental step {step!r}: the prepared data has no such step (its steps: {have}); "
                        "rerun prepare with params' incremental.steps")
    new = setting["steps"][step]["classes"]
    first = setting["classes"].index(new[0])
    return setting["classes"][:first], new


def present_classes(mask: np.ndarray) -> frozenset[int]:
    """The object classes a mask holds (background and ignored pixels left out)."""
    return frozenset(int(c) for c in np.unique(mask) if c not in (0, IGNORE_INDEX))


def steps_of(classes: frozenset[int], steps: list[list[int]], protocol: str) -> list[int]:
    """The steps an image holding `classes` belongs to under `protocol`."""
    if protocol not in INCREMENTAL_PROTOCOLS:
        raise DataError(f"incremental protocol {protocol!r}: expected one of {', '.join(INCREMENTAL_PROTOCOLS)}")
    held = [k for k, own in enumerate(steps) if classes & set(own)]
    return held if protocol == "overlap" else held[-1:]


def step_tags(classes: frozenset[int], steps: list[list[int]], step: int) -> list[int]:
    """An image's tags at `step`: the step's own classes it holds."""
    return sorted(classes & set(steps[step]))


def tag_targets(tags, first_class: int, num_classes: int):
    """Tags (an N×L tensor of class ids, -1 padding) as N×`num_classes` float targets over a
    step's classes `first_class` … `first_class + num_classes - 1`; any other id counts for none."""
    import torch

    local = tags - first_class
    index = torch.where((local >= 0) & (local < num_classes), local, num_classes)
    return torch.zeros(len(tags), num_classes + 1).scatter_(1, index, 1.0)[:, :num_classes]


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
