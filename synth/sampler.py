"""The CLSP sampler: DDIM sampling whose UNet bottleneck is pulled towards a noised copy of the anchor.

Per DDIM timestep t (method.md):
    a_t     = sqrt(abar_t) * anchor + sqrt(1 - abar_t) * n       n ~ N(0, I), fresh every step
    h,  s   = E(x_t, t);   h_a, _ = E(a_t, t)                      one encoder call on the (2B) concatenated batch
    eps     = D(w * h + (1 - w) * h_a, s, t)                       decoder once, on the sample's skips
    x_{t-1} = DDIM step(x_t, eps, t, eta)                          diffusers DDIMScheduler, our own variance noise
positive = clip(x_0, -1, 1).

A pure function of its inputs: all randomness comes from the per-row CPU generators the caller passes, drawn in a
fixed order, so a row's output does not depend on the batch it is in, the batch size, the rank or the device count.
Per row generator, the draws are: [x_T, if made with `start_noise`], then per step: anchor noise (only when no
anchor_generators are given), variance noise (only when eta > 0).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, UNet2DModel

from clsp.hashing import keyed_seed
from synth.models import as_ddim
from synth.unet_split import check_supported, decode, embed_time, encode

EpsFn = Callable[[UNet2DModel, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


# Every field of SamplerConfig is a `clsp synth run` option (synth/cli.py builds them from the class and this dict,
# without importing this module), is recorded in the manifest and is part of a run's resume identity (synth/job.py
# records asdict(SamplerConfig)): a new sampler option is a field, its help line here, and its use below.
SAMPLER_HELP = {
    "w": "weight of the sample's own bottleneck, 0..1 (1 = plain DDIM, 0 = all anchor)",
    "steps": "DDIM steps",
    "eta": "DDIM eta, 0..1 (0 deterministic, 1 DDPM-like)",
    "share_anchor_noise": "the K candidates of an anchor share its noised copy (one anchor-noise draw per anchor a step)",
}


@dataclass(frozen=True)
class SamplerConfig:
    """The sampler's settings; each field's meaning is in SAMPLER_HELP."""

    w: float = 0.1
    steps: int = 100
    eta: float = 0.1
    share_anchor_noise: bool = False

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

    def check_scheduler(self, scheduler) -> None:
        """steps must not exceed the timesteps the generator was trained with."""
        total = int(scheduler.config.num_train_timesteps)
        if self.steps > total:
            raise ValueError(f"sampler steps = {self.steps} exceeds the generator's num_train_timesteps = {total}. "
                             f"Fix: pass --steps {total} or fewer.")


def candidate_seed(seed: int, anchor_id: str, candidate: int | str) -> int:
    """63-bit seed keyed on (run seed, anchor id, candidate): independent of rank, batch and world size."""
    if not isinstance(anchor_id, str) or not anchor_id:
        raise ValueError(f"anchor_id must be a non-empty string, got {anchor_id!r}")
    return keyed_seed("clsp", int(seed), anchor_id, candidate)


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded (e.g. with candidate_seed)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def draw_rows(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One N(0, I) draw of `shape` per generator, in row order, on the CPU -> (B, *shape) float32."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def start_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """x_T for each row: its generator's first draw -> (B, *shape) on the CPU."""
    return draw_rows(generators, shape)


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
    anchor's encoder pass runs once per anchor, not once per candidate); anchor_row (B,) long: row i uses a_t[anchor_row[i]].
    """
    b = x.shape[0]
    temb = embed_time(unet, t, b + a_t.shape[0])  # (B + A, D)
    h, skips = encode(unet, torch.cat([x, a_t]), t, temb=temb)  # h (B + A, C', h, w)
    h_mix = w * h[:b] + (1.0 - w) * h[b:][anchor_row]  # (B, C', h, w): sample's vs anchor's bottleneck
    return decode(unet, h_mix, tuple(s[:b] for s in skips), temb[:b], t)  # the anchor's skips are not used


def sample_positives(
    unet: UNet2DModel,
    scheduler,
    x_T: torch.Tensor,
    anchors: torch.Tensor,
    generators: list[torch.Generator],
    config: SamplerConfig,
    anchor_generators: list[torch.Generator] | None = None,
    *,
    fast: bool = False,
) -> torch.Tensor:
    """x_T (B, C, H, W), anchors (B, C, H, W) in [-1, 1] -> positives (B, C, H, W) in [-1, 1] on the unet's device.

    generators: one CPU generator per row. anchor_generators: optional, one per row; with share_anchor_noise, the rows
    of one anchor share ONE generator object and get the same anchor noise (one draw per group per step; keep a group
    in one batch). fast: on CUDA, bf16 autocast and channels_last inputs (no effect on the CPU's fp32 path).
    """
    return _ddim_loop(mixed_eps, unet, scheduler, x_T, anchors, generators, config, anchor_generators, fast)


def naive_reference(
    unet: UNet2DModel,
    scheduler,
    x_T: torch.Tensor,
    anchors: torch.Tensor,
    generators: list[torch.Generator],
    config: SamplerConfig,
    anchor_generators: list[torch.Generator] | None = None,
    *,
    fast: bool = False,
) -> torch.Tensor:
    """Same result as sample_positives, computed the obvious way: two whole UNet passes per step (anchor, then sample),
    the bottleneck mixed by a forward hook on mid_block. The reference for tests and the bench."""
    if unet.mid_block is None:
        raise ValueError("naive_reference hooks mid_block, which this UNet does not have; use sample_positives")
    return _ddim_loop(_hooked_eps, unet, scheduler, x_T, anchors, generators, config, anchor_generators, fast)


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


def _ddim_loop(eps_fn: EpsFn, unet, scheduler, x_T, anchors, generators, config, anchor_generators, fast):
    check_supported(unet)
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
    config.check_scheduler(scheduler)
    _check_batch(unet, x_T, anchors, generators)
    groups = _anchor_noise_groups(generators, anchor_generators, anchors, config.share_anchor_noise)
    sched = ddim_scheduler(scheduler, config.steps)
    device = unet.conv_in.weight.device
    use_fast = fast and device.type == "cuda"
    layout = torch.channels_last if use_fast else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_fast else contextlib.nullcontext()
    b, row_shape = x_T.shape[0], tuple(x_T.shape[1:])
    # one noised anchor per noise group: per row normally, per anchor when its candidates share the anchor noise
    first_rows = torch.tensor([rows[0] for _, rows in groups])  # (A,)
    anchor_row = torch.empty(b, dtype=torch.long)  # (B,): row -> its group
    for index, (_, rows) in enumerate(groups):
        anchor_row[rows] = index
    anchor_row = anchor_row.to(device)

    x = x_T.to(device=device, dtype=torch.float32)  # (B, C, H, W); scheduler maths stays fp32
    anchors = anchors.to(device=device, dtype=torch.float32)
    with torch.inference_mode():
        for t in sched.timesteps.tolist():
            noise = _draw_groups(groups, row_shape).to(device)  # (A, C, H, W)
            a_t = sched.add_noise(anchors[first_rows], noise, torch.full((len(groups),), t, dtype=torch.long))
            with autocast:  # a_t: (A, C, H, W), the anchors noised to t
                eps = eps_fn(unet, _model_input(x, unet, layout), _model_input(a_t, unet, layout), t, config.w,
                             anchor_row)
            variance_noise = draw_rows(generators, row_shape).to(device) if config.eta > 0 else None
            x = sched.step(eps.float(), t, x, eta=config.eta, variance_noise=variance_noise).prev_sample
    return x.clamp(-1.0, 1.0)


def _model_input(x: torch.Tensor, unet: UNet2DModel, layout: torch.memory_format) -> torch.Tensor:
    return x.to(dtype=unet.dtype).contiguous(memory_format=layout)


def _check_batch(unet, x_T, anchors, generators) -> None:
    if x_T.ndim != 4 or x_T.shape[1] != unet.config.in_channels:
        raise ValueError(f"x_T must be (B, {unet.config.in_channels}, H, W) for this generator, got "
                         f"{tuple(x_T.shape)}")
    if anchors.shape != x_T.shape:
        raise ValueError(f"anchors {tuple(anchors.shape)} and x_T {tuple(x_T.shape)} must have the same shape: one "
                         "anchor row per candidate row (repeat each anchor K times)")
    if len(generators) != x_T.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} generators for {x_T.shape[0]} rows")
    if any(g.device.type != "cpu" for g in generators):
        raise ValueError("generators must be CPU torch.Generator objects (noise is drawn on the CPU, then moved)")
    lo, hi = float(anchors.min()), float(anchors.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"anchors must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]. Fix: pass "
                         "uint8 images as x / 127.5 - 1.")


def _anchor_noise_groups(generators, anchor_generators, anchors, share: bool):
    """[(generator, row indices)] in draw order: each group gets one anchor-noise draw per step."""
    if anchor_generators is None:
        if share:
            raise ValueError("share_anchor_noise needs anchor_generators: one per row, the rows of one anchor sharing "
                             "one generator object (e.g. seeded with candidate_seed(seed, anchor_id, 'anchor'))")
        return [(g, [i]) for i, g in enumerate(generators)]
    if len(anchor_generators) != len(generators):
        raise ValueError(f"need one anchor generator per row: {len(anchor_generators)} for {len(generators)} rows")
    if any(g.device.type != "cpu" for g in anchor_generators):
        raise ValueError("anchor_generators must be CPU torch.Generator objects")
    groups: dict[int, tuple[torch.Generator, list[int]]] = {}
    for i, g in enumerate(anchor_generators):
        groups.setdefault(id(g), (g, []))[1].append(i)
    for g, rows in groups.values():
        if len(rows) > 1 and not share:
            raise ValueError(f"rows {rows} share one anchor generator but share_anchor_noise is off. Fix: give each "
                             "row its own generator, or set share_anchor_noise=True.")
        if any(not torch.equal(anchors[rows[0]], anchors[r]) for r in rows[1:]):
            raise ValueError(f"rows {rows} share an anchor generator but have different anchors: only the candidates "
                             "of one anchor may share anchor noise")
    return list(groups.values())


def _draw_groups(groups, row_shape: tuple[int, ...]) -> torch.Tensor:
    """One anchor-noise draw per group, in group order -> (A, C, H, W) on the CPU."""
    return torch.stack([torch.randn(row_shape, generator=g) for g, _ in groups])
