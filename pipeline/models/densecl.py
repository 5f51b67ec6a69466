"""DenseCL (Wang et al., CVPR 2021): self-supervised encoder pretraining on unlabeled images.

Two augmented views of each image. The query branch (encoder + heads) is trained; the key
branch is its momentum copy. A global head (pool -> MLP) gives MoCo's image-level InfoNCE;
a dense head (1x1 convs on the stride-16 map) gives a per-location InfoNCE whose positive
for each query location is the key location with the most similar *backbone* feature.
Negatives come from queues of past keys (pooled dense keys for the dense loss, as DenseCL).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.params import DenseCLConfig
from pipeline.losses import info_nce
from pipeline.models.transunet import EncoderSpec, HybridEncoder


class DenseCLHeads(nn.Module):
    def __init__(self, width: int, projection_dim: int):
        super().__init__()
        self.global_mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True),
                                        nn.Linear(width, projection_dim))
        self.dense_mlp = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(width, projection_dim, 1))

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised global embedding N×D and dense embeddings N×D×L."""
        global_z = F.normalize(self.global_mlp(feature_map.mean(dim=(2, 3))), dim=1)
        dense_z = F.normalize(self.dense_mlp(feature_map).flatten(2), dim=1)
        return global_z, dense_z


class DenseCL(nn.Module):
    """Query encoder + heads, their momentum copies, and the two negative queues."""

    def __init__(self, spec: EncoderSpec, cfg: DenseCLConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = HybridEncoder(spec)
        self.heads = DenseCLHeads(spec.embed_dim, cfg.projection_dim)
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.key_heads = copy.deepcopy(self.heads).requires_grad_(False)
        for name in ("global_queue", "dense_queue"):
            self.register_buffer(name, F.normalize(torch.randn(cfg.queue_size, cfg.projection_dim), dim=1))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        pairs = zip([*self.encoder.parameters(), *self.heads.parameters()],
                    [*self.key_encoder.parameters(), *self.key_heads.parameters()])
        for query, key in pairs:
            key.mul_(self.cfg.momentum).add_(query.detach(), alpha=1 - self.cfg.momentum)

    @torch.no_grad()
    def _enqueue(self, global_keys: torch.Tensor, dense_keys: torch.Tensor) -> None:
        n, size = len(global_keys), self.cfg.queue_size
        slots = (self.queue_position + torch.arange(n, device=global_keys.device)) % size
        self.global_queue[slots] = global_keys
        self.dense_queue[slots] = F.normalize(dense_keys.mean(dim=2), dim=1)
        self.queue_position.copy_((self.queue_position + n) % size)

    def forward(self, query_view: torch.Tensor, key_view: torch.Tensor) -> dict:
        """Losses for one batch of view pairs: {"loss", "global_loss", "dense_loss"}."""
        query_map = self.encoder(query_view)[-1]
        query_global, query_dense = self.heads(query_map)
        with torch.no_grad():
            self._momentum_update()  # MoCo's order: keys come from the freshly updated copy
            key_map = self.key_encoder(key_view)[-1]
            key_global, key_dense = self.key_heads(key_map)
            matched = dense_correspondence(query_map, key_map)
            positives = torch.gather(key_dense, 2, matched.unsqueeze(1).expand(-1, key_dense.shape[1], -1))
        # Snapshots: the queues are updated in place below, before the backward pass needs them.
        global_negatives, dense_negatives = self.global_queue.clone(), self.dense_queue.clone()
        global_loss = info_nce(query_global, key_global, global_negatives, self.cfg.temperature)
        dim = query_dense.shape[1]
        dense_loss = info_nce(query_dense.transpose(1, 2).reshape(-1, dim), positives.transpose(1, 2).reshape(-1, dim),
                              dense_negatives, self.cfg.temperature)
        self._enqueue(key_global, key_dense)
        w = self.cfg.dense_weight
        return {"loss": (1 - w) * global_loss + w * dense_loss, "global_loss": global_loss, "dense_loss": dense_loss}


def dense_correspondence(query_map: torch.Tensor, key_map: torch.Tensor) -> torch.Tensor:
    """For each query location, the index of the key location whose backbone feature is most
    cosine-similar: N×L (locations flattened row-major)."""
    query = F.normalize(query_map.flatten(2), dim=1)
    key = F.normalize(key_map.flatten(2), dim=1)
    return torch.einsum("ncq,nck->nqk", query, key).argmax(dim=2)
