import numpy as np
import torch

from pipeline.data.shards import IGNORE_INDEX
from pipeline.infer.metrics import confusion_matrix, segmentation_scores


def test_confusion_matrix_counts_and_ignores():
    target = torch.tensor([[0, 0, 1, 1, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1, 0]])
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_scores_by_hand():
    # rows truth, cols prediction; c is only ever predicted, d never occurs at all
    conf = np.array([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    scores = segmentation_scores(conf, ["a", "b", "c", "d"])
    iou_a = 3 / (3 + 1 + 0)      # TP / (TP + FN + FP)
    iou_b = 2 / (2 + 2 + 1)
    assert scores["per_class_iou"] == {"a": iou_a, "b": iou_b, "c": 0.0}
    assert scores["miou"] == (iou_a + iou_b + 0.0) / 3
    assert scores["pixel_accuracy"] == 5 / 8


def test_one_matrix_over_all_pixels_not_a_mean_of_images():
    """Image 1 is a tiny perfect image, image 2 a large bad one: per-image averaging would
    report a far higher mIoU than the pooled matrix."""
    t1, p1 = torch.tensor([[1]]), torch.tensor([[1]])
    t2, p2 = torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long)
    conf = confusion_matrix(p1, t1, 2) + confusion_matrix(p2, t2, 2)
    scores = segmentation_scores(conf.numpy(), ["bg", "fg"])
    assert scores["per_class_iou"]["fg"] == 1 / 11
    assert scores["per_class_iou"]["bg"] == 0.0
