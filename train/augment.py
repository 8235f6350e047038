"""Batched GPU/CPU augmentation of the SimCLR, MoCo v2+ and BYOL recipes (NNCLR trains on BYOL's);
`train.pil_augment` is the per-image form.

    augment = BatchAugment("simclr", size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    v1, v2 = augment(images), augment(images, view=1)  # images: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1]

The two views of a recipe differ only in BYOL's: solarize never on the first, p 0.2 on the second (the BYOL paper's
asymmetric views; its blur is left out at 32 px, as for the other recipes).

Every sample gets its own crop, flip, jitter factors, grayscale and solarize draws: one draw of PARAMS uniforms per
sample from the torch RNG of the images' device, and the batch's jitter order from torch's CPU RNG (seed both with
``torch.manual_seed``). Nothing is read back from the device and nothing is copied onto it, so on a GPU the host
queues a step's augmentation and goes on (tests/test_augment.py checks this on the meta device), where kornia's
augmentation modules read parameters back several times a call. On a GPU, `compile_stages()` (what `--compile`
does) compiles the work between the draws, about 240 small ops a view, into a few fused kernels. The colour steps
are kornia's functions (the PIL-compatible brightness, contrast, saturation and hue). Differences from torchvision's
per-image pipeline: one jitter order per batch (as kornia's ColorJitter; one per image would run every step at every
position, 3.4x the time on a CPU), and the crop is resampled bilinearly without antialiasing (as kornia's "resample"
crop).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction, adjust_hue,
                            adjust_saturation_with_gray_subtraction)
from torch import nn

RECIPES = ("simclr", "moco", "byol")
CROP_SCALE, CROP_RATIO, CROP_TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10  # torchvision's RandomResizedCrop
JITTER = {"simclr": (0.4, 0.4, 0.4, 0.1), "moco": (0.4, 0.4, 0.2, 0.1),  # brightness, contrast, saturation, hue
          "byol": (0.4, 0.4, 0.2, 0.1)}
JITTER_P, GRAYSCALE_P, SOLARIZE_P = 0.8, 0.2, 0.2
# solarize probability of (view 1, view 2): BYOL's views are asymmetric (NNCLR uses BYOL's); blur is off at 32 px.
# A probability of 0 makes no draw (the PIL form's generator keeps its sequence), so SimCLR's views are as before
SOLARIZE = {"simclr": (0.0, 0.0), "moco": (SOLARIZE_P, SOLARIZE_P), "byol": (0.0, SOLARIZE_P)}
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1]; pass dataset statistics where known
DEFAULT_STD = (0.5, 0.5, 0.5)


def recipe_for(method: str) -> str:
    """The recipe a method trains on: its paper's (NNCLR's is BYOL's); SimCLR's for a method without one."""
    return {"nnclr": "byol"}.get(method, method if method in RECIPES else "simclr")


# The columns of a sample's uniforms, in draw order: changing them changes every augmentation of a seed.
_COLUMNS = {"area": CROP_TRIES, "log_ratio": CROP_TRIES, "top": 1, "left": 1, "flip": 1, "jitter": 1, "factors": 4,
            "grayscale": 1, "solarize": 1}
PARAMS = sum(_COLUMNS.values())  # 30 uniforms per sample
# A training run's record names how its views were drawn (augment_draws), so that a run is never resumed with other
# draws: absent = kornia's augmentation modules (clsp <= 0.3.0); 2 = this module's draws.
AUGMENT_DRAWS = 2
_COLOUR_STEPS = (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                 adjust_saturation_with_gray_subtraction, lambda x, turns: adjust_hue(x, turns * (2 * math.pi)))


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


def crop_and_flip(x: torch.Tensor, u: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip as one bilinear resampling: (B, 3, H, W) -> (B, 3, size, size).

    The box follows torchvision's draw, batched: ten tries of an area fraction and a log-uniform aspect ratio, the
    first that fits (integer width and height), else the largest centred box within the ratio range."""
    height, width = x.shape[-2:]
    area = (CROP_SCALE[0] + u["area"] * (CROP_SCALE[1] - CROP_SCALE[0])) * (height * width)  # (B, tries)
    ratio = torch.exp(math.log(CROP_RATIO[0]) + u["log_ratio"] * math.log(CROP_RATIO[1] / CROP_RATIO[0]))
    w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()  # (B, tries)
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # (B, 1): the first try that fits (argmax: first max)
    found = fits.any(dim=1)  # (B,)
    fallback_w, fallback_h = width, height  # centred fallback, as torchvision's, computed from the shape alone
    if width / height < CROP_RATIO[0]:
        fallback_h = round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        fallback_w = round(height * CROP_RATIO[1])
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))  # (B,)
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
    top = torch.where(found, (u["top"].squeeze(1) * (height - h + 1)).floor(), float((height - fallback_h) // 2))
    left = torch.where(found, (u["left"].squeeze(1) * (width - w + 1)).floor(), float((width - fallback_w) // 2))
    flip = torch.where(u["flip"].squeeze(1) < 0.5, -1.0, 1.0)
    # Output pixel centres at normalised u in (-1, 1) sample the box [left, left + w] x [top, top + h]: x = sx u + tx
    # in grid_sample's coordinates (align_corners=False); a flip mirrors within the box.
    zero = torch.zeros_like(w)
    theta = torch.stack([flip * w / width, zero, (2 * left + w) / width - 1,
                         zero, h / height, (2 * top + h) / height - 1], dim=1).view(-1, 2, 3)  # (B, 2, 3)
    grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_step(x: torch.Tensor, u_factor: torch.Tensor, jittered: torch.Tensor, step: int, low: float,
                high: float) -> torch.Tensor:
    """Colour step `step` (0-3: brightness, contrast, saturation, hue) by a factor uniform in [low, high] on the
    samples `jittered` (B, 1, 1, 1) marks: (B, 3, H, W) -> the same; u_factor (B,) in [0, 1)."""
    return torch.where(jittered, _COLOUR_STEPS[step](x, low + u_factor * (high - low)), x)


def colour_jitter(x: torch.Tensor, u: dict[str, torch.Tensor], strengths: Sequence[float], order: Sequence[int],
                  step=jitter_step) -> torch.Tensor:
    """With probability JITTER_P per sample, brightness, contrast, saturation and hue (steps 0-3) by random factors,
    in `order`: (B, 3, H, W) in [0, 1] -> the same. `step`: jitter_step or its compiled form."""
    ranges = [(max(0.0, 1 - s), 1 + s) for s in strengths[:3]] + [(-strengths[3], strengths[3])]  # hue: in turns
    jittered = u["jitter"][:, :, None, None] < JITTER_P  # (B, 1, 1, 1)
    for index in order:
        x = step(x, u["factors"][:, index], jittered, index, *ranges[index])
    return x.clamp(0.0, 1.0)  # the hue step's HSV round trip may leave [0, 1] by a rounding error


def grey_solarize_normalise(x: torch.Tensor, u: dict[str, torch.Tensor], solarize: float, mean: torch.Tensor,
                            std: torch.Tensor) -> torch.Tensor:
    """The last steps: grayscale (p GRAYSCALE_P), solarize at 0.5 with probability `solarize` (a view's SOLARIZE, like
    torchvision's RandomSolarize(128)), then (x - mean) / std: (B, 3, H, W) -> the same; mean, std (1, 3, 1, 1)."""
    grey = u["grayscale"][:, :, None, None] < GRAYSCALE_P  # (B, 1, 1, 1)
    x = torch.where(grey, rgb_to_grayscale(x).expand_as(x), x)
    if solarize:  # its probability
        x = torch.where((u["solarize"][:, :, None, None] < solarize) & (x >= 0.5), 1.0 - x, x)
    return normalise(x, mean, std)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std: x (B, 3, H, W), mean and std (1, 3, 1, 1). A plain function, so that the compiled last stage
    fuses it into its kernel."""
    return (x - mean) / std


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each with std > 0, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(x, self.mean, self.std)  # (B, 3, H, W)


_STAGES = (crop_and_flip, jitter_step, grey_solarize_normalise)


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
        self.normalize = _Normalize(mean, std)  # its buffers: the mean and std the last stage uses
        self._crop, self._step, self._finish = _STAGES  # eager; compile_stages replaces them

    def compile_stages(self, backend: str = "inductor") -> BatchAugment:
        """torch.compile the three stages (crop and flip, a jitter step, the last steps) for a GPU, where each of
        their small ops (with the draws, about 240 a view) would otherwise be a kernel launch; returns self. The
        draws stay eager, so the views are the eager ones up to float rounding. Each stage compiles once per batch
        shape, the jitter step once per colour step too: 6 graphs a recipe and shape. (Compiling forward whole would
        draw inside the graph, with other random numbers, and compile once per jitter order: 24.)"""
        self._crop, self._step, self._finish = (torch.compile(stage, backend=backend, dynamic=False, fullgraph=True)
                                                for stage in _STAGES)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, view: int = 0) -> torch.Tensor:
        """view: 0 or 1, which of the recipe's two views (they differ in BYOL's solarize only)."""
        x = to_unit_float(images)  # (B, 3, H, W) in [0, 1]
        if self.normalize.mean.device != x.device:  # follow the images
            self.to(x.device)
        draws = torch.rand(x.shape[0], PARAMS, device=x.device)  # (B, PARAMS): each sample's parameters
        u = dict(zip(_COLUMNS, draws.split(list(_COLUMNS.values()), dim=1)))
        order = torch.randperm(len(_COLOUR_STEPS)).tolist()  # the batch's jitter order, drawn on the host
        x = colour_jitter(self._crop(x, u, self.size), u, JITTER[self.recipe], order, self._step)  # (B, 3, size, size)
        return self._finish(x, u, SOLARIZE[self.recipe][view], self.normalize.mean, self.normalize.std)


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
