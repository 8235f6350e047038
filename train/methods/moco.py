"""MoCo v2+: symmetric InfoNCE of online queries against momentum keys and a queue of past keys per view.

Each view has its own queue, as in solo-learn's MoCo v2+: query q1 is scored against key k2 and the past k2s, q2
against k1 and the past k1s. One shared queue would hold each past image twice (two near-identical keys), so half as
many images. The queues start empty and fill over the first queue_size / global batch steps (solo-learn starts them
from random unit vectors instead)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clsp.train.distributed import FeatureQueue
from clsp.train.losses import moco_infonce
from clsp.train.methods import InfoNCEConfig, MomentumConfig, MomentumMethod, QueueConfig, register


@dataclass(frozen=True)
class MoCoConfig(InfoNCEConfig, QueueConfig, MomentumConfig):
    # the paper: queue 32768 (negatives: keys of past batches), momentum 0.99 -> 0.999 (cosine), tau 0.2, lam 0.5
    # (CIFAR-10; 0.2 CIFAR-100)
    lam: float = 0.5
    queue_size: int = 32768


@register("moco")
class MoCoV2Plus(MomentumMethod):
    """Symmetric: each view's query against the other view's key."""

    config = MoCoConfig
    state_layout = 2  # 1: one queue for both views' keys (clsp <= 0.3.0)

    def __init__(self, backbone, feat_dim: int, cfg: MoCoConfig):
        super().__init__(backbone, feat_dim, cfg)
        self.add_targets()
        # normalised keys of past batches: queues[0] of view 1 (k1), queues[1] of view 2 (k2)
        self.queues = nn.ModuleList(FeatureQueue(cfg.queue_size, cfg.proj_dim) for _ in range(2))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.target_project(x), dim=1)  # (B, p)

    def base_loss(self, v1, v2, ids):
        q1, q2 = self.project(v1), self.project(v2)  # (B, p) online queries
        k1, k2 = self.keys(v1), self.keys(v2)  # (B, p) momentum keys
        past_k1, past_k2 = (queue.get() for queue in self.queues)  # (Q', p) each, Q' <= queue_size while filling
        t = self.cfg.temperature
        loss = (moco_infonce(q1, k2, past_k2, t) + moco_infonce(q2, k1, past_k1, t)) / 2
        if self.training:  # evaluation forwards leave the queues alone
            self.queues[0].enqueue(k1)
            self.queues[1].enqueue(k2)
        return loss, q1
