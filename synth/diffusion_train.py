"""Train an unconditional DDPM (epsilon prediction, linear betas) on any data source, as CLSP trains one per dataset.

The data set is held in memory as a uint8 tensor (fine up to CIFAR size). Step `s` draws its batch, timesteps and noise
from a generator seeded by (seed, s) alone, and the learning rate is a function of `s`; dropout draws from torch's
global RNGs, seeded from (seed, rank) when a run begins, whose states each checkpoint holds. So two runs of one config
are the same run, a resumed run repeats an uninterrupted one exactly (on the same kind of device and number of
processes), and the global batch does not depend on the number of processes (each rank takes its slice).
Here: the config, the presets and the run's setup and finish; synth.diffusion_steps runs the steps, synth.ddpm holds
the model, the loss and the sample grids.

Output directory:
    train_config.json                   the record (clsp.run_dir): what was asked for, the source's fingerprint and the
                                        precision that runs; a resume must match it
    checkpoints/step-000500/            unet.safetensors, ema_unet.safetensors, state.pt (optimizer, step, loss, RNGs)
    samples/step-000500.png             DDIM sample grid of the EMA model from a fixed seed, one per checkpoint
    log.csv                             step, loss, lr, images_per_s
    unet/ scheduler/ model_index.json   the EMA generator (synth.models.save_generator), model_index.json last
"""
from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from clsp.errors import UserError
from clsp.hashing import keyed_seed
from clsp.run_dir import prepare_run_dir
from clsp.sources import SPLITS, load_arrays, open_source, refuse_out_inside
from clsp.synth.ddpm import build_scheduler, build_unet
from clsp.synth.diffusion_run_dir import (GENERATOR_RUN, append_log, checkpoint_dirs, load_checkpoint, restore_rng,
                                          resume_step)
from clsp.synth.diffusion_steps import Models, run_steps
from clsp.synth.provenance import machine_info, package_versions
from clsp.synth.unet_split import SkipDropout

RUN_OPTIONS = ("out", "resume", "overwrite")  # how to run, not what to train: may differ between a run and its resume
MIXED_PRECISION = ("auto", "no", "bf16")  # auto: bf16 on a GPU, no on the CPU
LR_SCHEDULES = ("constant", "cosine")


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
    # P(a row's below-full-resolution skips are replaced): > 0 makes the bottleneck carry shape
    skip_dropout: float = 0.0
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
        if self.seed < 0:
            problems.append(f"seed = {self.seed}: use a seed >= 0")
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
        refuse_out_inside(self.source, self.out)  # its sample grids would become training images

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


def train_diffusion(cfg: DiffusionTrainConfig, command: str | None = None) -> Path:
    """Train (or resume) per cfg; write the EMA generator to cfg.out and return cfg.out. `command`: for the card.

    SIGTERM stops the run after the current step with a checkpoint, and a UserError that says how to resume; after
    the last step it lets the generator be saved, and the run ends as usual."""
    with ExitStack() as stack:  # holds the claim on cfg.out (clsp.run_dir) until the run ends
        return _train(cfg, command, stack)


def _train(cfg: DiffusionTrainConfig, command: str | None, stack: ExitStack) -> Path:
    """Check the input, claim cfg.out, build (or resume) the models, run the steps, save the generator."""
    from clsp.accelerator import StopFlag, fresh_accelerator, say
    from clsp.synth.models import save_generator

    cuda = torch.cuda.is_available()
    precision = ("bf16" if cuda else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = fresh_accelerator(cpu=not cuda, mixed_precision=precision)
    source, images_np = _read_source(cfg, accelerator.num_processes)  # (N, H, W, 3) uint8
    size = images_np.shape[1]
    # What the options do not pin down: the data's content (folder:DIR may change under the same spec) and the
    # precision "auto" resolved to on this device. Either changes the weights, so a resume must match them too.
    resolved = {"source_fingerprint": source.fingerprint(), "resolved_mixed_precision": accelerator.mixed_precision}
    # A record written before these keys were recorded cannot say which data or precision its run used: it reads as
    # today's (not compared on them, so it resumes as before), and the record written back holds them from then on.
    kind = dataclasses.replace(GENERATOR_RUN, absent_means={**GENERATOR_RUN.absent_means, **resolved})
    # the input is checked: claim the folder (nothing was written before this line)
    claim = stack.enter_context(prepare_run_dir(cfg.out, {**cfg.training_fields(), **resolved}, kind, cfg.resume,
                                                cfg.overwrite, accelerator))
    start = resume_step(cfg, claim, accelerator)
    if start < 0:
        say(accelerator, f"{cfg.out} already holds the finished generator for this config: nothing to do")
        accelerator.wait_for_everyone()  # no process leaves while another is still in a collective
        return cfg.out
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(accelerator.device)  # (N, 3, H, W) uint8
    models, state = _build(cfg, size, start, accelerator)
    if accelerator.is_main_process:
        append_log(cfg.out, [], truncate_after=start)
    with StopFlag() as stop_flag:  # a stop while the generator is saved lets the save finish: the run is complete
        state = run_steps(cfg, start, images, models, state, accelerator, stack, stop_flag)
        if accelerator.is_main_process:
            card = _card(cfg, command, source, size, state, models.ema, accelerator, precision)
            save_generator(cfg.out, models.ema.cpu(), models.scheduler, card)
            say(accelerator, f"{cfg.out}: finished {cfg.steps} steps, final loss {state['loss']:.4f}; wrote the "
                             f"generator (unet/, scheduler/, card.json; the sample grids are in samples/)")
        accelerator.wait_for_everyone()
    return cfg.out


def _read_source(cfg: DiffusionTrainConfig, world: int):
    """The source and its images (N, H, W, 3) uint8, once the batch splits over `world` processes and the image size
    fits the UNet's levels."""
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} does not split over {world} processes: use a multiple of {world}")
    source = open_source(cfg.source, cfg.split, cfg.image_size)
    images_np, _, _ = load_arrays(source)  # (N, H, W, 3) uint8
    size = images_np.shape[1]
    if size % 2 ** (len(cfg.channels) - 1):
        raise UserError(f"{source.name} images are {size} px, not divisible by {2 ** (len(cfg.channels) - 1)} "
                        f"for a {len(cfg.channels)}-level UNet: pass --image-size or fewer channel levels")
    return source, images_np


def _build(cfg: DiffusionTrainConfig, size: int, start: int, accelerator) -> tuple[Models, dict]:
    """The UNet (initialised from cfg.seed, global RNG untouched), its EMA copy, schedule and optimiser, prepared; when
    resuming (start > 0) with the last checkpoint's weights. Returns them and the state (loss, wall_time_s)."""
    from clsp.accelerator import say

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
        path = checkpoint_dirs(cfg.out)[-1][1]
        state = load_checkpoint(path, raw, ema, optimizer)
        if not restore_rng(state.pop("rng", None), accelerator) and cfg.dropout > 0:  # still resumable: nothing lost
            say(accelerator, f"note: {path} holds no RNG state for this device and number of processes (written by "
                              f"an older clsp or elsewhere): dropout from step {start} on will differ from an "
                              f"uninterrupted run")
        say(accelerator, f"resuming {cfg.out} from step {start}")
    else:  # dropout draws from the global RNGs: a fresh run starts them from its seed, not from whatever ran before
        torch.manual_seed(keyed_seed("diffusion-dropout", cfg.seed, accelerator.process_index))
    return Models(unet, raw, ema, scheduler, optimizer), state


def _card(cfg: DiffusionTrainConfig, command: str | None, source, size: int, state: dict, ema, accelerator,
          precision: str) -> dict:
    """The generator's card: the config and source it was trained on, its result, and the packages and machine."""
    return {
        "model_id": f"clsp-ddpm-{cfg.source.partition(':')[0]}-{size}px",
        "command": command or "clsp.synth.diffusion_train.train_diffusion (Python API)",
        "seed": cfg.seed, "config": cfg.training_fields(),
        "source": {"spec": cfg.source, "split": cfg.split, "count": len(source),
                   "fingerprint": source.fingerprint()},
        "steps": cfg.steps, "final_loss": state["loss"], "wall_time_s": round(state["wall_time_s"], 1),
        "parameters": sum(p.numel() for p in ema.parameters()), "processes": accelerator.num_processes,
        "mixed_precision": precision, "package_versions": package_versions(),
        "machine": machine_info(accelerator.device),
    }
