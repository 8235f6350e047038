"""MoCo v2+: symmetric InfoNCE of online queries against momentum keys and a queue of past keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clsp.train.backbones import mlp_head
from clsp.train.distributed import FeatureQueue
from clsp.train.losses import moco_infonce
from clsp.train.methods import MethodConfig, MomentumMethod, register


@register("moco")
class MoCoV2Plus(MomentumMethod):
    # method.md: queue 32768, momentum 0.99 -> 0.999 (cosine), symmetric, tau 0.2, lam 0.5 (CIFAR-10; 0.2 CIFAR-100)
    defaults = {
        "lam": 0.5, "temperature": 0.2, "proj_hidden": 4096, "proj_dim": 256, "proj_bn": False,
        "queue_size": 32768, "momentum_base": 0.99, "momentum_final": 0.999,
    }

    def __init__(self, backbone, feat_dim: int, cfg: MethodConfig):
        super().__init__(backbone, feat_dim, cfg)
        if cfg.queue_size < 1:
            raise ValueError("moco needs queue_size >= 1 (default 32768): use MethodConfig.for_method('moco', ...)")
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
