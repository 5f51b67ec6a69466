"""A prepared dataset: its splits, the labeled subset, and the manifest that describes them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.config.params import DataConfig
from pipeline.data.png import encode_png
from pipeline.data.shards import (
    IGNORE_INDEX,
    SEGMENTATION_SCHEMA,
    TAGGED_SCHEMA,
    DataError,
    ShardWriter,
)

SEGMENTATION_SPLITS = ("labeled", "unlabeled", "val")
MANIFEST = "manifest.json"
# An incremental setting's extra folders: each step's tagged images, and val with every class.
STEPS_FOLDER = "steps"
ALL_CLASSES_VAL = "val_all"


def nested_labeled_ids(train_ids: list[str], fraction: float, seed: int) -> list[str]:
    """The first round(fraction * n) ids of one seeded permutation, so the labeled subset at
    fraction f is contained in the subset at any larger f with the same seed."""
    order = np.random.default_rng(seed).permutation(len(train_ids))
    count = int(round(fraction * len(train_ids)))
    if count < 1:
        raise DataError(f"data.labeled_fraction={fraction} selects no image out of {len(train_ids)}")
    return sorted(train_ids[i] for i in order[:count])


class SplitWriter:
    """Streams segmentation examples into the three splits' shards under `out_dir` and tallies
    the labeled split's class pixels; with `steps` (an incremental setting's step names), also
    each step's tagged images into `steps/<name>` and val with every class into `val_all`."""

    def __init__(self, num_classes: int, out_dir: Path, shard_rows: int, steps: list[str] = ()):
        self.num_classes = num_classes
        self.shards = {s: ShardWriter(out_dir / s, SEGMENTATION_SCHEMA, shard_rows) for s in SEGMENTATION_SPLITS}
        if steps:
            self.shards[ALL_CLASSES_VAL] = ShardWriter(out_dir / ALL_CLASSES_VAL, SEGMENTATION_SCHEMA, shard_rows)
            self.shards |= {step_split(s): ShardWriter(out_dir / step_split(s), TAGGED_SCHEMA, shard_rows)
                            for s in steps}
        self.ids: dict[str, list[str]] = {s: [] for s in SEGMENTATION_SPLITS}
        self.seen: dict[str, set[str]] = {}
        self.pixel_counts = np.zeros(num_classes, dtype=np.int64)
        self.unassigned = 0  # incremental: train images that no step's protocol takes

    def add(self, split: str, example_id: str, image: np.ndarray, mask: np.ndarray | None,
            tags: list[int] | None = None) -> None:
        if mask is not None and split == "labeled":
            self.pixel_counts += np.bincount(mask[mask != IGNORE_INDEX].ravel(),
                                             minlength=self.num_classes)[: self.num_classes]
        # Ids are unique across the segmentation splits, and within each other folder: a step's
        # images (overlap) and val_all repeat ids of the segmentation splits.
        seen = self.seen.setdefault("segmentation" if split in self.ids else split, set())
        if example_id in seen:
            raise DataError(f"id {example_id!r} occurs twice in the dataset (e.g. a.png and a.jpg, or an image "
                            "named like another's tile <id>_t<k>); ids must be unique")
        seen.add(example_id)
        if split in self.ids:
            self.ids[split].append(example_id)
        row = {"id": example_id, "height": image.shape[0], "width": image.shape[1],
               "image": encode_png(image), "mask": None if mask is None else encode_png(mask)}
        self.shards[split].add(row if tags is None else row | {"tags": tags})


def step_split(step: str) -> str:
    """The prepared folder of an incremental step's tagged images."""
    return f"{STEPS_FOLDER}/{step}"


def write_prepared(writer: SplitWriter, classes: list[str], cfg: DataConfig, tmp: Path,
                   incremental: dict | None = None) -> dict:
    """Close the splits `writer` streamed into `tmp` and add the manifest (with `incremental`:
    the setting's classes, protocol and steps, each given its image count)."""
    counts = {split: shards.close() for split, shards in writer.shards.items()}
    for split in SEGMENTATION_SPLITS:
        if counts[split] == 0 and split != "unlabeled":
            raise DataError(f"split '{split}' is empty: check data.root and data.labeled_fraction"
                            + (" (with incremental steps, only train images of step 0 are labeled)" if incremental else ""))
    total = max(int(writer.pixel_counts.sum()), 1)
    manifest = {
        "format": cfg.format,
        "classes": list(classes),
        "num_classes": len(classes),
        "image_size": cfg.image_size,
        "labeled_fraction": cfg.labeled_fraction,
        "seed": cfg.seed,
        "tuning": cfg.tuning,  # val is then the tuning split's: its scores choose settings, they report nothing
        "counts": {split: counts[split] for split in SEGMENTATION_SPLITS},
        "labeled_pixel_frequency": {c: round(int(n) / total, 6) for c, n in zip(classes, writer.pixel_counts)},
        "ids": writer.ids,
    }
    if incremental:
        steps = {}
        for step, entry in incremental["steps"].items():
            if counts[step_split(step)] == 0:
                raise DataError(f"incremental.steps.{step}: no train image falls to it under the "
                                f"{incremental['protocol']} protocol; expected images that show its classes "
                                f"({', '.join(entry['classes'])})")
            steps[step] = entry | {"images": counts[step_split(step)]}
        manifest["incremental"] = incremental | {"steps": steps, "val_all": counts[ALL_CLASSES_VAL],
                                                 "unassigned": writer.unassigned}
    manifest["content_sha256"] = _content_hash(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _content_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.parquet")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_manifest(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: missing; run the prepare stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); rerun the prepare stage") from None


def manifest_hash(prepared_dir: Path) -> str:
    return hashlib.sha256((Path(prepared_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


def pretraining_images(prepared: Path, manifest: dict) -> list[Path]:
    """The Parquet folders whose images (not masks) self-supervised pretraining may use:
    the labeled split and, when there is one, the unlabeled split."""
    return [prepared / "labeled"] + ([prepared / "unlabeled"] if manifest["counts"]["unlabeled"] else [])
