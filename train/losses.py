"""Contrastive losses as pure tensor functions (no modules, no state). Inputs need not be L2-normalised."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def without_autocast():
    """Autocast off (also usable as a decorator). On a GPU accelerate runs Method.forward, the losses included, under
    bf16 autocast, which runs a matmul in bf16 even on .float() inputs: logits and similarities rounded to 2^-8 of
    their size (cosines within 0.004 tie). A no-op where autocast is off (CPU runs)."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield


@without_autocast()
def info_nce(
    z: torch.Tensor, ids: torch.Tensor, temperature: float, anchors: slice | torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE / NT-Xent where positives are the other rows with the same id.

    z: (N, d) projections of all views, ids: (N,) anchor ids. Each anchor row i is contrasted against every row
    j != i; with several positives the loss is the mean of -log softmax over them (SupCon "out" form), which for
    two views per id is exactly SimCLR's NT-Xent. ``anchors`` picks the rows used as anchors (default: all),
    e.g. this rank's rows when z holds the batch gathered from all ranks. Anchors with no positive are skipped.
    """
    n = z.shape[0]
    if ids.shape != (n,):
        raise ValueError(f"info_nce: ids must have one entry per row of z ({n}), got shape {tuple(ids.shape)}")
    z = F.normalize(z.float(), dim=1)  # (N, d)
    rows = torch.arange(n, device=z.device)
    anchor_rows = rows if anchors is None else rows[anchors]  # (M,)
    logits = z[anchor_rows] @ z.T / temperature  # (M, N)
    is_self = anchor_rows[:, None] == rows[None, :]  # (M, N)
    log_prob = logits.masked_fill(is_self, float("-inf")).log_softmax(dim=1)  # (M, N)
    positives = (ids[anchor_rows][:, None] == ids[None, :]) & ~is_self  # (M, N)
    n_pos = positives.sum(dim=1)  # (M,)
    # checked on the device: a host check (or a boolean mask) would make every step wait for the GPU here
    torch._assert_async((n_pos > 0).any(), "info_nce: no anchor has a positive; pass at least two views sharing "
                                           "each id")
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1) / n_pos.clamp(min=1)  # (M,): 0 without positives
    return per_anchor.sum() / (n_pos > 0).sum()  # the mean over the anchors that have positives


@without_autocast()
def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo InfoNCE: query q_i (B, d) against its key k_i (B, d) and the queued negatives (Q, d)."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    queue = F.normalize(queue.float(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    negative = q @ queue.T  # (B, Q)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (B, 1 + Q)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@without_autocast()
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss mean(2 - 2 cos(p_i, z_i)); p: (B, d) online predictions, z: (B, d) target projections."""
    return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


@without_autocast()
def nnclr_loss(nn: torch.Tensor, p: torch.Tensor, temperature: float, first_label: int = 0,
               ids: torch.Tensor | None = None, p_ids: torch.Tensor | None = None) -> torch.Tensor:
    """NNCLR: nearest neighbour nn_i (B, d) must pick its own prediction among p (N, d), N >= B.

    The positive of row i is p[first_label + i] (first_label = rank * B when p was gathered from all ranks). With
    ids (B,) and p_ids (N,), the other rows of p made from row i's anchor are no negatives: they leave its softmax
    (an anchor twice in a batch, as when --skip-corrupt leaves an epoch fewer anchors than it draws), as in info_nce.
    """
    nn, p = F.normalize(nn.float(), dim=1), F.normalize(p.float(), dim=1)
    logits = nn @ p.T / temperature  # (B, N)
    labels = first_label + torch.arange(len(nn), device=nn.device)  # (B,)
    if ids is not None:
        twins = ids[:, None] == p_ids[None, :]  # (B, N)
        twins[torch.arange(len(nn), device=nn.device), labels] = False  # its own prediction stays
        logits = logits.masked_fill(twins, float("-inf"))
    return F.cross_entropy(logits, labels)


@without_autocast()
def clsp_term(z1: torch.Tensor, z3: torch.Tensor) -> torch.Tensor:
    """CLSP pull term mean_i ||z1_i - z3_i||^2 of L2-normalised (B, d) projections, = mean(2 - 2 cos)."""
    z1, z3 = F.normalize(z1.float(), dim=1), F.normalize(z3.float(), dim=1)
    return (z1 - z3).pow(2).sum(dim=1).mean()
