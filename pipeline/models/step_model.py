"""An incremental step's model (FMWISS): the model before the step given a channel per new class,
and, while it trains, a plug-in teacher that learns the new classes from the step's pseudo masks
and hands the model cleaner targets than the masks themselves. Only the segmenter (`net`) is
kept: the plug-in teacher is dropped when the step is saved."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.transunet import HybridEncoder, SegmentationNet, pixel_vectors


def add_classes(net: SegmentationNet, count: int) -> SegmentationNet:
    """`net` with `count` more output channels after its own, each starting as background's
    (channel 0), background's and their biases lowered by log(count + 1) (MiB's initialisation):
    at first the model splits what it called background evenly between background and the new
    classes, and scores every old class as before. Changes `net` in place and returns it."""
    old = net.head
    head = nn.Conv2d(old.in_channels, old.out_channels + count, old.kernel_size, padding=old.padding)
    with torch.no_grad():
        head.weight.copy_(torch.cat([old.weight, old.weight[:1].expand(count, -1, -1, -1)]))
        shift = math.log(count + 1)
        head.bias.copy_(torch.cat([old.bias[:1] - shift, old.bias[1:], (old.bias[:1] - shift).expand(count)]))
    net.head = head.to(old.weight.device, old.weight.dtype)
    return net


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): a 1×1 convolution, 3×3 ones at each dilation
    rate and the image's mean, side by side, fused by a 1×1 convolution."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...] = (6, 12)):
        super().__init__()

        def branch(kernel: int, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_channels, channels, kernel, padding=dilation * (kernel // 2),
                                           dilation=dilation, bias=False),
                                 nn.GroupNorm(8, channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([branch(1), *(branch(3, rate) for rate in rates)])
        self.image_pool = branch(1)
        self.fuse = nn.Sequential(nn.Conv2d(channels * (len(rates) + 2), channels, 1, bias=False),
                                  nn.GroupNorm(8, channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return self.fuse(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))


class PluginTeacher(nn.Module):
    """FMWISS's plug-in teacher: an ASPP head on the segmenter's decoder features that scores
    each new class per pixel (logits, for BCE) and, with `embeddings`, gives L2-normalised
    embeddings of chosen pixels for the dense contrastive loss (without, no projection: every
    weight of a model DDP trains must get a gradient)."""

    def __init__(self, in_channels: int, new_classes: int, channels: int, embeddings: bool):
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.scores = nn.Conv2d(channels, new_classes, 1)
        self.projection = nn.Linear(channels, channels) if embeddings else None

    def forward(self, features: torch.Tensor,
                pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(new-class logits, embeddings M×D of the flat pixel indices `pixels`, or None without them)."""
        hidden = self.aspp(features)
        if self.projection is None or pixels is None:
            return self.scores(hidden), None
        return self.scores(hidden), F.normalize(self.projection(pixel_vectors(hidden, pixels)), dim=1)


class StepModel(nn.Module):
    """The segmenter a step trains (`net`, its new channels added) and, where the step uses one,
    its plug-in teacher on the same decoder features (with pixel embeddings: `embeddings`)."""

    def __init__(self, net: SegmentationNet, new_classes: int, plugin_channels: int | None, embeddings: bool = False):
        super().__init__()
        self.net = net
        self.plugin = (PluginTeacher(net.decoder.out_channels, new_classes, plugin_channels, embeddings)
                       if plugin_channels else None)

    @property
    def encoder(self) -> HybridEncoder:
        return self.net.encoder

    def forward(self, x: torch.Tensor,
                pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the segmenter's logits, the plug-in teacher's new-class logits or None, its embeddings
        of the flat pixel indices `pixels` or None)."""
        features = self.net.decoder(self.net.encoder(x))
        logits = self.net.head(features)
        if self.plugin is None:
            return logits, None, None
        return logits, *self.plugin(features, pixels)
