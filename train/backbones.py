"""ResNet encoders with a width knob and the small-image stem, plus the MLP heads of the methods.

The blocks are the standard ResNet ones (He et al. 2016; Bottleneck with the stride on its 3x3 conv, "v1.5") with
torchvision's module names and construction order, so ``width=64`` is torchvision's ResNet minus ``fc``: the same state
dict, the same features (tests/test_methods.py checks both against a fixture made with torchvision) and the same
initial weights for a given seed. ``width`` scales every stage by ``width / 64`` (torchvision's ``width_per_group``
only widens the inside of Bottleneck blocks): ``width=16`` has about 1/16 of the parameters. Written here rather than
imported so the CPU install needs no torchvision, which has no CPU build on the package index.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut: (B, inplanes, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()  # attribute order = torchvision's (state dict order and initial-weight draws follow it)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, and a shortcut: (B, inplanes, H, W) -> (B, 4 planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)

# name -> (block type, blocks per stage)
RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
SMALL_STEM_MAX_SIZE = 64  # images up to this size (CIFAR 32 px, digits 16 px) use the 3x3 stride-1 stem


def wants_small_stem(image_size: int) -> bool:
    """True for images small enough that a 7x7/2 conv + max-pool would throw away most of the resolution."""
    return image_size <= SMALL_STEM_MAX_SIZE


class ResNetTrunk(nn.Module):
    """ResNet without ``fc``: (B, 3, H, W) -> (B, D) pooled features, D = ``feat_dim``.

    Module names follow torchvision (conv1, bn1, layer1..layer4), so torchvision state dicts load (drop their ``fc.``).
    """

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], width: int = 64, small_stem: bool = True):
        super().__init__()
        if small_stem:  # CIFAR stem: keep full resolution into layer1
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:  # ImageNet stem: /4 before layer1
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stage, inplanes = _make_stage(block, inplanes, planes, blocks, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = inplanes  # width * 8 * block.expansion
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H', W')
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, D, H'/8, W'/8)
        return torch.flatten(self.avgpool(x), 1)  # (B, D)


def _make_stage(block, inplanes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_planes:  # projection shortcut when the shape changes
        downsample = nn.Sequential(conv1x1(inplanes, out_planes, stride), nn.BatchNorm2d(out_planes))
    modules = [block(inplanes, planes, stride, downsample)]
    modules += [block(out_planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*modules), out_planes


def _init_like_torchvision(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_backbone(name: str, width: int = 64, small_stem: bool = True) -> tuple[nn.Module, int]:
    """Encoder mapping (B, 3, H, W) -> (B, D); returns (module, D). ``width`` is the channel count of the stem."""
    if name not in RESNET_LAYOUTS:
        raise ValueError(f"unknown backbone {name!r}: choose one of {sorted(RESNET_LAYOUTS)}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"backbone width must be a positive integer (64 = standard ResNet), got {width!r}")
    block, layers = RESNET_LAYOUTS[name]
    trunk = ResNetTrunk(block, layers, width=width, small_stem=small_stem)
    return trunk, trunk.feat_dim


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool) -> nn.Sequential:
    """Projector/predictor: Linear(in, hidden) [- BN] - ReLU - Linear(hidden, out); (B, in) -> (B, out)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


@torch.no_grad()
def embed(backbone: nn.Module, images: np.ndarray, transform: nn.Module, batch_size: int,
          device: str | torch.device, progress: str | None = None) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float32 features (N, D) on `device`, in batches through transform and backbone;
    `progress`: the label of a progress bar over the batches (None: no bar).

    The caller puts the backbone in eval mode (the kNN monitor restores training mode afterwards).
    """
    from tqdm.auto import tqdm

    starts = tqdm(range(0, len(images), batch_size), desc=progress, unit="batch", leave=False, position=0,
                  disable=progress is None)
    return torch.cat([backbone(transform(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
                                         .to(device))).float().flatten(1)  # (b, D)
                      for start in starts])
