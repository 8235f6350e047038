"""SimCLR: InfoNCE over two views, negatives = every other view in the (global) batch."""
from __future__ import annotations

import torch

from clsp.train.distributed import concat_all_gather, gather_with_grad, world_info
from clsp.train.losses import info_nce
from clsp.train.methods import InfoNCEConfig, Method, register


@register("simclr")
class SimCLR(Method):
    # the paper: tau 0.2, lam 1.0, projector Linear(d, 4096) - ReLU - Linear(4096, 256): InfoNCEConfig's defaults
    config = InfoNCEConfig

    def base_loss(self, v1, v2, ids):
        z1, z2 = self.project(v1), self.project(v2)  # (B, p) each
        z = torch.cat([z1, z2])  # (2B, p): both views of this rank
        z_ids = torch.cat([ids, ids])  # (2B,)
        rank, world = world_info()
        anchors = slice(rank * len(z), (rank + 1) * len(z))  # this rank's rows after the gather
        z_all, ids_all = gather_with_grad(z), concat_all_gather(z_ids)  # (world * 2B, p), (world * 2B,)
        return info_nce(z_all, ids_all, self.cfg.temperature, anchors if world > 1 else None), z1
