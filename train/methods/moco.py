"""MoCo v2+: symmetric InfoNCE of online queries against momentum keys and a queue of past keys."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clsp.train.distributed import FeatureQueue
from clsp.train.losses import moco_infonce
from clsp.train.methods import InfoNCEConfig, MomentumConfig, MomentumMethod, QueueConfig, register


@dataclass(frozen=True)
class MoCoConfig(InfoNCEConfig, QueueConfig, MomentumConfig):
    # method.md: queue 32768 (negatives: keys of past batches), momentum 0.99 -> 0.999 (cosine), tau 0.2, lam 0.5
    # (CIFAR-10; 0.2 CIFAR-100)
    lam: float = 0.5
    queue_size: int = 32768


@register("moco")
class MoCoV2Plus(MomentumMethod):
    """Symmetric: each view's query against the other view's key."""

    config = MoCoConfig

    def __init__(self, backbone, feat_dim: int, cfg: MoCoConfig):
        super().__init__(backbone, feat_dim, cfg)
        self.add_targets()
        self.queue = FeatureQueue(cfg.queue_size, cfg.proj_dim)  # normalised keys of past batches, both views

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.target_project(x), dim=1)  # (B, p)

    def base_loss(self, v1, v2, ids):
        q1, q2 = self.project(v1), self.project(v2)  # (B, p) online queries
        k1, k2 = self.keys(v1), self.keys(v2)  # (B, p) momentum keys
        negatives = self.queue.get()  # (Q', p), Q' <= queue_size while the queue fills
        t = self.cfg.temperature
        loss = (moco_infonce(q1, k2, negatives, t) + moco_infonce(q2, k1, negatives, t)) / 2
        if self.training:  # evaluation forwards leave the queue alone
            self.queue.enqueue(torch.cat([k1, k2]))
        return loss, q1
