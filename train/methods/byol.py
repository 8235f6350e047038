"""BYOL: an online predictor regresses the momentum encoder's projection of the other view."""
from __future__ import annotations

from dataclasses import dataclass

from clsp.train.losses import byol_loss
from clsp.train.methods import MomentumConfig, MomentumMethod, PredictorConfig, register


@dataclass(frozen=True)
class BYOLConfig(PredictorConfig, MomentumConfig):
    # BYOL heads: Linear-BN-ReLU-Linear projector (4096 -> 256) and predictor (4096); momentum 0.99 -> 1.0 (cosine)
    proj_bn: bool = True
    momentum_final: float = 1.0


@register("byol")
class BYOL(MomentumMethod):
    """No negatives: the loss is the normalised regression of each view's prediction onto the other's target."""

    config = BYOLConfig

    def __init__(self, backbone, feat_dim: int, cfg: BYOLConfig):
        super().__init__(backbone, feat_dim, cfg)
        self.add_predictor()
        self.add_targets()

    def base_loss(self, v1, v2, ids):
        z1, z2 = self.project(v1), self.project(v2)  # (B, p)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, p)
        t1, t2 = self.target_project(v1), self.target_project(v2)  # (B, p), no gradient
        return byol_loss(p1, t2) + byol_loss(p2, t1), z1
