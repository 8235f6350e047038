"""The one exponential-moving-average update: momentum encoders (MoCo, BYOL) and the diffusion EMA weights."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, keep: float, *, lerp: bool = True) -> None:
    """target <- keep * target + (1 - keep) * online for every parameter (buffers such as BN statistics are left alone).

    lerp=True computes it as torch.lerp(target, online, 1 - keep) (the diffusion EMA); lerp=False as keep * target
    then + (1 - keep) * online (the momentum encoders). The two differ in the last bit, and each user keeps the form it
    was trained with so that reruns and resumes of earlier runs give the same weights to the bit.
    """
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError("ema_update: target and online modules have different parameter lists")
    onlines = [p.detach().to(t.dtype) for t, p in zip(targets, onlines)]  # e.g. a float32 EMA of a bf16 model
    if lerp:
        torch._foreach_lerp_(targets, onlines, 1 - keep)
    else:
        torch._foreach_mul_(targets, keep)
        torch._foreach_add_(targets, onlines, alpha=1.0 - keep)
