"""The per-image PIL form of the augmentation recipes: what torchvision-style pipelines do, one image at a time.

    reference = pil_reference("simclr", size=32, seed=0)
    view = reference(Image.fromarray(image))   # (3, size, size) normalised float

It follows torchvision's documented semantics (RandomResizedCrop's ten-try area/log-ratio draw with a centre-crop
fallback, a jitter order drawn per image, PIL's enhancers, hue as a shift of the HSV hue byte, solarize at 128), so it
is the reference the batched pipeline (`train.augment.BatchAugment`) is checked against and the per-image speed
`train.bench` compares it with. It is written on PIL and numpy so the CPU install needs no torchvision.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from clsp.train.augment import (CROP_RATIO, CROP_SCALE, CROP_TRIES, DEFAULT_MEAN, DEFAULT_STD, GRAYSCALE_P, JITTER,
                                JITTER_P, RECIPES, SOLARIZE)


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, right, bottom): a random area fraction and log-uniform aspect ratio, ten
    tries, then the largest centred box within the ratio range."""
    area = width * height
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < CROP_RATIO[0]:
        h = round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        w = round(height * CROP_RATIO[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` of a turn (in [-0.5, 0.5]) on PIL's HSV bytes."""
    h, s, v = image.convert("HSV").split()
    hue = (np.asarray(h, dtype=np.int16) + round(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8)), s, v)).convert("RGB")


def jitter(image: Image.Image, strengths: tuple[float, float, float, float], rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation and hue, each by a random factor, in a random order drawn for this image."""
    brightness, contrast, saturation, hue = strengths
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(max(0, 1 - brightness), 1 + brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(max(0, 1 - contrast), 1 + contrast)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(max(0, 1 - saturation), 1 + saturation)),
        lambda im: shift_hue(im, rng.uniform(-hue, hue)),
    ]
    for index in rng.permutation(len(ops)):
        image = ops[index](image)
    return image


def pil_reference(recipe: str, size: int, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                  seed: int = 0, view: int = 0) -> Callable[[Image.Image], torch.Tensor]:
    """The recipe's `view` (0 or 1: they differ in BYOL's solarize only) as a per-image transform: RGB PIL image ->
    normalised float (3, size, size); draws from its own numpy generator seeded with `seed`."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}: choose one of {RECIPES}")
    rng = np.random.default_rng(seed)
    mean_, std_ = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        image = image.resize((size, size), Image.BILINEAR, box=crop_box(*image.size, rng))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        if rng.random() < JITTER_P:
            image = jitter(image, JITTER[recipe], rng)
        if rng.random() < GRAYSCALE_P:
            image = image.convert("L").convert("RGB")
        if SOLARIZE[recipe][view] and rng.random() < SOLARIZE[recipe][view]:
            image = ImageOps.solarize(image, threshold=128)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, size, size)
        return (pixels - mean_) / std_

    return transform
