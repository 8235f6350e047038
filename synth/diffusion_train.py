"""Train an unconditional DDPM (epsilon prediction, linear betas) on any data source, as CLSP trains one per dataset.

The data set is held in memory as a uint8 tensor (fine up to CIFAR size). Step `s` draws its batch, timesteps and noise
from a generator seeded by (seed, s) alone, and the learning rate is a function of `s`, so a resumed run repeats an
uninterrupted one exactly and the global batch does not depend on the number of processes (each rank takes its slice).

Output directory:
    train_config.json                   what was asked for: the record (clsp.run_dir); a resume must match it
    checkpoints/step-000500/            unet.safetensors, ema_unet.safetensors, state.pt (optimizer, step, loss)
    samples/step-000500.png             DDIM sample grid of the EMA model from a fixed seed, one per checkpoint
    log.csv                             step, loss, lr, images_per_s
    unet/ scheduler/ model_index.json   the EMA generator (synth.models.save_generator), model_index.json last
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel

from clsp.ema import ema_update as shared_ema_update
from clsp.errors import UserError
from clsp.hashing import keyed_seed
from clsp.run_dir import prepare_run_dir, write_atomic
from clsp.schedules import warmup_cosine
from clsp.sources import SPLITS, load_arrays, open_source
from synth.diffusion_run_dir import (GENERATOR_RUN, STEP_PREFIX, append_log, checkpoint_dirs, load_checkpoint,
                                     resume_step, save_checkpoint)
from synth.unet_split import SkipDropout

RUN_OPTIONS = ("out", "resume", "overwrite")  # how to run, not what to train: may differ between a run and its resume
MIXED_PRECISION = ("auto", "no", "bf16")  # auto: bf16 on a GPU, no on the CPU
LR_SCHEDULES = ("constant", "cosine")
LOG_EVERY = 25  # steps per log.csv row


@dataclass(frozen=True)
class DiffusionTrainConfig:
    """Defaults: the DDPM CIFAR-10 setup the CLSP authors use (35.7M parameters); PRESETS['embedded']: a small one."""

    out: Path
    source: str = "digits"
    split: str = "train"
    image_size: int | None = None  # None: the source's own size (digits: 16)
    # UNet2DModel: one level per entry of `channels`; `attention_levels` index the levels with self-attention
    channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attention_levels: tuple[int, ...] = (1,)
    norm_groups: int = 32
    dropout: float = 0.1
    # noise schedule (DDPM CIFAR-10): T = 1000, linear betas 1e-4 .. 0.02
    train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # optimisation
    batch_size: int = 128  # global: split across processes
    lr: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 5000
    steps: int = 800_000
    grad_clip: float = 1.0
    snr_gamma: float = 0.0  # 0: the plain DDPM loss; > 0: Min-SNR weighting
    skip_dropout: float = 0.0  # P(a row's below-full-resolution skips are replaced): > 0 makes the bottleneck carry shape
    skip_fill: str = "zero"  # what replaces them: zero | shuffle (another image's skips: synth.unet_split.SkipDropout)
    ema_decay: float = 0.9999
    hflip: bool = True
    mixed_precision: str = "auto"
    seed: int = 0
    # checkpoints and sample grids
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 2
    sample_steps: int = 50  # DDIM steps for the grid
    grid_size: int = 64
    # run options (not compared on resume)
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention_levels", tuple(sorted({int(a) for a in self.attention_levels})))
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split {self.split!r}: use one of {', '.join(SPLITS)}")
        if not self.channels or min(self.channels) < 1:
            problems.append(f"channels {self.channels}: give one positive width per level, e.g. 32,64,64")
        elif any(c % self.norm_groups for c in self.channels):
            problems.append(f"channels {self.channels} are not all divisible by norm_groups={self.norm_groups}: "
                            f"change one or the other")
        if any(not 0 <= a < len(self.channels) for a in self.attention_levels):
            problems.append(f"attention_levels {self.attention_levels}: use level numbers 0..{len(self.channels) - 1}")
        levels = len(self.channels)
        if self.image_size is not None and (self.image_size < 4 or self.image_size % 2 ** (levels - 1)):
            problems.append(f"image_size {self.image_size}: must be >= 4 and divisible by {2 ** (levels - 1)} "
                            f"for a {levels}-level UNet")
        positive = dict(layers_per_block=self.layers_per_block, norm_groups=self.norm_groups,
                        batch_size=self.batch_size, steps=self.steps, checkpoint_every=self.checkpoint_every,
                        keep_checkpoints=self.keep_checkpoints, sample_steps=self.sample_steps,
                        grid_size=self.grid_size, lr=self.lr, grad_clip=self.grad_clip)
        problems += [f"{k} = {v}: must be > 0" for k, v in positive.items() if not v > 0]
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps = {self.warmup_steps}: must be >= 0")
        if self.snr_gamma < 0:
            problems.append(f"snr_gamma = {self.snr_gamma}: must be >= 0 (0 turns Min-SNR weighting off)")
        if self.skip_fill not in ("zero", "shuffle"):
            problems.append(f"skip_fill {self.skip_fill!r}: use zero or shuffle")
        if not 0 <= self.skip_dropout < 1:
            problems.append(f"skip_dropout = {self.skip_dropout}: must be in [0, 1), e.g. 0.5 (0 turns it off)")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout = {self.dropout}: must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay = {self.ema_decay}: must be in [0, 1), e.g. 0.999")
        if self.train_timesteps < 2 or self.sample_steps > self.train_timesteps:
            problems.append(f"train_timesteps = {self.train_timesteps}, sample_steps = {self.sample_steps}: "
                            f"need 2 <= train_timesteps and sample_steps <= train_timesteps")
        if not 0 < self.beta_start < self.beta_end < 1:
            problems.append(f"betas {self.beta_start}..{self.beta_end}: need 0 < beta_start < beta_end < 1")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision {self.mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule {self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
        if problems:
            raise UserError("invalid diffusion training config: " + "; ".join(problems))

    def training_fields(self) -> dict:
        """The settings that define the model and its training run, as JSON values (tuples become lists)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUN_OPTIONS}
        return json.loads(json.dumps(values))


# Presets give values for the fields they name; explicit options override them.
PRESETS: dict[str, dict] = {
    # Embedded digits (16x16 RGB, 1,437 images): 1.1M parameters, 8,000 steps in about 46 minutes on one CPU thread
    # (the project ships the result: generators/digits-16px). Min-SNR weighting and batch 32 gave clearly better digits
    # than the plain loss at equal compute; skip dropout with shuffled skips makes the bottleneck carry the class;
    # 8,000 steps rather than 4,000 lift class agreement from 83.5 to 86 % and confident samples from 74 to 80 %
    # (README: "Why the embedded generator keeps the anchor's class").
    "embedded": dict(
        source="digits", split="train", image_size=16, channels=(32, 64, 64), layers_per_block=1,
        attention_levels=(1,), norm_groups=8, dropout=0.0, batch_size=32, lr=2e-3, lr_schedule="cosine",
        warmup_steps=100, steps=8000, snr_gamma=5.0, skip_dropout=0.5, skip_fill="shuffle", ema_decay=0.995,
        hflip=False, checkpoint_every=500, grid_size=64,
    ),
    "ddpm-cifar10": {},  # the dataclass defaults
}


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


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for everything random in one training step, keyed on (seed, step) only."""
    return torch.Generator().manual_seed(keyed_seed("diffusion-train", seed, step))


def lr_at(cfg: DiffusionTrainConfig, step: int) -> float:
    """Learning rate for (0-based) step: linear warm-up, then constant or cosine decay to 0."""
    if cfg.lr_schedule == "constant" and step >= cfg.warmup_steps:
        return cfg.lr
    return warmup_cosine(step, cfg.warmup_steps, cfg.steps, peak=cfg.lr)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d warmed up as min(decay, (1 + step) / (10 + step))."""
    shared_ema_update(ema, model, min(decay, (1 + step) / (10 + step)), lerp=True)


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
    from torchvision.utils import save_image

    if images.shape[-1] < 64:  # small images: enlarge (nearest) so the grid can be looked at
        images = F.interpolate(images, scale_factor=math.ceil(64 / images.shape[-1]), mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    save_image(images, png, format="png", nrow=max(1, int(math.sqrt(len(images)))), padding=2, pad_value=1.0)
    write_atomic(path, png.getvalue())



# --- the training run -----------------------------------------------------------------------------------------------
def train_diffusion(cfg: DiffusionTrainConfig, command: str | None = None) -> Path:
    """Train (or resume) per cfg; write the EMA generator to cfg.out and return cfg.out. `command`: for the card.

    SIGTERM stops the run after the current step with a checkpoint, and a UserError that says how to resume."""
    with ExitStack() as stack:  # holds the claim on cfg.out (clsp.run_dir) until the run ends
        return _train(cfg, command, stack)


def _train(cfg: DiffusionTrainConfig, command: str | None, stack: ExitStack) -> Path:
    from tqdm.auto import tqdm

    from clsp.accelerator import SigtermFlag, any_process, fresh_accelerator
    from synth.models import save_generator

    cuda = torch.cuda.is_available()
    precision = ("bf16" if cuda else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = fresh_accelerator(cpu=not cuda, mixed_precision=precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} does not split over {world} processes: use a multiple of {world}")
    source = open_source(cfg.source, cfg.split, cfg.image_size)
    images_np, _, _ = load_arrays(source)  # (N, H, W, 3) uint8
    size = images_np.shape[1]
    if size % 2 ** (len(cfg.channels) - 1):
        raise UserError(f"{source.name} images are {size} px, not divisible by {2 ** (len(cfg.channels) - 1)} "
                        f"for a {len(cfg.channels)}-level UNet: pass --image-size or fewer channel levels")
    # the input is checked: claim the folder (nothing was written before this line)
    claim = stack.enter_context(prepare_run_dir(cfg.out, cfg.training_fields(), GENERATOR_RUN, cfg.resume,
                                                cfg.overwrite, accelerator))
    start = resume_step(cfg, claim, accelerator)
    if start < 0:
        accelerator.print(f"{cfg.out} already holds the finished generator for this config: nothing to do")
        return cfg.out
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(accelerator.device)  # (N, 3, H, W) uint8

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = build_unet(cfg, size)
    ema = copy.deepcopy(unet).requires_grad_(False).eval().to(accelerator.device)
    scheduler = build_scheduler(cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    if cfg.skip_dropout > 0:  # same weights, a forward that can drop skips; the saved generator is the plain UNet
        unet = SkipDropout(unet, cfg.skip_fill)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw = accelerator.unwrap_model(unet)
    raw = getattr(raw, "unet", raw)  # the UNet2DModel itself (checkpoints, EMA)
    state = {"loss": float("nan"), "wall_time_s": 0.0}
    if start > 0:
        state = load_checkpoint(checkpoint_dirs(cfg.out)[-1][1], raw, ema, optimizer)
        accelerator.print(f"resuming {cfg.out} from step {start}")
    if accelerator.is_main_process:
        append_log(cfg.out, [], truncate_after=start)

    bar = tqdm(total=cfg.steps, initial=start, disable=not accelerator.is_main_process, desc="diffusion train")
    stack.callback(bar.close)  # also on an error: its message then starts on a line of its own
    t0, window, log_rows, tick = time.perf_counter(), [], [], time.perf_counter()
    local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    unet.train()
    with SigtermFlag() as sigterm:
        for step in range(start, cfg.steps):
            g = step_generator(cfg.seed, step)  # the global batch: every rank draws it all and takes its slice
            index = torch.randint(len(images), (cfg.batch_size,), generator=g)[local]
            timesteps = torch.randint(cfg.train_timesteps, (cfg.batch_size,), generator=g)[local]
            noise = torch.randn((cfg.batch_size, 3, size, size), generator=g)[local]  # (b, 3, H, W)
            flip = (torch.rand(cfg.batch_size, generator=g) < 0.5)[local]
            keep = None  # drawn only when used, so runs without skip dropout keep their exact random stream
            if cfg.skip_dropout > 0:
                keep = (torch.rand(cfg.batch_size, generator=g) >= cfg.skip_dropout)[local].to(accelerator.device)
            x0 = images[index.to(images.device)].float() / 127.5 - 1  # (b, 3, H, W) in [-1, 1]
            if cfg.hflip:
                x0 = torch.where(flip.to(x0.device)[:, None, None, None], x0.flip(-1), x0)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            loss = diffusion_loss(unet, scheduler, x0, noise.to(x0.device), timesteps.to(x0.device), cfg.snr_gamma,
                                  keep)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, raw, cfg.ema_decay, step)
            window.append(loss.detach())
            done = step + 1
            scheduled = done % cfg.checkpoint_every == 0 or done == cfg.steps
            stop = any_process(accelerator, sigterm.raised)[0]  # every process stops after the same step
            if done % LOG_EVERY == 0 or scheduled or stop:
                mean = accelerator.reduce(torch.stack(window).mean(), "mean").item()
                now = time.perf_counter()
                log_rows.append({"step": done, "loss": f"{mean:.5f}", "lr": f"{lr_at(cfg, step):.3g}",
                                 "images_per_s": f"{len(window) * cfg.batch_size / (now - tick):.1f}"})
                state["loss"], window, tick = mean, [], now
                bar.set_postfix(loss=f"{mean:.4f}")
            bar.update(1)
            if scheduled or stop:
                if accelerator.is_main_process:
                    state["wall_time_s"] = state.get("wall_time_s", 0.0) + time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save_checkpoint(cfg.out, done, raw, ema, optimizer,
                                    {"loss": state["loss"], "wall_time_s": state["wall_time_s"]}, cfg.keep_checkpoints)
                    if scheduled:
                        save_grid(sample_grid(ema, scheduler, cfg.grid_size, cfg.sample_steps, cfg.seed),
                                  cfg.out / "samples" / f"{STEP_PREFIX}{done:06d}.png")
                    append_log(cfg.out, log_rows)
                    log_rows = []
                accelerator.wait_for_everyone()
            if stop:
                raise UserError(f"stopped by SIGTERM after step {done}; a checkpoint was saved in {cfg.out}: rerun "
                                f"the same command with --resume to continue")
    bar.close()

    if accelerator.is_main_process:
        card = {
            "model_id": f"clsp-ddpm-{cfg.source.partition(':')[0]}-{size}px",
            "command": command or "synth.diffusion_train.train_diffusion (Python API)",
            "seed": cfg.seed, "config": cfg.training_fields(),
            "source": {"spec": cfg.source, "split": cfg.split, "count": len(source),
                       "fingerprint": source.fingerprint()},
            "steps": cfg.steps, "final_loss": state["loss"], "wall_time_s": round(state["wall_time_s"], 1),
            "parameters": sum(p.numel() for p in ema.parameters()), "processes": world,
            "mixed_precision": precision, "package_versions": package_versions(),
            "machine": machine_info(accelerator.device),
        }
        save_generator(cfg.out, ema.cpu(), scheduler, card)
    accelerator.wait_for_everyone()
    return cfg.out


def machine_info(device: torch.device) -> dict:
    """Where the generator was trained (for its card): the float results, and so the weights, depend on it."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):  # the CPU model: its instruction set decides the rounding of float sums
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    cuda = device.type == "cuda"
    return {"os": platform.system(), "arch": platform.machine(), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if cuda else None}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from clsp import __version__

    found = {"clsp": __version__}  # the distribution is clsp-positives; the package and its version are clsp's
    for name in ("torch", "diffusers", "accelerate", "torchvision", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found

