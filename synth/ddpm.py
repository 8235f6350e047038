"""The DDPM a generator run trains: the UNet and noise schedule its config asks for, the loss, and sample grids."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, UNet2DModel

from clsp.file_io import write_atomic

if TYPE_CHECKING:
    from clsp.synth.diffusion_train import DiffusionTrainConfig


def build_unet(cfg: DiffusionTrainConfig, image_size: int) -> UNet2DModel:
    levels = range(len(cfg.channels))
    down = tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels))
    return UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block, down_block_types=down, up_block_types=up,
        norm_num_groups=cfg.norm_groups, attention_head_dim=None, dropout=cfg.dropout,
    )


def build_scheduler(cfg: DiffusionTrainConfig) -> DDIMScheduler:
    """Training noise schedule and sampler in one: 'trailing' spacing starts sampling at t = T - 1 (not 'linspace')."""
    return DDIMScheduler(num_train_timesteps=cfg.train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule="linear", clip_sample=True, set_alpha_to_one=True,
                         timestep_spacing="trailing", prediction_type="epsilon")


def diffusion_loss(unet, scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   snr_gamma: float = 0.0, skip_keep: torch.Tensor | None = None) -> torch.Tensor:
    """DDPM simple loss || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2; x0, noise: (B, 3, H, W).

    snr_gamma > 0 weights each sample by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. 2023): less effort on the
    nearly clean timesteps, so global shape is learnt in fewer steps. skip_keep (B,) bool: `unet` is then a
    synth.unet_split.SkipDropout and rows with False lose their below-full-resolution skips.
    """
    x_t = scheduler.add_noise(x0, noise, timesteps)  # (B, 3, H, W)
    eps = unet(x_t, timesteps).sample if skip_keep is None else unet(x_t, timesteps, skip_keep)  # (B, 3, H, W)
    per_sample = (eps.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma > 0:
        abar = scheduler.alphas_cumprod.to(x0.device)[timesteps]  # (B,)
        snr = abar / (1 - abar)
        per_sample = per_sample * snr.clamp(max=snr_gamma) / snr
    return per_sample.mean()


@torch.no_grad()
def sample_grid(unet: UNet2DModel, scheduler: DDIMScheduler, count: int, steps: int, seed: int) -> torch.Tensor:
    """`count` DDIM (eta 0) samples from a fixed seed -> (count, 3, H, W) in [0, 1]."""
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(steps)
    size, device = unet.config.sample_size, unet.device
    x = torch.randn((count, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(device)  # x_T
    for t in sampler.timesteps:
        eps = unet(x, t).sample
        x = sampler.step(eps, t, x, eta=0.0).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).float().cpu()


def save_grid(images: torch.Tensor, path: Path) -> None:
    """(N, 3, H, W) floats in [0, 1] -> a square-ish PNG grid at `path`, small images enlarged to be looked at."""
    from clsp.shards.sheet import image_grid

    pixels = (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    columns = max(1, int(math.sqrt(len(pixels))))
    rows = [list(pixels[start:start + columns]) for start in range(0, len(pixels), columns)]
    png = io.BytesIO()
    image_grid(rows, min_side=64, anchor_gap=0).save(png, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png.getvalue())
