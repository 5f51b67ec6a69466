"""Losses as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data import IGNORE_INDEX


def segmentation_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy; pixels labelled `IGNORE_INDEX` do not count.

    Returns 0 (with a gradient path) when every pixel is ignored, rather than NaN.
    """
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)


def denoising_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖f(x̃) − target‖², the mean over pixels and channels."""
    return F.mse_loss(predicted, target)


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """InfoNCE with one positive per query: −log softmax of q·k⁺/τ among [q·k⁺, q·n₁, …]/τ.

    Args:
        query, positive: N×D, L2-normalised.
        negatives: K×D, L2-normalised, shared by every query.
    """
    positive_logit = (query * positive).sum(dim=1, keepdim=True)
    logits = torch.cat([positive_logit, query @ negatives.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))
