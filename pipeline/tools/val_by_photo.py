"""Trained models' val mIoU photo by photo, on the built-in shape scenes: where a gain comes from.

    python -m pipeline.tools.val_by_photo models/rounds/teacher.pt models/rounds/round1.pt
    python -m pipeline.tools.val_by_photo --prepared study/data/prepared study/models/student-*.pt

Every val scene is drawn on one photo (`photos.VAL_PHOTOS`, or the tuning split's held-out train
photos when the data was prepared with `data.tuning`). Each model, a teacher or student that the
pipeline or the study wrote, is scored as `evaluate` scores it (mIoU over the classes present,
no flip) on all of val and on each photo's scenes. Plain torch in this process: it reads a few
hundred small images, no Ray job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline.data.manifest import read_manifest
from pipeline.data.photos import VAL_PHOTOS, tuning_photos
from pipeline.data.shape_scenes import scene_photo

BATCH = 64


def val_photos(manifest: dict) -> tuple[tuple[str, ...], str]:
    """The photos the prepared data's val scenes are drawn on, and their split's name for
    `scene_photo`."""
    return (tuning_photos(manifest["seed"])[1], "tuning") if manifest["tuning"] else (VAL_PHOTOS, "val")


def photo_of_each(ids: list[str], manifest: dict, photos: int, split: str) -> np.ndarray:
    return np.array([scene_photo(manifest["seed"], split, int(i.rsplit("-", 1)[1]), photos) for i in ids])


def scores_by_photo(net, images, masks, photo: np.ndarray, photos: int, classes: list[str]) -> list[float]:
    """mIoU on all of val, then on each photo's scenes."""
    import torch

    from pipeline.infer.batch import probabilities
    from pipeline.infer.metrics import confusion_matrix, segmentation_scores

    with torch.no_grad():
        pred = torch.cat([probabilities(net, images[i:i + BATCH], flip_tta=False).argmax(1)
                          for i in range(0, len(images), BATCH)])
    chosen = [np.ones(len(photo), bool), *(photo == k for k in range(photos))]
    return [segmentation_scores(confusion_matrix(pred[torch.from_numpy(c)], masks[torch.from_numpy(c)],
                                                 len(classes)).numpy(), classes)["miou"] for c in chosen]


def table(prepared: Path, models: list[Path]) -> str:
    import torch

    from pipeline.data.png import decode_png
    from pipeline.data.shards import read_split
    from pipeline.models.checkpoints import load_exported_segmenter

    manifest = read_manifest(prepared)
    if manifest["format"] != "shapes":
        raise ValueError(f"{prepared}: data.format is {manifest['format']!r}; val photos exist for the shape scenes only")
    nets = [load_exported_segmenter(path) for path in models]  # every file checked before any scoring
    for path, (_, classes) in zip(models, nets):
        if classes != manifest["classes"]:
            raise ValueError(f"{path}: classes {classes} differ from {prepared}'s {manifest['classes']}")
    val = read_split(prepared / "val")
    images = torch.from_numpy(np.stack([decode_png(b) for b in val.column("image").to_pylist()])).permute(0, 3, 1, 2)
    masks = torch.from_numpy(np.stack([decode_png(b) for b in val.column("mask").to_pylist()])).long()
    names, split = val_photos(manifest)
    photo = photo_of_each(val.column("id").to_pylist(), manifest, len(names), split)
    lines = ["| model | all val | " + " | ".join(f"{n.removeprefix('sklearn:')} ({(photo == k).sum()} scenes)"
                                               for k, n in enumerate(names)) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for path, (net, classes) in zip(models, nets):
        row = scores_by_photo(net, images, masks, photo, len(names), classes)
        lines.append(f"| {path.stem} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="segmenter weights (teacher or student outputs)")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="the prepared data (its val split)")
    args = parser.parse_args(argv)
    try:
        print(table(args.prepared, args.models))
    except ValueError as err:  # the data's and the checkpoints' errors, each naming its file
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
