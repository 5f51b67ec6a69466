"""Val scores from counts summed over every val pixel, never per-image means: mIoU from one
confusion matrix, and boundary F1 from boundary pixels that lie near the other side's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.shards import IGNORE_INDEX

# A boundary pixel counts as found when the other side has one within this many pixels
# (a square neighbourhood): 2 px lets a 64 px scene's edges be off by the drawing's antialiasing.
BOUNDARY_TOLERANCE_PX = 2


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K×K counts, rows = ground truth, columns = prediction; ignored pixels are left out."""
    keep = target != IGNORE_INDEX
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def _edge(mask: torch.Tensor) -> torch.Tensor:
    """The pixels of `mask` (B×H×W) with a 4- or 8-neighbour outside it; the image's own border
    is not an edge."""
    return mask & _dilate(~mask, 1)


def boundary_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                    tolerance: int = BOUNDARY_TOLERANCE_PX) -> torch.Tensor:
    """K×4 counts per class: predicted boundary pixels within `tolerance` of a true one, all
    predicted boundary pixels, true boundary pixels within `tolerance` of a predicted one, all
    true boundary pixels. Ignored pixels are ignored in the prediction too (as mIoU ignores
    them): both maps get the same ignored regions, whose edges then count alike on both sides."""
    valid = target != IGNORE_INDEX
    pred = torch.where(valid, pred, IGNORE_INDEX)
    counts = torch.zeros(num_classes, 4, dtype=torch.long)
    for c in torch.unique(torch.cat([pred[valid], target[valid]])).tolist():  # a class absent here adds nothing
        predicted, true = _edge(pred == c), _edge(target == c)
        counts[c] = torch.stack([(predicted & _dilate(true, tolerance)).sum(), predicted.sum(),
                                 (true & _dilate(predicted, tolerance)).sum(), true.sum()])
    return counts


def boundary_scores(counts: np.ndarray, classes: list[str]) -> dict:
    """Boundary F1 per class (precision: predicted boundary found near the truth's; recall: the
    truth's found near the prediction's) and its mean over the classes with any boundary."""
    counts = np.asarray(counts, dtype=np.float64)
    precision = np.divide(counts[:, 0], counts[:, 1], out=np.zeros(len(counts)), where=counts[:, 1] > 0)
    recall = np.divide(counts[:, 2], counts[:, 3], out=np.zeros(len(counts)), where=counts[:, 3] > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(counts)), where=precision + recall > 0)
    present = (counts[:, 1] + counts[:, 3]) > 0
    return {"boundary_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class_boundary_f1": {name: float(v) for name, v, p in zip(classes, f1, present) if p}}


@dataclass
class ValCounts:
    """What one model's val scores are made of, summed batch by batch."""

    confusion: torch.Tensor
    boundary: torch.Tensor

    @classmethod
    def zeros(cls, num_classes: int) -> ValCounts:
        return cls(torch.zeros(num_classes, num_classes, dtype=torch.long), torch.zeros(num_classes, 4, dtype=torch.long))

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion += confusion_matrix(pred, target, len(self.confusion))
        self.boundary += boundary_counts(pred, target, len(self.confusion))

    def scores(self, classes: list[str]) -> dict:
        return segmentation_scores(self.confusion.numpy(), classes) | boundary_scores(self.boundary.numpy(), classes)


def segmentation_scores(confusion: np.ndarray, classes: list[str]) -> dict:
    """mIoU over the classes present in ground truth or prediction, per-class IoU and pixel accuracy."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1.0)),
        "per_class_iou": {name: float(v) for name, v, p in zip(classes, iou, present) if p},
    }
