import math

import torch

from pipeline.data.shards import IGNORE_INDEX
from pipeline.losses import (
    contrast_points,
    denoising_loss,
    pixel_contrastive_loss,
    segmentation_ce,
    self_correction_loss,
    step_targets,
    weighted_ce,
)


def test_ce_ignores_ignore_pixels():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 0, 0, 0] = 10.0  # confident class 0 on the first pixel
    target = torch.tensor([[[0, IGNORE_INDEX]]])
    expected = -torch.log_softmax(torch.tensor([10.0, 0.0]), 0)[0]
    torch.testing.assert_close(segmentation_ce(logits, target), expected)


def test_ce_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_ce(logits, torch.full((1, 2, 2), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()


def test_uniform_logits_give_log_k():
    assert math.isclose(segmentation_ce(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long)).item(),
                        math.log(4), rel_tol=1e-6)


def test_denoising_loss_is_mean_squared_error():
    assert denoising_loss(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)).item() == 1.0


def test_info_nce_matches_a_hand_computed_value():
    from pipeline.losses import info_nce

    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    logits = torch.tensor([0.6, 0.0, -1.0]) / tau  # q·k⁺, q·n₁, q·n₂
    expected = -torch.log_softmax(logits, 0)[0]
    torch.testing.assert_close(info_nce(q, k, negatives, tau), expected)


def _probability_logits(*pixels: tuple[float, ...]) -> torch.Tensor:
    """1×K×1×P logits whose softmax is exactly the given per-pixel probabilities."""
    return torch.tensor(pixels).log().t().reshape(1, len(pixels[0]), 1, len(pixels))


# Two pixels, both labelled 0: A with p = (0.6, 0.4), B with p = (0.1, 0.9).
# A: w = 0.6, CE = -ln 0.6 = 0.510826, RCE = -0.4·ln 1e-4 = 3.684136
# B: w = 0.9 > 0.8 -> 1, CE = -ln 0.1 = 2.302585, RCE = -0.9·ln 1e-4 = 8.289306
SC_LOGITS = _probability_logits((0.6, 0.4), (0.1, 0.9))
SC_TARGET = torch.tensor([[[0, 0]]])


def test_self_correction_loss_against_hand_computed_values():
    a = 0.4 * 0.510826 + 0.6 * 3.684136
    b = 0.0 * 2.302585 + 1.0 * 8.289306
    assert math.isclose(self_correction_loss(SC_LOGITS, SC_TARGET).item(), (a + b) / 2, rel_tol=1e-5)


def test_self_correction_alpha_beta_and_the_confidence_clamp_are_parameters():
    a = 2 * 0.4 * 0.510826 + 0.5 * 0.6 * 3.684136
    b = 0.5 * 8.289306
    assert math.isclose(self_correction_loss(SC_LOGITS, SC_TARGET, alpha=2.0, beta=0.5).item(), (a + b) / 2,
                        rel_tol=1e-5)
    unclamped_b = 0.1 * 2.302585 + 0.9 * 8.289306
    assert math.isclose(self_correction_loss(SC_LOGITS, SC_TARGET, confident_above=None).item(),
                        (0.4 * 0.510826 + 0.6 * 3.684136 + unclamped_b) / 2, rel_tol=1e-5)


def test_self_correction_ignores_255_and_weights_pixels():
    logits = torch.cat([SC_LOGITS, _probability_logits((0.5, 0.5))], dim=3)
    target = torch.tensor([[[0, 0, IGNORE_INDEX]]])
    torch.testing.assert_close(self_correction_loss(logits, target), self_correction_loss(SC_LOGITS, SC_TARGET))
    weighted = self_correction_loss(SC_LOGITS, SC_TARGET, pixel_weight=torch.tensor([[[0.5, 1.0]]]))
    assert math.isclose(weighted.item(), (0.5 * (0.4 * 0.510826 + 0.6 * 3.684136) + 8.289306) / 2, rel_tol=1e-5)


def test_self_correction_confidence_carries_no_gradient():
    # With w detached, d/dz of (1-w)·CE at a pixel whose p_y = w is (1-w)·(p - onehot).
    logits = _probability_logits((0.6, 0.4)).requires_grad_(True)
    self_correction_loss(logits, torch.tensor([[[0]]]), alpha=1.0, beta=0.0).backward()
    torch.testing.assert_close(logits.grad.flatten(), 0.4 * torch.tensor([0.6 - 1.0, 0.4]))


def test_weighted_ce_is_plain_ce_without_weights_and_scales_with_them():
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    torch.testing.assert_close(weighted_ce(logits, target), segmentation_ce(logits, target))
    torch.testing.assert_close(weighted_ce(logits, target, torch.full((2, 4, 4), 0.5)),
                               0.5 * segmentation_ce(logits, target))


def test_pixel_contrast_against_hand_computed_value():
    # z1 = z2 = (1, 0) of class 0, z3 = (0, 1) of class 1, τ = 1: for z1 (and z2) the positive
    # has logit 1 among {1, 0}: -(1 - ln(e + 1)) = 0.313262; z3 has no positive and is skipped.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = pixel_contrastive_loss(z, torch.tensor([0, 0, 1]), temperature=1.0)
    assert math.isclose(loss.item(), 0.313262, rel_tol=1e-5)
    assert pixel_contrastive_loss(z[2:], torch.tensor([1]), 1.0).item() == 0.0  # no positive at all
    assert pixel_contrastive_loss(z[:0], torch.tensor([], dtype=torch.long), 1.0).item() == 0.0


def test_contrast_points_sample_each_class_up_to_the_cap_and_never_an_ignored_pixel():
    labels = torch.randint(0, 3, (2, 6, 6))
    labels[0] = IGNORE_INDEX
    labels[1, 0, :2] = 3  # a class with two pixels: both taken, under the cap
    pixels = contrast_points(labels, 4, torch.Generator().manual_seed(0))
    picked = labels.reshape(-1)[pixels]
    assert len(set(pixels.tolist())) == len(pixels)
    assert (picked != IGNORE_INDEX).all()
    assert {c: int((picked == c).sum()) for c in range(4)} == {0: 4, 1: 4, 2: 4, 3: 2}
    assert len(contrast_points(torch.full((2, 6, 6), IGNORE_INDEX), 4)) == 0


def test_a_steps_targets_distil_the_old_classes_and_take_background_where_a_new_class_is():
    old = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.1, 0.7]]).reshape(1, 2, 1, 3)  # background, cat; 3 pixels
    new = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3)
    pasted = torch.tensor([[[0, 0, 1]]])  # a pasted cat on the third pixel
    targets = step_targets(old, new, pasted, 3)
    torch.testing.assert_close(targets[0, :, 0, :2], torch.tensor([[0.9, 0.4], [0.2, 0.1], [0.0, 0.5]]))
    assert targets[0, :, 0, 2].tolist() == [0.0, 1.0, 0.0]  # the pasted object is its class alone
    floor = step_targets(None, new, torch.zeros_like(pasted), 3)  # no distillation: old classes forgotten
    assert floor[0, :, 0].tolist() == [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 1.0]]
