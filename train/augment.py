"""Batched GPU/CPU augmentation of the SimCLR and MoCo v2+ recipes (kornia); `train.pil_augment` is the per-image form.

    augment = BatchAugment("simclr", size=32, mean=CIFAR_MEAN, std=CIFAR_STD).to(device)
    v1, v2 = augment(images), augment(images)   # images: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1]

Every sample gets its own crop/flip/jitter/... parameters, drawn from the torch RNG of the device the images are on
(seed it with ``torch.manual_seed``; the module follows the input's device). Differences from torchvision's per-image
pipeline: kornia draws one jitter order per batch (torchvision: per image), and the crop is resampled bilinearly
without antialiasing.
"""
from __future__ import annotations

from typing import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

RECIPES = ("simclr", "moco")
CROP_SCALE = (0.08, 1.0)
JITTER = {"simclr": (0.4, 0.4, 0.4, 0.1), "moco": (0.4, 0.4, 0.2, 0.1)}  # brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, SOLARIZE_P = 0.8, 0.2, 0.2  # solarize: MoCo recipe only
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1]; pass dataset statistics where known
DEFAULT_STD = (0.5, 0.5, 0.5)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] (on the images' device); float (B, 3, H, W) passes through."""
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3), got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(255.0)
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            "images must be uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1], "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    return images.float()


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each with std > 0, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (B, 3, H, W)


class BatchAugment(nn.Module):
    """Strong random augmentation of a batch: images -> normalised float (B, 3, size, size)."""

    def __init__(
        self,
        recipe: str = "simclr",
        size: int = 32,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"unknown augmentation recipe {recipe!r}: choose one of {RECIPES}")
        if size < 1:
            raise ValueError(f"augmentation output size must be >= 1 pixel, got {size}")
        self.recipe, self.size = recipe, size
        ops = [
            # "resample" crops the whole batch with one warp; kornia's default "slice" loops over samples on the host
            K.RandomResizedCrop((size, size), scale=CROP_SCALE, cropping_mode="resample"),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(*JITTER[recipe], p=JITTER_P),
            K.RandomGrayscale(p=GRAYSCALE_P),
        ]
        if recipe == "moco":  # fixed threshold 0.5 like torchvision's RandomSolarize(128)
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=SOLARIZE_P))
        self.ops = nn.Sequential(*ops)
        self.normalize = _Normalize(mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images)  # (B, 3, H, W) in [0, 1]
        if self.normalize.mean.device != x.device:  # draw the random parameters where the images are
            self.to(x.device)
        return self.normalize(self.ops(x))  # (B, 3, size, size)


class EvalTransform(nn.Module):
    """The deterministic counterpart for evaluation: images -> resized (if needed) normalised (B, 3, size, size)."""

    def __init__(self, size: int, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        super().__init__()
        self.size = size
        self.normalize = _Normalize(mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images)
        if self.normalize.mean.device != x.device:  # follow the images, as BatchAugment does
            self.to(x.device)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.normalize(x)
