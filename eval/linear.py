"""Linear probe on frozen features, and a guard that the backbone stayed frozen while it was probed.

The probe is one nn.Linear trained with SGD (momentum 0.9) and step decay, on features standardised with the train
split's mean/std (so that the authors' lr 1.0 is a sane step size whatever the backbone's feature scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from clsp.eval.features import extract_features


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 100
    lr: float = 1.0
    batch_size: int = 256
    milestones: tuple[int, ...] = (60, 80)  # epochs at which lr is multiplied by gamma
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    standardize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("probe epochs, batch_size and lr must be > 0")
        if any(m <= 0 or m >= self.epochs for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"probe milestones {self.milestones} must be increasing epochs inside (0, {self.epochs})")
        if not 0 < self.gamma <= 1 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("probe gamma must be in (0, 1], momentum in [0, 1), weight_decay >= 0")


PROBE_PRESETS = {
    "paper": ProbeConfig(),  # authors: 100 epochs, SGD lr 1.0, batch 256, lr x0.1 at 60 and 80
    "fast": ProbeConfig(epochs=30, milestones=(18, 24)),  # CPU / embedded: same schedule shape, 30 epochs
}


@dataclass(frozen=True)
class LinearProbe:
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    mean: np.ndarray  # (D,) feature standardisation learned on the train split
    std: np.ndarray  # (D,)

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.mean) / self.std  # (N, D)
        return (z @ self.weight.T + self.bias).argmax(axis=1)


def train_linear_probe(features: np.ndarray, labels: np.ndarray, config: ProbeConfig = ProbeConfig()) -> LinearProbe:
    """Fit a linear classifier on (N, D) features and integer labels (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or labels.size == 0:
        raise ValueError(f"need features (N, D) and labels (N,), got {features.shape} and {labels.shape}")
    if labels.min() < 0:
        raise ValueError("labels hold unknown entries (-1): the linear probe needs a labelled split")
    feats = features.astype(np.float64)
    mean = feats.mean(axis=0) if config.standardize else np.zeros(feats.shape[1])
    std = feats.std(axis=0) if config.standardize else np.ones(feats.shape[1])
    # a feature constant over the training set (a ReLU unit that never fires there) is left unscaled, as
    # scikit-learn's StandardScaler does: dividing by 1e-6 would let its least movement on a test image decide
    std = np.where(std < 1e-6, 1.0, std + 1e-6)
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.as_tensor((feats - mean) / std, dtype=torch.float32)  # (N, D)
    y = torch.as_tensor(labels)  # (N,)
    head = nn.Linear(x.shape[1], int(labels.max()) + 1)
    with torch.no_grad():  # seeded init, independent of the global RNG
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(config.milestones), gamma=config.gamma)
    for _ in tqdm(range(config.epochs), desc="linear probe", unit="epoch", leave=False, position=0):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return LinearProbe(
        head.weight.detach().double().numpy(), head.bias.detach().double().numpy(), mean, std
    )


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    config: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """{'top1': test accuracy %, 'train_top1': train accuracy %}."""
    probe = train_linear_probe(train_features, train_labels, config)
    test_labels = np.asarray(test_labels)
    return {
        "top1": float((probe.predict(test_features) == test_labels).mean() * 100.0),
        "train_top1": float((probe.predict(train_features) == np.asarray(train_labels)).mean() * 100.0),
    }


class BackboneChangedError(RuntimeError):
    """The backbone's parameters or buffers changed while it was being probed."""


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in module.state_dict().items()}


def probe_backbone(
    backbone: nn.Module,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    config: ProbeConfig = ProbeConfig(),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    fingerprints: tuple[str, str] | None = None,
) -> dict[str, float]:
    """Linear probe on features of a frozen backbone, then check that no parameter or buffer of it moved.

    Raises BackboneChangedError naming the changed tensors (e.g. BatchNorm running stats of a backbone that stayed in
    train mode). With `cache_dir` and the (train, test) source `fingerprints`, features come from / go to the cache
    (see extract_features); the check then covers whatever forward passes ran here.
    """
    before = _snapshot(backbone)
    requires_grad = {name: p.requires_grad for name, p in backbone.named_parameters()}
    backbone.requires_grad_(False)
    try:
        train_fp, test_fp = fingerprints if fingerprints is not None else (None, None)
        train_feats = extract_features(backbone, train_images, mean, std, batch_size, device, cache_dir, train_fp)
        test_feats = extract_features(backbone, test_images, mean, std, batch_size, device, cache_dir, test_fp)
        result = linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels, config)
    finally:
        for name, p in backbone.named_parameters():
            p.requires_grad_(requires_grad[name])
    after = _snapshot(backbone)
    changed = [name for name in before if name not in after or not torch.equal(before[name], after[name])]
    if changed or set(after) != set(before):
        shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
        raise BackboneChangedError(
            f"the backbone changed while it was probed ({len(changed)} tensors: {shown}); the probe result is void. "
            "Keep the backbone frozen: eval() mode (BatchNorm must not update running stats) and no optimiser on it"
        )
    return result
