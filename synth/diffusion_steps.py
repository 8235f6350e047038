"""The steps of a generator run: each step's random draws, learning rate, optimiser and EMA update, the log rows, and
the checkpoints with their sample grids, until cfg.steps or SIGTERM."""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, UNet2DModel

from clsp.ema import ema_update as shared_ema_update
from clsp.errors import UserError
from clsp.hashing import keyed_seed
from clsp.schedules import warmup_cosine
from clsp.synth.ddpm import diffusion_loss, sample_grid, save_grid
from clsp.synth.diffusion_run_dir import STEP_PREFIX, append_log, rng_states, save_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

    from clsp.accelerator import StopFlag
    from clsp.synth.diffusion_train import DiffusionTrainConfig

LOG_EVERY = 25  # steps per log.csv row


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


@dataclass
class Models:
    """What a run trains. `unet` is what a step calls (prepared; a SkipDropout when cfg.skip_dropout > 0), `raw` the
    UNet2DModel itself (checkpoints, EMA), `ema` its EMA copy (the saved generator)."""

    unet: torch.nn.Module
    raw: UNet2DModel
    ema: UNet2DModel
    scheduler: DDIMScheduler
    optimizer: torch.optim.Optimizer


def draw_batch(cfg: DiffusionTrainConfig, step: int, images: torch.Tensor, local: slice, device: torch.device):
    """This process's slice of the step's batch from `images` (N, 3, H, W) uint8: x0 (b, 3, H, W) in [-1, 1], noise
    (b, 3, H, W), timesteps (b,) and the skip-dropout keep mask (b,) bool, or None when skip dropout is off."""
    size = images.shape[2]
    g = step_generator(cfg.seed, step)  # the global batch: every rank draws it all and takes its slice
    index = torch.randint(len(images), (cfg.batch_size,), generator=g)[local]
    timesteps = torch.randint(cfg.train_timesteps, (cfg.batch_size,), generator=g)[local]
    noise = torch.randn((cfg.batch_size, 3, size, size), generator=g)[local]  # (b, 3, H, W)
    flip = (torch.rand(cfg.batch_size, generator=g) < 0.5)[local]
    keep = None  # drawn only when used, so runs without skip dropout keep their exact random stream
    if cfg.skip_dropout > 0:
        keep = (torch.rand(cfg.batch_size, generator=g) >= cfg.skip_dropout)[local].to(device)
    x0 = images[index.to(images.device)].float() / 127.5 - 1  # (b, 3, H, W) in [-1, 1]
    if cfg.hflip:
        x0 = torch.where(flip.to(x0.device)[:, None, None, None], x0.flip(-1), x0)
    return x0, noise, timesteps, keep


def train_step(cfg: DiffusionTrainConfig, step: int, models: Models, batch: tuple, accelerator: Accelerator):
    """One optimiser step on `batch` (draw_batch's) at lr_at(step), then the EMA update; returns the loss."""
    x0, noise, timesteps, keep = batch
    for group in models.optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss = diffusion_loss(models.unet, models.scheduler, x0, noise.to(x0.device), timesteps.to(x0.device),
                          cfg.snr_gamma, keep)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(models.unet.parameters(), cfg.grad_clip)
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)
    ema_update(models.ema, models.raw, cfg.ema_decay, step)
    return loss


class _Progress:
    """The losses since the last log row, the rows log.csv has yet to get, and `state` (loss, wall_time_s)."""

    def __init__(self, state: dict, device: torch.device):
        self.state = state
        window = state.pop("window", None)  # resumed after a stop: (steps since the last row,) losses (see `held`)
        self.window = [] if window is None else list(window.to(device))
        self.timed = 0  # steps of the window taken since `tick` (a resumed window's were timed by the run before)
        self.t0, self.rows, self.tick = time.perf_counter(), [], time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.window.append(loss.detach())
        self.timed += 1

    def held(self, accelerator: Accelerator) -> torch.Tensor:
        """(steps since the last row,) each one's loss, its mean over the processes (every process calls this): what
        a checkpoint keeps, so that a run stopped between rows and resumed logs the rows an uninterrupted one does."""
        if not self.window:
            return torch.zeros(0)
        return accelerator.reduce(torch.stack(self.window), "mean").cpu()

    def log_row(self, cfg: DiffusionTrainConfig, step: int, accelerator: Accelerator) -> float:
        """A row for log.csv from the window (its mean over the processes), which it empties; returns that mean."""
        mean = accelerator.reduce(torch.stack(self.window).mean(), "mean").item()
        now = time.perf_counter()
        self.rows.append({"step": step + 1, "loss": f"{mean:.5f}", "lr": f"{lr_at(cfg, step):.3g}",
                          "images_per_s": f"{self.timed * cfg.batch_size / (now - self.tick):.1f}"})
        self.state["loss"], self.window, self.timed, self.tick = mean, [], 0, now
        return mean

    def checkpoint(self, cfg: DiffusionTrainConfig, done: int, models: Models, grid: bool, rng: dict,
                   window: torch.Tensor) -> None:
        """(Main process) a sample grid when `grid`, the rows to log.csv, then the checkpoint after `done` steps with
        `rng` (rng_states). In this order a kill never leaves a checkpoint without its grid and rows; one before the
        checkpoint is harmless: the resume goes on from the one before, drops the log's rows past it and draws the
        same grid again."""
        self.state["wall_time_s"] = self.state.get("wall_time_s", 0.0) + time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        if grid:
            save_grid(sample_grid(models.ema, models.scheduler, cfg.grid_size, cfg.sample_steps, cfg.seed),
                      cfg.out / "samples" / f"{STEP_PREFIX}{done:06d}.png")
        append_log(cfg.out, self.rows)
        self.rows = []
        save_checkpoint(cfg.out, done, models.raw, models.ema, models.optimizer,
                        {"loss": self.state["loss"], "wall_time_s": self.state["wall_time_s"], "rng": rng,
                         "window": window},  # the losses since the last row: a resume goes on with them
                        cfg.keep_checkpoints)


def run_steps(cfg: DiffusionTrainConfig, start: int, images: torch.Tensor, models: Models, state: dict,
              accelerator: Accelerator, stack: ExitStack, stop_flag: StopFlag) -> dict:
    """Steps start .. cfg.steps - 1 on `images` (N, 3, H, W) uint8; returns `state` (loss, wall_time_s) at the end.

    `stop_flag` (entered by the caller): SIGTERM or Ctrl-C stops the run after the current step with a checkpoint,
    and a UserError that says how to resume; after the last step the run just ends (its caller saves the generator)."""
    from tqdm.auto import tqdm

    from clsp.accelerator import any_process

    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(total=cfg.steps, initial=start, disable=not accelerator.is_main_process, desc="diffusion train")
    stack.callback(bar.close)  # also on an error: its message then starts on a line of its own
    progress = _Progress(state, accelerator.device)
    local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    models.unet.train()
    for step in range(start, cfg.steps):
        loss = train_step(cfg, step, models, draw_batch(cfg, step, images, local, accelerator.device), accelerator)
        progress.add(loss)
        done = step + 1
        scheduled = done % cfg.checkpoint_every == 0 or done == cfg.steps
        stop = any_process(accelerator, stop_flag.raised)[0]  # every process stops after the same step
        if done % LOG_EVERY == 0 or scheduled:  # not on a stop: its window goes into the checkpoint
            bar.set_postfix(loss=f"{progress.log_row(cfg, step, accelerator):.4f}", refresh=False)
        bar.update(1)
        if scheduled or stop:
            rng = rng_states(accelerator)  # what dropout draws from next: a resume goes on from the same state
            window = progress.held(accelerator)  # empty but after a stop between rows
            if accelerator.is_main_process:
                progress.checkpoint(cfg, done, models, grid=scheduled, rng=rng, window=window)
            accelerator.wait_for_everyone()
        if stop and done < cfg.steps:  # after the last step the run is complete: its generator is saved
            raise UserError(f"stopped by {stop_flag.by or 'a stop signal to another process'} after step {done}; "
                            f"a checkpoint was saved in {cfg.out}: rerun "
                            f"the same command with --resume to continue")
    bar.close()
    return progress.state
