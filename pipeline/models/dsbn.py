"""Distribution-specific BatchNorm (DSBN), as Simple Baseline uses it for the student.

Every BatchNorm gets a twin that normalises the strongly augmented samples, so their
statistics do not pollute those of clean images. One forward pass carries both kinds: the
first `n` samples of the batch go through the main BN, the rest through the auxiliary one
(one pass keeps DistributedDataParallel's one-forward-one-backward contract). Evaluation
and the exported weights use the main BN only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MAIN, AUXILIARY = "main", "auxiliary"


class DualBatchNorm2d(nn.Module):
    """A BatchNorm2d and its twin for strongly augmented samples, both starting from the
    same (pretrained) weights and statistics."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.main = bn
        self.auxiliary = copy.deepcopy(bn)
        self.main_count: int | None = None  # None: every sample is a main sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.main_count is None:
            return self.main(x)
        # split, not two slices: the backward then joins the two halves' gradients once,
        # where each slice's backward would fill a whole-batch tensor of zeros.
        main, auxiliary = x.split([self.main_count, len(x) - self.main_count])
        return torch.cat([self.main(main), self.auxiliary(auxiliary)])


def add_auxiliary_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm2d of `model` a twin, in place; returns `model`."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, DualBatchNorm2d(child))
        else:
            add_auxiliary_bn(child)
    return model


@contextmanager
def main_samples_first(model: nn.Module, count: int) -> Iterator[None]:
    """Within the block, the first `count` samples of each batch use the main BNs and the
    rest the auxiliary ones."""
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    for dual in duals:
        dual.main_count = count
    try:
        yield
    finally:
        for dual in duals:
            dual.main_count = None


def main_bn_state(state: dict) -> dict:
    """A DSBN network's state dict as the plain network's: main BNs under their original
    names, auxiliary ones dropped. A state without DSBN passes through unchanged."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        owner, _, slot = head.rpartition(".")
        if slot == AUXILIARY:
            continue
        out[f"{owner}.{leaf}" if slot == MAIN else key] = value
    return out
