import math

import torch

from pipeline.data import IGNORE_INDEX
from pipeline.losses import denoising_loss, segmentation_ce


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
