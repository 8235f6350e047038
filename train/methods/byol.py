"""BYOL: an online predictor regresses the momentum encoder's projection of the other view."""
from __future__ import annotations

import torch

from train.backbones import mlp_head
from train.distributed import cosine_momentum, momentum_update
from train.losses import byol_loss
from train.methods import Method, MethodConfig, frozen_copy, register


@register("byol")
class BYOL(Method):
    # BYOL heads: Linear-BN-ReLU-Linear projector (4096 -> 256) and predictor; momentum 0.99 -> 1.0 (cosine)
    defaults = {
        "lam": 1.0, "proj_hidden": 4096, "proj_dim": 256, "proj_bn": True, "pred_hidden": 4096,
        "momentum_base": 0.99, "momentum_final": 1.0,
    }

    def __init__(self, backbone, feat_dim: int, cfg: MethodConfig):
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp_head(feat_dim, cfg.proj_hidden, cfg.proj_dim, cfg.proj_bn)
        self.predictor = mlp_head(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, batch_norm=True)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))  # (B, p)

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))  # (B, p)

    def base_loss(self, v1, v2, ids):
        z1, z2 = self.project(v1), self.project(v2)  # (B, p)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, p)
        t1, t2 = self.targets(v1), self.targets(v2)  # (B, p), no gradient
        return byol_loss(p1, t2) + byol_loss(p2, t1), z1

    def after_step(self, progress: float) -> None:
        m = cosine_momentum(self.cfg.momentum_base, self.cfg.momentum_final, progress)
        momentum_update(self.backbone, self.target_backbone, m)
        momentum_update(self.projector, self.target_projector, m)
