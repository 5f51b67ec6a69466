"""mIoU from one confusion matrix accumulated over every val pixel, never per-image means."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.shards import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K×K counts, rows = ground truth, columns = prediction; ignored pixels are left out."""
    keep = target != IGNORE_INDEX
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


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
