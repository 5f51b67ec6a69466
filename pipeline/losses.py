"""Losses as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.shards import IGNORE_INDEX


def segmentation_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy; pixels labelled `IGNORE_INDEX` do not count.

    Returns 0 (with a gradient path) when every pixel is ignored, rather than NaN. The sum over
    the counted pixels divided by their count equals the mean reduction bit for bit, and, unlike
    a test for "any pixel counted", reads nothing back from a GPU, so the step never waits on it.
    """
    total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


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


RCE_LABEL_FLOOR = 1e-4  # log(0) of a one-hot label is clamped here, as Simple Baseline does


def self_correction_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, beta: float = 1.0,
                         confident_above: float | None = 0.8,
                         pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Simple Baseline's loss on pseudo-labels, the mean over labelled pixels of

        α·(1 − w)·CE(p, ŷ) + β·w·RCE(p, ŷ),   RCE(p, ŷ) = −Σ_c p_c·log clamp(onehot(ŷ)_c, 1e-4, 1)

    with p the softmax and w = max_c p_c (no gradient; 1 above `confident_above`, as the
    released code does). CE trusts the pseudo-label where the student is unsure; reverse CE
    trusts the student where it is confident. `pixel_weight` (N×H×W) scales each pixel's loss,
    e.g. by the teacher's confidence.
    """
    keep = target != IGNORE_INDEX
    if not keep.any():
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    onehot = F.one_hot(torch.where(keep, target, 0).long(), logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    ce = -(onehot * log_p).sum(1)
    rce = -(p * onehot.clamp(RCE_LABEL_FLOOR, 1.0).log()).sum(1)
    w = p.detach().amax(1)
    if confident_above is not None:
        w = torch.where(w > confident_above, torch.ones_like(w), w)
    per_pixel = alpha * (1 - w) * ce + beta * w * rce
    if pixel_weight is not None:
        per_pixel = per_pixel * pixel_weight
    return per_pixel[keep].mean()


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with a weight per pixel (N×H×W), the mean over labelled pixels."""
    if pixel_weight is None:
        return segmentation_ce(logits, target)
    keep = target != IGNORE_INDEX
    if not keep.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, torch.where(keep, target, 0).long(), reduction="none")
    return (ce * pixel_weight)[keep].mean()


def contrast_points(labels: torch.Tensor, points_per_class: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Where the dense contrast looks: up to `points_per_class` pixels of each class present in
    `labels` (N×H×W), drawn at random, as flat indices into N·H·W; ignored pixels never. Drawn
    before the forward pass, so that only these pixels are projected and normalised."""
    y = labels.reshape(-1)
    chosen = []
    for cls in y[y != IGNORE_INDEX].unique():
        where = (y == cls).nonzero().squeeze(1)
        pick = torch.randperm(len(where), generator=generator)[:points_per_class]
        chosen.append(where[pick.to(where.device)])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=labels.device)


def pixel_contrastive_loss(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Dense contrast with class positives (FMWISS) over sampled pixels (`contrast_points`):
    for each pixel i

        −1/|P(i)| Σ_{j∈P(i)} log( exp(z_i·z_j/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )

    over the other samples a, P(i) those of i's class. `z` M×D, L2-normalised along D; `y` the
    M pixels' classes. Pixels with no positive are skipped; with none left the loss is 0."""
    if len(y) == 0:
        return z.sum() * 0.0
    logits = z @ z.t() / temperature
    self_mask = torch.eye(len(y), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    has_positive = positive.any(1)
    if not has_positive.any():
        return z.sum() * 0.0
    mean_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / positive.sum(1).clamp(min=1)
    return -mean_log_prob[has_positive].mean()


def step_targets(old_scores: torch.Tensor | None, new_targets: torch.Tensor, pasted: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """An incremental step's per-class BCE targets (N×K×H×W, the old classes first, background
    at 0): the new classes' `new_targets` (N×K_new×H×W in [0, 1]); the old classes' the model
    before the step's sigmoid scores `old_scores` (distillation), background's lowered where a
    new class is (1 − the highest new target), for the model before the step saw background there.
    With no `old_scores` (the forgetting floor), background wherever no new class is and every
    other old class 0. A pixel of a pasted old-class object (`pasted`: its class, 0 elsewhere)
    is that class alone."""
    new_count = new_targets.shape[1]
    not_new = 1 - new_targets.amax(dim=1, keepdim=True)
    if old_scores is None:
        old = torch.zeros(len(new_targets), num_classes - new_count, *new_targets.shape[2:],
                          device=new_targets.device)
        old[:, :1] = not_new
    else:
        old = torch.cat([old_scores[:, :1] * not_new, old_scores[:, 1:]], dim=1)
    targets = torch.cat([old, new_targets], dim=1)
    where = pasted[:, None] > 0
    return torch.where(where, F.one_hot(pasted.long(), num_classes).permute(0, 3, 1, 2).float(), targets)
