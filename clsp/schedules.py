"""The one warm-up-then-cosine schedule (contrastive training's lr multiplier, the diffusion lr)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, peak: float = 1.0) -> float:
    """Value at (0-based) step: linear warm-up to `peak` over warmup_steps, then a half cosine to 0 at total_steps.

    peak=1: the multiplier of a base lr (LambdaLR); peak=lr: the lr itself.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    # grouped as the diffusion lr always was: the shipped generator's weights depend on the last bit
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))
