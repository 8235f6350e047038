"""NNCLR: the nearest neighbour of z1 in a support set of past projections is the positive of view 2's prediction."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clsp.train.distributed import FeatureQueue, concat_all_gather, gather_with_grad, world_info
from clsp.train.losses import nnclr_loss, without_autocast
from clsp.train.methods import InfoNCEConfig, Method, PredictorConfig, QueueConfig, register


@dataclass(frozen=True)
class NNCLRConfig(InfoNCEConfig, QueueConfig, PredictorConfig):
    # NNCLR (CIFAR settings): tau 0.2, support set 65536 (z1 of past batches), BN heads (projector 4096 -> 256,
    # predictor 4096): the groups' defaults but for the projector's BN
    proj_bn: bool = True


@register("nnclr")
class NNCLR(Method):
    """The positive of view 2's prediction is z1's nearest neighbour among past projections."""

    config = NNCLRConfig

    def __init__(self, backbone, feat_dim: int, cfg: NNCLRConfig):
        super().__init__(backbone, feat_dim, cfg)
        self.add_predictor()
        self.support = FeatureQueue(cfg.queue_size, cfg.proj_dim)  # normalised z1 of past batches

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, p) normalised -> (B, p) nearest support row by cosine; z itself while the support set is empty."""
        support = self.support.get()  # (S, p)
        if len(support) == 0:
            return z
        with without_autocast():  # fp32 cosines: in bf16 (a GPU's autocast) neighbours within 2^-8 tie, the first wins
            return support[(z.float() @ support.T).argmax(dim=1)]

    def base_loss(self, v1, v2, ids):
        z1, z2 = self.project(v1), self.project(v2)  # (B, p)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, p)
        z1n, z2n = F.normalize(z1.detach(), dim=1), F.normalize(z2.detach(), dim=1)
        nn1, nn2 = self.nearest(z1n), self.nearest(z2n)  # (B, p)
        rank, _ = world_info()
        first = rank * len(v1)  # our rows in the gathered predictions
        p1_all, p2_all = gather_with_grad(p1), gather_with_grad(p2)  # (world * B, p)
        ids_all = concat_all_gather(ids)  # (world * B,)
        t = self.cfg.temperature
        loss = (nnclr_loss(nn1, p2_all, t, first, ids, ids_all) + nnclr_loss(nn2, p1_all, t, first, ids, ids_all)) / 2
        if self.training:
            self.support.enqueue(z1n)
        return loss, z1
