"""The CLSP sampler: DDIM sampling whose UNet bottleneck is pulled towards a noised copy of the anchor.

Per DDIM timestep t (the paper's feature interpolation):
    a_t     = sqrt(abar_t) * anchor + sqrt(1 - abar_t) * n       n ~ N(0, I), fresh every step
    h,  s   = E(x_t, t);   h_a, _ = E(a_t, t)                      one encoder call on the (2B) concatenated batch
    eps     = D(w * h + (1 - w) * h_a, s, t)                       decoder once, on the sample's skips
    x_{t-1} = DDIM step(x_t, eps, t, eta)                          diffusers DDIMScheduler, our own variance noise
positive = clip(x_0, -1, 1).

A pure function of its inputs: all randomness comes from the RowNoise the caller passes (synth/noise.py), keyed on
(seed, anchor id, candidate, draw, step), so a row's output does not depend on the batch it is in, the batch size, the
rank or the device count. The draws are x_T, then per step the anchor noise and (when eta > 0) the variance noise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, UNet2DModel

from clsp.synth.models import as_ddim
from clsp.synth.noise import NOISE_KINDS, CounterNoise, RowNoise
from clsp.synth.unet_split import check_supported, decode, embed_time, encode

EpsFn = Callable[[UNet2DModel, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


# Every field of SamplerConfig is a `clsp synth run` option (synth/cli.py builds them from the class and this dict,
# without importing this module), is recorded in the manifest and is part of a run's resume identity (synth/job_setup.py
# records asdict(SamplerConfig)): a new sampler option is a field, its help line here, and its use below.
SAMPLER_HELP = {
    "w": "weight of the sample's own bottleneck, 0..1 (1 = plain DDIM, 0 = all anchor)",
    "steps": "DDIM steps",
    "eta": "DDIM eta, 0..1 (0 deterministic, 1 DDPM-like)",
    "share_anchor_noise": "the K candidates of an anchor share its noised copy "
                          "(one anchor-noise draw per anchor a step)",
    "noise": "generator of noise: counter (Philox on the device) or cpu-generator (per-row CPU generators, the "
             "generator of shards made before 0.2); a different generator gives different bytes from the same seed",
}


@dataclass(frozen=True)
class SamplerConfig:
    """The sampler's settings; each field's meaning is in SAMPLER_HELP."""

    w: float = 0.1
    steps: int = 100
    eta: float = 0.1
    share_anchor_noise: bool = False
    noise: str = "counter"

    def __post_init__(self) -> None:
        for name in ("w", "eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"sampler {name} must be a number in [0, 1], got {value!r}. Fix: pass e.g. "
                                 f"--{name} {SamplerConfig.__dataclass_fields__[name].default}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler steps must be an integer >= 1, got {self.steps!r}. Fix: pass e.g. --steps 100.")
        if not isinstance(self.share_anchor_noise, bool):
            raise ValueError(f"share_anchor_noise must be True or False, got {self.share_anchor_noise!r}.")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"sampler noise must be one of {', '.join(NOISE_KINDS)}, got {self.noise!r}.")

    def check_scheduler(self, scheduler) -> None:
        """steps must not exceed the timesteps the generator was trained with."""
        total = int(scheduler.config.num_train_timesteps)
        if self.steps > total:
            raise ValueError(f"sampler steps = {self.steps} exceeds the generator's num_train_timesteps = {total}. "
                             f"Fix: pass --steps {total} or fewer.")


def ddim_scheduler(scheduler, steps: int) -> DDIMScheduler:
    """A private DDIMScheduler (the caller's is not mutated) with `steps` timesteps; "linspace" spacing is replaced by
    "leading" (linspace is off by one step in diffusers' DDIM)."""
    config = dict(scheduler.config)
    if config.get("timestep_spacing") == "linspace":
        config["timestep_spacing"] = "leading"
    fresh = as_ddim(config)
    fresh.set_timesteps(steps)
    return fresh


def mixed_eps(unet: UNet2DModel, x: torch.Tensor, a_t: torch.Tensor, t: int, w: float,
              anchor_row: torch.Tensor) -> torch.Tensor:
    """Split-UNet noise prediction: encoder on [x; a_t] in one call, decoder once on the mixed bottleneck.

    x (B, C, H, W); a_t (A, C, H, W) noised anchors, A <= B (A < B when candidates share their anchor's noise, so the
    anchor's encoder pass runs once per anchor, not once per candidate); anchor_row (B,) long: row i uses
    a_t[anchor_row[i]].
    """
    b = x.shape[0]
    temb = embed_time(unet, t, b + a_t.shape[0])  # (B + A, D)
    h, skips = encode(unet, torch.cat([x, a_t]), t, temb=temb)  # h (B + A, C', h, w)
    h_mix = w * h[:b] + (1.0 - w) * h[b:][anchor_row]  # (B, C', h, w): sample's vs anchor's bottleneck
    return decode(unet, h_mix, tuple(s[:b] for s in skips), temb[:b], t)  # the anchor's skips are not used


def sample_positives(unet: UNet2DModel, scheduler, anchors: torch.Tensor, noise: RowNoise, config: SamplerConfig, *,
                     fast: bool = False) -> torch.Tensor:
    """anchors (B, C, H, W) in [-1, 1], one row per candidate -> positives (B, C, H, W) in [-1, 1] on the unet's device.

    noise: the rows' noise (synth.noise.row_noise: x_T, anchor and variance draws; rows of one anchor that share its
    anchor noise form one group, so keep an anchor's rows in one batch). fast: on CUDA, channels_last inputs and,
    for fp32 weights, bf16 autocast (no effect on the CPU's fp32 path). A UNet cast to bf16 runs in bf16 throughout;
    the DDIM update stays fp32 either way.
    """
    return _ddim_loop(mixed_eps, unet, scheduler, anchors, noise, config, fast)


def naive_reference(unet: UNet2DModel, scheduler, anchors: torch.Tensor, noise: RowNoise, config: SamplerConfig, *,
                    fast: bool = False) -> torch.Tensor:
    """Same result as sample_positives, computed the obvious way: two whole UNet passes per step (anchor, then sample),
    the bottleneck mixed by a forward hook on mid_block. The reference for tests and the bench."""
    if unet.mid_block is None:
        raise ValueError("naive_reference hooks mid_block, which this UNet does not have; use sample_positives")
    return _ddim_loop(_hooked_eps, unet, scheduler, anchors, noise, config, fast)


def _hooked_eps(unet: UNet2DModel, x: torch.Tensor, a_t: torch.Tensor, t: int, w: float,
                anchor_row: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append(output)

    def mix(module, args, output):
        return w * output + (1.0 - w) * captured[0][anchor_row]

    handle = unet.mid_block.register_forward_hook(capture)
    try:
        unet(a_t, t)  # whole pass; only its bottleneck is kept
    finally:
        handle.remove()
    handle = unet.mid_block.register_forward_hook(mix)
    try:
        return unet(x, t).sample
    finally:
        handle.remove()


def _ddim_loop(eps_fn: EpsFn, unet, scheduler, anchors, noise, config, fast):
    loop = DenoisingLoop.prepare(eps_fn, unet, scheduler, anchors, noise, config, fast)
    with torch.inference_mode():  # x_T too: compiled noise then runs the graphs of one grad mode only
        return loop.run(anchors.to(device=loop.device, dtype=torch.float32), noise)


@dataclass(frozen=True, eq=False)  # holds tensors and a module: compared by identity
class DenoisingLoop:
    """One batch layout's denoising loop, its checks done and its index tensors already on the device, so that run()
    neither reads anything back from the device nor copies anything onto it: each step is device work only, which a
    CUDA graph can capture whole (synth/cuda_graph.py)."""

    eps_fn: EpsFn
    unet: UNet2DModel
    sched: DDIMScheduler  # private, with config.steps timesteps and its alphas_cumprod on the device
    timesteps: tuple[int, ...]  # sched.timesteps, on the host
    config: SamplerConfig
    device: torch.device
    layout: torch.memory_format
    autocast: bool  # bf16 autocast around the UNet (CUDA, fp32 weights, fast)
    first_rows: torch.Tensor  # (A,) on the device: each anchor-noise group's first row
    anchor_row: torch.Tensor  # (B,) on the device: row -> its group

    @classmethod
    def prepare(cls, eps_fn: EpsFn, unet, scheduler, anchors, noise: RowNoise, config, fast) -> "DenoisingLoop":
        check_supported(unet)
        if not isinstance(config, SamplerConfig):
            raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
        config.check_scheduler(scheduler)
        check_batch(unet, anchors, noise, config)
        sched = ddim_scheduler(scheduler, config.steps)
        device = unet.conv_in.weight.device
        sched.alphas_cumprod = sched.alphas_cumprod.to(device)  # what add_noise would copy over at its first call
        noise.to_device(device)  # the counter noise's keys
        use_fast = fast and device.type == "cuda"
        first: dict[int, int] = {}  # group -> its first row; one noised anchor per group (per row, or per anchor)
        for row, group in enumerate(noise.anchor_row.tolist()):
            first.setdefault(group, row)
        return cls(eps_fn, unet, sched, tuple(sched.timesteps.tolist()), config, device,
                   torch.channels_last if use_fast else torch.contiguous_format,
                   # autocast for fp32 weights only: a UNet already in bf16 takes bf16 inputs (_model_input) and keeps
                   # its GroupNorm and SiLU in bf16, where autocast would run them in fp32 and cast every
                   # convolution's input back
                   use_fast and unet.dtype == torch.float32,
                   torch.tensor([first[g] for g in range(len(first))], device=device),
                   noise.anchor_row.to(device))

    def run(self, anchors: torch.Tensor, noise: RowNoise) -> torch.Tensor:
        """anchors (B, C, H, W) fp32 on the device -> positives (B, C, H, W) in [-1, 1]; call in inference mode."""
        row_shape, groups, w = tuple(anchors.shape[1:]), len(self.first_rows), self.config.w
        # the cast weights are not cached: a CUDA graph may not capture autocast's cache (torch.cuda.graph's notes),
        # and each step's context casts every weight once anyway
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.autocast
                    else contextlib.nullcontext())
        x = noise.start(row_shape, self.device).to(torch.float32)  # (B, C, H, W) x_T; scheduler maths stays fp32
        for i, t in enumerate(self.timesteps):
            a_noise = noise.anchor(i, row_shape, self.device)  # (A, C, H, W)
            # t filled on the device: add_noise would copy CPU timesteps over, a copy that waits for the GPU
            a_t = self.sched.add_noise(anchors[self.first_rows], a_noise,
                                       torch.full((groups,), t, dtype=torch.long, device=self.device))
            with autocast:  # a_t: (A, C, H, W), the anchors noised to t
                eps = self.eps_fn(self.unet, _model_input(x, self.unet, self.layout),
                                  _model_input(a_t, self.unet, self.layout), t, w, self.anchor_row)
            variance_noise = noise.variance(i, row_shape, self.device) if self.config.eta > 0 else None
            x = self.sched.step(eps.float(), t, x, eta=self.config.eta, variance_noise=variance_noise).prev_sample
        return x.clamp(-1.0, 1.0)


def _model_input(x: torch.Tensor, unet: UNet2DModel, layout: torch.memory_format) -> torch.Tensor:
    return x.to(dtype=unet.dtype).contiguous(memory_format=layout)


def check_batch(unet, anchors: torch.Tensor, noise: RowNoise, config: SamplerConfig) -> None:
    """The sampler's inputs: anchors (B, C, H, W) in [-1, 1] for this UNet, one noise row per anchor row from the
    config's generator of noise, and anchor noise shared only among the candidates of one anchor."""
    if anchors.ndim != 4 or anchors.shape[1] != unet.config.in_channels:
        raise ValueError(f"anchors must be (B, {unet.config.in_channels}, H, W) for this generator, got "
                         f"{tuple(anchors.shape)}")
    if noise.rows != anchors.shape[0]:
        raise ValueError(f"need the noise of one row per anchor row: noise for {noise.rows} rows, {anchors.shape[0]} "
                         "anchor rows (repeat each anchor K times)")
    if isinstance(noise, CounterNoise) != (config.noise == "counter"):
        raise ValueError(f"the noise passed ({type(noise).__name__}) is not the config's generator of noise "
                         f"{config.noise!r}: build it with synth.noise.row_noise(config.noise, ...)")
    lo, hi = float(anchors.min()), float(anchors.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"anchors must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]. Fix: pass "
                         "uint8 images as x / 127.5 - 1.")
    rows_of = {}
    for row, group in enumerate(noise.anchor_row.tolist()):
        rows_of.setdefault(group, []).append(row)
    for rows in rows_of.values():
        if len(rows) > 1 and not config.share_anchor_noise:
            raise ValueError(f"rows {rows} share anchor noise but share_anchor_noise is off. Fix: give each row its "
                             "own anchor noise, or set share_anchor_noise=True.")
        if any(not torch.equal(anchors[rows[0]], anchors[r]) for r in rows[1:]):
            raise ValueError(f"rows {rows} share anchor noise but have different anchors: only the candidates of one "
                             "anchor may share anchor noise")
