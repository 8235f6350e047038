"""Untrained generators built in code (seeded init): tiny UNets for tests and quick runs, and the DDPM CIFAR-10
architecture and schedule (synth.bench)."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DModel


def tiny_unet(
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (8, 16),
    layers_per_block: int = 1,
    in_channels: int = 3,
    attention: bool = True,
    seed: int = 0,
    **overrides,
) -> UNet2DModel:
    """A small UNet2DModel (seeded init, global RNG untouched) for tests and quick runs; attention on the last level."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    config = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                  block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                  down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=4,
                  attention_head_dim=8)
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config).eval()


def ddpm_cifar10_unet(seed: int = 0) -> UNet2DModel:
    """Random-init UNet with the architecture of google/ddpm-cifar10-32 (35.7M parameters; the CLSP generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),  # attention at 16x16
            attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
            norm_num_groups=32, act_fn="silu", mid_block_scale_factor=1, center_input_sample=False,
        ).eval()


def ddpm_cifar10_scheduler() -> DDIMScheduler:
    """DDIM over the DDPM CIFAR-10 schedule: T = 1000, linear betas 1e-4..0.02, x0 clipped to [-1, 1]."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=True)
