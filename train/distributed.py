"""Cross-process helpers shared by the methods. Every function also works in one plain process (no torch.distributed).

All gathers need the same batch size on every rank (the loop feeds equal batches).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, identical on all ranks; no gradient."""
    _, world = world_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    # torch.distributed.nn.all_gather does the same but its backward needs reduce_scatter, which gloo (CPU) lacks;
    # all_reduce + slicing works on every backend.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss may depend on our rows: sum their gradients
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...) in rank order; gradients flow back to each rank's own rows.

    Use with a loss over this rank's anchors only: the gradient of our rows is then the sum over ranks, which DDP's
    gradient averaging turns into the gradient of the global mean loss.
    """
    _, world = world_info()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


class FeatureQueue(nn.Module):
    """Ring buffer of the last ``size`` feature rows (MoCo negatives, NNCLR support set).

    State lives in buffers (features, ptr, filled), so ``state_dict`` and checkpoints hold it. Rows are written
    in order from row 0, so the valid rows are always ``features[:filled]``. The host keeps its own count of them
    (``rows``, read from ``filled`` once when a state is loaded), so that a step never waits for the device to learn
    it.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("features", torch.zeros(size, dim))  # (Q, d)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # number of valid rows
        self.rows = 0  # = int(filled), kept on the host
        self.register_load_state_dict_post_hook(lambda queue, _: setattr(queue, "rows", int(queue.filled)))

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Append (B, d) rows from this rank, gathered from all ranks first so every rank holds the same queue."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"FeatureQueue.enqueue expects (B, {self.dim}) rows, got shape {tuple(x.shape)}")
        x = concat_all_gather(x.detach()).to(self.features.dtype)  # (world * B, d)
        n = x.shape[0]
        index = (self.ptr + torch.arange(n, device=x.device)) % self.size  # (n,)
        if n > self.size:  # only the newest `size` rows survive
            x, index = x[-self.size :], index[-self.size :]
        self.features.index_copy_(0, index, x)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.add_(n).clamp_(max=self.size)
        self.rows = min(self.rows + n, self.size)

    def get(self) -> torch.Tensor:
        """A copy of the valid rows (filled, d). A copy, so a later ``enqueue`` cannot corrupt a pending backward."""
        return self.features[: self.rows].clone()


def cosine_momentum(base: float, final: float, progress: float) -> float:
    """Momentum rising from ``base`` (progress 0) to ``final`` (progress 1) on a half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
