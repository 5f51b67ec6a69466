"""Pseudo masks from image tags: FMWISS's two sources and their fusion, with the local
substitutes this machine can run (no CLIP or DINO weights here).

- **Initial mask (category-aware)**: FMWISS scores each pixel against CLIP's text embedding of
  each tagged class. Here a `TagClassifier` (a 1×1 convolution over an encoder's CNN map,
  global average pooled, trained with BCE on the tags) gives each class its activation map
  (CAM); each pixel takes the tagged class whose map is highest there, or the background where
  no map reaches `background` (maps scaled to a maximum of 1 per image and class).
- **Seeds guidance (category-agnostic)**: FMWISS samples seed points inside each class's initial
  mask and averages a self-supervised ViT's last-block attention from them. Here the attention is
  the cosine affinity of a self-supervised network's dense features between the seeds and every
  pixel, averaged over the seeds and thresholded: it grows a class's mask over the whole of the
  object the seeds fell on, where a CAM lights only its most telling part.
- **Fusion**: the union of the two, per class (FMWISS found it beat their intersection and
  either alone). Classes are not exclusive here: the masks train a plug-in teacher with
  pixel-wise BCE, one binary map per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.transunet import HybridEncoder


class TagClassifier(nn.Module):
    """Multi-label classification over an encoder's CNN: a 1×1 convolution scores every position
    of the CNN's last map (what the transformer reads) for every class, the class activation
    maps, and their mean is the image's score. Not over the transformer's tokens: attention
    mixes the whole image into each token, and trained so on images that show a square
    somewhere, their maps came out higher around the square than on it, where the CNN's were
    higher on it (the test in tests/test_recipes.py trains this one)."""

    def __init__(self, encoder: HybridEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.scores = nn.Conv2d(encoder.vit.patch_embed.feature_dim, num_classes, 1)
        # The transformer gets no gradient here; frozen, it is not waited for by DDP's all-reduce.
        cnn = {id(p) for p in encoder.vit.patch_embed.backbone.parameters()}
        for param in encoder.parameters():
            param.requires_grad_(id(param) in cnn)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logits N×K, class activation maps N×K×h×w at the CNN's last stride)."""
        maps = self.scores(self.encoder.cnn_features(x)[-1])
        return maps.mean(dim=(2, 3)), maps


def activation_maps(maps: torch.Tensor, tags: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The tagged classes' activation maps at `size`, each scaled to [0, 1] (negative scores cut,
    divided by its maximum); zero for a class the image is not tagged with. `tags`: N×K bool."""
    maps = F.interpolate(maps.float().relu(), size=size, mode="bilinear", align_corners=False)
    peak = maps.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return maps / peak * tags[:, :, None, None]


def initial_masks(cams: torch.Tensor, background: float) -> torch.Tensor:
    """Each pixel's class from the scaled maps (N×K×H×W): 1 + the index of the highest map, or 0
    (background) where none reaches `background`. uint8 N×H×W."""
    best, index = cams.max(dim=1)
    return torch.where(best >= background, index + 1, 0).to(torch.uint8)


def draw_seeds(initial: torch.Tensor, num_classes: int, seeds: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`seeds` pixels drawn at random, with replacement, inside each class's initial mask (uint8
    N×H×W, class k + 1): their flat indices, N×K×seeds, and whether the class has a pixel, bool
    N×K (a class with none draws its seeds anywhere, for the caller to ignore)."""
    inside = F.one_hot(initial.long().flatten(1), num_classes + 1)[..., 1:].transpose(1, 2)  # N×K×HW
    present = inside.any(dim=2)
    weights = (inside | ~present[..., None]).float().flatten(0, 1)  # multinomial needs some weight
    chosen = torch.multinomial(weights, seeds, replacement=True, generator=generator)
    return chosen.view(len(initial), num_classes, seeds), present


def seeds_guidance(features: torch.Tensor, initial: torch.Tensor, num_classes: int, seeds: int,
                   threshold: float, generator: torch.Generator) -> torch.Tensor:
    """Per class, the pixels whose features (N×D×h×w, upsampled to the masks' size) are like
    those at `seeds` points drawn at random inside the class's initial mask: their mean cosine
    similarity above `threshold`. bool N×K×H×W; all False for a class with no initial pixel."""
    size = initial.shape[-2:]
    dense = features.float()
    if dense.shape[-2:] != size:
        dense = F.interpolate(dense, size=size, mode="bilinear", align_corners=False)
    dense = dense.flatten(2)  # N×D×HW
    # Norms by a contraction: five times faster than a norm over dim 1 of an N×D×HW map, the
    # largest cost here at 512 px.
    norms = torch.einsum("ndp,ndp->np", dense, dense).sqrt().clamp(min=1e-12)
    chosen, present = draw_seeds(initial, num_classes, seeds, generator)
    chosen = chosen.flatten(1)
    seed_features = dense.gather(2, chosen[:, None].expand(-1, dense.shape[1], -1)) / norms.gather(1, chosen)[:, None]
    # The mean of the seeds' cosine similarities is the similarity to their mean unit feature.
    mean_seed = seed_features.view(*dense.shape[:2], num_classes, seeds).mean(dim=3)
    affinity = torch.einsum("ndk,ndp->nkp", mean_seed, dense) / norms[:, None]
    return ((affinity > threshold) & present[..., None]).view(len(initial), num_classes, *size)


def fuse(initial: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """The union of the initial mask and the seeds' guidance, per class: bool N×K×H×W."""
    num_classes = guided.shape[1]
    own = F.one_hot(initial.long(), num_classes + 1)[..., 1:].permute(0, 3, 1, 2).bool()
    return own | guided
