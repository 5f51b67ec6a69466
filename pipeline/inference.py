"""Batched inference for `pseudo_label` and `evaluate`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import augment
from pipeline.data import decode_png, encode_png, stack_decoded
from pipeline.metrics import confusion_matrix
from pipeline.models import SegmentationNet


def probabilities(model: SegmentationNet, images: torch.Tensor, flip_tta: bool) -> torch.Tensor:
    """Softmax over classes for uint8 images N×3×H×W, averaged with the mirrored view if asked."""
    x = augment.to_model_range(augment.to_unit_float(images))
    with torch.no_grad():
        probs = model(x).softmax(1)
        if flip_tta:
            probs = 0.5 * (probs + model(x.flip(-1)).softmax(1).flip(-1))
    return probs


def iter_split(path: Path, batch_size: int, columns: list[str], desc: str) -> Iterator[dict]:
    """Record batches of a prepared split, with PNG columns decoded to uint8 tensors."""
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    with tqdm(total=total, desc=desc, unit="img", mininterval=2) as bar:
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=columns):
                out = {"id": batch.column("id").to_pylist()}
                for column in columns:
                    if column == "id":
                        continue
                    values = batch.column(column).to_pylist()
                    if any(v is None for v in values):
                        out[column] = None
                        continue
                    out[column] = stack_decoded([decode_png(v) for v in values])
                    out[f"{column}_bytes"] = values
                bar.update(len(out["id"]))
                yield out


def pseudo_label_rows(model: SegmentationNet, unlabeled: Path, batch_size: int, flip_tta: bool,
                      confusion: torch.Tensor) -> Iterator[dict]:
    """The teacher's hard label and confidence (uint8, ×255) for every unlabeled image.

    Where held-aside masks exist, adds pseudo-label vs. truth counts to `confusion` (to report
    pseudo-label quality; those masks are never used to train).
    """
    for batch in iter_split(unlabeled, batch_size, ["id", "image", "mask"], "pseudo-label"):
        confidence, label = probabilities(model, batch["image"], flip_tta).max(1)
        if batch["mask"] is not None:
            confusion += confusion_matrix(label, batch["mask"], confusion.shape[0])
        conf_u8 = (confidence * 255).round().to(torch.uint8).numpy()
        label_u8 = label.to(torch.uint8).numpy()
        for i, eid in enumerate(batch["id"]):
            yield {"id": eid, "image": batch["image_bytes"][i], "pseudo_label": encode_png(label_u8[i]),
                   "confidence": encode_png(conf_u8[i])}


def evaluate_split(models: dict[str, SegmentationNet], val: Path, batch_size: int, num_classes: int,
                   keep: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One confusion matrix per model over every val pixel; plus the first `keep` images,
    masks and predictions for the figures."""
    confusion = {name: torch.zeros(num_classes, num_classes, dtype=torch.long) for name in models}
    samples: dict[str, list] = {"image": [], "mask": [], **{name: [] for name in models}}
    for batch in iter_split(val, batch_size, ["id", "image", "mask"], "evaluate"):
        taken = sum(len(x) for x in samples["image"])
        for name, model in models.items():
            pred = probabilities(model, batch["image"], flip_tta=False).argmax(1)
            confusion[name] += confusion_matrix(pred, batch["mask"], num_classes)
            samples[name].append(pred[: max(0, keep - taken)])
        samples["image"].append(batch["image"][: max(0, keep - taken)])
        samples["mask"].append(batch["mask"][: max(0, keep - taken)])
    return confusion, {k: torch.cat(v) for k, v in samples.items()}
