import numpy as np
import torch

from pipeline.data.shards import IGNORE_INDEX
from pipeline.infer.metrics import (
    ValCounts,
    boundary_counts,
    boundary_scores,
    confusion_matrix,
    segmentation_scores,
)


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


def _square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.long)
    mask[0, top:top + side, left:left + side] = 1
    return mask


def test_boundary_counts_by_hand():
    """A 4×4 square in a 10×10 image has 12 edge pixels (its outline) and the background 20
    (the ring around it); the image's own border is no boundary."""
    truth = _square(10, 3, 3, 4)
    counts = boundary_counts(truth, truth, 2, tolerance=0)
    assert counts.tolist() == [[20, 20, 20, 20], [12, 12, 12, 12]]
    # Shifted by 1 px: within a 1 px tolerance every boundary pixel is found, with none it is not.
    shifted = _square(10, 4, 3, 4)
    assert boundary_scores(boundary_counts(shifted, truth, 2, tolerance=1).numpy(), ["bg", "fg"])["boundary_f1"] == 1.0
    strict = boundary_scores(boundary_counts(shifted, truth, 2, tolerance=0).numpy(), ["bg", "fg"])
    assert 0.0 < strict["per_class_boundary_f1"]["fg"] < 1.0


def test_boundary_f1_finds_none_of_a_missed_thin_structure_whose_background_iou_stays_high():
    """A 1 px wire across a 32×32 image: predicting background everywhere costs little mIoU-wise
    on the background, but finds none of the wire's boundary."""
    truth = torch.zeros(1, 32, 32, dtype=torch.long)
    truth[0, 16, :] = 1
    missed = ValCounts.zeros(2)
    missed.add(torch.zeros_like(truth), truth)
    scores = missed.scores(["background", "wire"])
    assert scores["per_class_iou"]["background"] > 0.96 and scores["per_class_boundary_f1"]["wire"] == 0.0
    found = ValCounts.zeros(2)
    found.add(truth.clone(), truth)
    assert found.scores(["background", "wire"])["boundary_f1"] == 1.0


def test_ignored_pixels_add_no_boundary():
    truth = _square(10, 3, 3, 4)
    pred = truth.clone()
    pred[0, 1:4, 8] = 1  # a predicted stub in columns the truth then ignores
    assert boundary_counts(pred, truth, 2, tolerance=0)[1, 1] == 12 + 3
    truth[0, :, 8:] = IGNORE_INDEX
    counts = boundary_counts(pred, truth, 2, tolerance=0)
    assert counts[1].tolist() == [12, 12, 12, 12]  # the stub is in ignored pixels: not scored
    assert counts[0, 0] == counts[0, 1] == counts[0, 2] == counts[0, 3] == 20 + 4  # + the ignored band's edge, on both sides


def test_a_prediction_equal_to_the_truth_outside_an_ignore_band_scores_one():
    """VOC-style: a 2 px ignored band around the object, predicted as either class: what is
    predicted in ignored pixels is not scored, as in mIoU."""
    truth = _square(16, 5, 5, 6)
    band = _square(16, 3, 3, 10).bool() & ~_square(16, 5, 5, 6).bool()
    truth[band] = IGNORE_INDEX
    for inside in (0, 1):
        pred = _square(16, 5, 5, 6)
        pred[band] = inside
        scores = boundary_scores(boundary_counts(pred, truth, 2).numpy(), ["bg", "fg"])
        assert scores["boundary_f1"] == 1.0, inside
