"""Benchmark the CLSP sampler in one run, on one model, with the same inputs:

  split      ours: one encoder call on [samples; noised anchors], the decoder on the samples only, counter noise on the
             device, bf16 on a GPU (the job's settings)
  cpu-noise  the same with the per-row CPU generators of noise ("cpu-generator"): what the counter noise saves
  naive      our reference: two whole UNet passes per step, the bottleneck mixed by a hook (tests' ground truth)
  authors    the authors' published recipe, from the paper and their README: fp32, the encoder run on the sample and
             on the anchor, the decoder on the sample only, noise from torch.randn on the device (DataParallel, which on
             one device calls the model directly)
  shared     split with --share-anchor-noise: one anchor encoder pass per anchor instead of per candidate
  bf16-weights  (CUDA) split on the UNet cast to bf16, no autocast: GroupNorm and SiLU in bf16, no casts per step
  graphed    (CUDA) split with its whole denoising loop captured once as a CUDA graph and replayed
             (synth/cuda_graph.py): no launch cost on the host; its positives are compared with split's

    python -m clsp.synth.bench                                   # small UNet, few steps: about 1-2 min on 2 CPU cores
    python -m clsp.synth.bench --model ddpm-cifar10 --device cuda --steps 100 --batch 1024 --k 8 --compile \
        --out bench/results/sampler-h100.json

It also counts what one step launches (CUDA kernels on a GPU, aten ops on the CPU): the host's share of a step, which
is what CUDA graphs would remove. Weights are random (the speed does not depend on them; the diversity figures only
compare the two anchor-noise options with each other).

With --compile every variant runs the UNet's compiled blocks (the authors' recipe too), each on graphs made for its own
batch shapes, as the job's are (static): the variants call the encoder on 2B, B + A or B rows, and graphs made dynamic
to serve them all would time the split on other kernels than the job's. A variant other than split and naive that fails
in its warm-up is left out and named under "failed" in the results, so that one failure does not cost the whole run;
--skip leaves variants out from the start (a shorter run). Progress lines with the time so far go to stderr.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import typer
from torch.utils.flop_counter import FlopCounterMode

from clsp.bench import (DEVICE, OUT, REPEATS, THREADS, best_of, launch_unit, launches, on_cuda, peak_bf16_flops,
                        provenance, set_threads, write_results)
from clsp.synth.cuda_graph import GraphedSampler
from clsp.synth.job_setup import compiled_as_the_job_runs, prepare_unet
from clsp.synth.noise import row_noise
from clsp.synth.sampler import SamplerConfig, ddim_scheduler, mixed_eps, naive_reference, sample_positives
from clsp.synth.unet_split import decode, embed_time, encode
from clsp.vocabulary import CPU_COMPILE_REFUSED
from clsp.synth.untrained_unets import ddpm_cifar10_scheduler, ddpm_cifar10_unet, tiny_unet

MODELS = ("small", "ddpm-cifar10")
VARIANTS = ("split", "cpu-noise", "naive", "authors", "shared", "bf16-weights", "graphed")  # the last two: CUDA
REQUIRED = ("split", "naive")  # every figure is relative to these two; another variant may fail and be left out


@dataclass(frozen=True)
class BenchConfig:
    model: str = "small"
    steps: int | None = None  # None: 10 on the CPU, 100 (the paper's) on CUDA
    batch: int | None = None  # rows = anchors x k; None: 16 on the CPU, 1024 on CUDA
    k: int = 4  # candidates per anchor
    w: float = 0.1
    eta: float = 0.1
    device: str = "cpu"
    compile: bool = False
    fast: bool = True  # bf16 autocast on CUDA, as the job's default (no effect on the CPU)
    repeats: int = 2
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    out: str | None = None
    skip: tuple[str, ...] = ()  # variants left out (never split or naive): a shorter run, e.g. a compiled one

    def __post_init__(self) -> None:
        optional = [name for name in VARIANTS if name not in REQUIRED]
        if not set(self.skip) <= set(optional):
            raise ValueError(f"--skip takes variants among {', '.join(optional)}, got {', '.join(self.skip)}")
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {MODELS}, got {self.model!r}")
        if self.k < 2:
            raise ValueError(f"--k must be >= 2 (diversity is measured among an anchor's candidates), got {self.k}")
        if self.batch is not None and (self.batch < self.k or self.batch % self.k):
            raise ValueError(f"--batch must be a positive multiple of --k = {self.k}, got {self.batch}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {self.threads}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for but torch sees no CUDA device. Fix: use --device cpu.")
        if self.compile and not self.device.startswith("cuda"):
            raise ValueError(CPU_COMPILE_REFUSED)
        SamplerConfig(w=self.w, eta=self.eta)  # same validation as the sampler's

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def resolved(self) -> tuple[int, int]:
        """(steps, batch) with the device defaults filled in."""
        steps = self.steps or (100 if self.on_cuda else 10)
        batch = self.batch or (1024 if self.on_cuda else 16)
        return steps, batch


def build_model(name: str):
    """(unet, scheduler) with random weights; `small` is about the size of an embedded-preset generator."""
    if name == "ddpm-cifar10":
        return ddpm_cifar10_unet(), ddpm_cifar10_scheduler()
    unet = tiny_unet(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                     attention_head_dim=32)
    return unet, ddpm_cifar10_scheduler()


def mean_pairwise_l2(images: torch.Tensor, k: int) -> float:
    """Mean L2 distance between the K candidates of each anchor (rows grouped by anchor): (B, C, H, W) -> float."""
    groups = images.float().cpu().flatten(1).reshape(-1, k, images[0].numel())  # (A, K, C*H*W)
    dist = torch.cdist(groups, groups)  # (A, K, K)
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    return float(dist[:, off_diagonal].mean())


def authors_recipe(unet, scheduler, anchors: torch.Tensor, config: SamplerConfig, generator: torch.Generator):
    """The authors' sampling recipe as their paper and README describe it (the reference column): fp32 throughout,
    the encoder run on the sample and, separately, on the noised anchor, the decoder on the sample only, the noise
    drawn batch-wise from one device generator. anchors (B, C, H, W) in [-1, 1] -> (B, C, H, W)."""
    sched = ddim_scheduler(scheduler, config.steps)
    device = unet.conv_in.weight.device
    anchors = anchors.to(device)
    x = torch.randn(anchors.shape, generator=generator, device=device)  # (B, C, H, W)
    with torch.inference_mode():
        for t in sched.timesteps.tolist():
            noise = torch.randn(anchors.shape, generator=generator, device=device)
            a_t = sched.add_noise(anchors, noise, torch.full((len(anchors),), t, dtype=torch.long,
                                                               device=device))
            temb = embed_time(unet, t, len(anchors))
            h, skips = encode(unet, x, t, temb=temb)  # the sample's bottleneck and skips
            h_anchor, _ = encode(unet, a_t, t, temb=temb)  # the anchor's bottleneck (its skips unused)
            eps = decode(unet, config.w * h + (1.0 - config.w) * h_anchor, skips, temb, t)
            variance = torch.randn(anchors.shape, generator=generator, device=device) if config.eta > 0 else None
            x = sched.step(eps, t, x, eta=config.eta, variance_noise=variance).prev_sample
    return x.clamp(-1.0, 1.0)


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _recompile_limit_hits() -> int:
    """How often dynamo refused a graph for hitting its recompile limit (a block then runs eagerly for that call's
    shapes and state, which a compiled column must not hide); torch 2.x counts it among its "unimplemented" reasons."""
    from torch._dynamo.utils import counters

    return sum(count for reason, count in counters["unimplemented"].items()
               if re.search(r"recompile.limit|cache.size.limit", str(reason), re.IGNORECASE))


def _progress(start: float, what: str) -> None:
    """A line on stderr per phase, so that a run stopped at a time limit says where it was."""
    print(f"[{time.perf_counter() - start:6.1f} s] {what}", file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig) -> dict:
    with compiled_as_the_job_runs() if cfg.compile else contextlib.nullcontext():
        return _measure(cfg)


def _measure(cfg: BenchConfig) -> dict:
    started = time.perf_counter()
    steps, batch = cfg.resolved()
    set_threads(cfg.threads)
    device = torch.device(cfg.device)
    graphs_before, hits_before = (_dynamo_graphs(), _recompile_limit_hits()) if cfg.compile else (0, 0)
    unet, scheduler = build_model(cfg.model)
    weights_bf16 = None  # on CUDA: the same UNet cast to bf16, sampled without autocast ("bf16-weights")
    if cfg.on_cuda and cfg.fast and "bf16-weights" not in cfg.skip:
        weights_bf16 = prepare_unet(copy.deepcopy(unet).to(torch.bfloat16).eval(), device, cfg.compile)
    unet = prepare_unet(unet.eval(), device, cfg.compile)  # as the job places and compiles it
    size, channels = unet.config.sample_size, unet.config.in_channels
    shape = (channels, size, size)
    anchor_ids = [f"a{i}" for i in range(batch // cfg.k)]
    one_each = torch.rand((len(anchor_ids), *shape), generator=torch.Generator().manual_seed(cfg.seed)) * 2 - 1
    anchors = one_each.repeat_interleave(cfg.k, dim=0)  # (B, C, H, W): each anchor K times in a row
    sampler = SamplerConfig(w=cfg.w, steps=steps, eta=cfg.eta)
    configs = {"split": sampler, "cpu-noise": replace(sampler, noise="cpu-generator"), "naive": sampler,
               "authors": sampler, "shared": replace(sampler, share_anchor_noise=True)}
    if weights_bf16 is not None:
        configs["bf16-weights"] = sampler
    if cfg.on_cuda:
        configs["graphed"] = sampler
    configs = {name: config for name, config in configs.items() if name not in cfg.skip}
    functions = {"naive": naive_reference}
    graphs: dict[int, GraphedSampler] = {}  # steps -> the graph captured for them, at the first call

    def variant(name: str, config: SamplerConfig):
        if name == "graphed":
            return lambda: graphed(config)
        if name == "authors":  # fp32, its own device generator, re-seeded each call
            generator = torch.Generator(device).manual_seed(cfg.seed)
            return lambda: authors_recipe(unet, scheduler, anchors, config, generator.manual_seed(cfg.seed))
        fn = functions.get(name, sample_positives)
        model = weights_bf16 if name == "bf16-weights" else unet
        backend = "inductor" if cfg.compile else None  # compiled noise beside the compiled UNet, as the job does
        return lambda: fn(model, scheduler, anchors, row_noise(config.noise, cfg.seed, anchor_ids, cfg.k,
                                                              config.share_anchor_noise, backend),
                          config, fast=cfg.fast)

    def graphed(config: SamplerConfig):
        noise = row_noise(config.noise, cfg.seed, anchor_ids, cfg.k, config.share_anchor_noise,
                          "inductor" if cfg.compile else None)
        if config.steps not in graphs:
            graphs[config.steps] = GraphedSampler(unet, scheduler, anchors, noise, config, fast=cfg.fast)
        return graphs[config.steps](anchors, noise)

    _progress(started, f"warm-up of {', '.join(configs)}" + (" (compiling the UNet's blocks)" * cfg.compile))
    warm_start = time.perf_counter()
    # graphed warms up at full length: its first call captures the graph, which must not fall in a timed round
    failed = warm_up({name: variant(name, replace(config, steps=steps if name == "graphed" else 2))
                      for name, config in configs.items()}, device)
    configs = {name: config for name, config in configs.items() if name not in failed}
    warmup_s = time.perf_counter() - warm_start
    _progress(started, f"{cfg.repeats} timed round(s) of {steps} steps, batch {batch}")
    times, outputs = best_of({name: variant(name, config) for name, config in configs.items()}, cfg.repeats, device)
    _progress(started, "launch counts, noise timing, FLOP counts")
    launched = {name: launches_per_step(lambda steps: variant(name, replace(configs[name], steps=steps)), device)
                for name in REQUIRED}
    rate = {name: batch / min(seconds) for name, seconds in times.items()}  # images/s, best round
    ratio = {key: rate["split"] / rate[name] for key, name in (("speedup_split_over_naive", "naive"),
                                                                ("speedup_split_over_authors", "authors"),
                                                                ("speedup_counter_over_cpu_noise", "cpu-noise"))
             if name in rate}
    results = {
        "config": {**asdict(cfg), "steps": steps, "batch": batch},
        **provenance(device),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "images_per_s": rate,
        **ratio,
        "failed": failed,
        "warmup_s": warmup_s,  # every variant's first (2-step) call: with --compile, mostly compiling
        **({"compiled_graphs": _dynamo_graphs() - graphs_before,
            "recompile_limit_hits": _recompile_limit_hits() - hits_before} if cfg.compile else {}),
        "noise_ms_per_step": _noise_ms_per_step(anchor_ids, cfg, shape, device),
        "launches_per_step": {**launched, "counted": launch_unit(device)},
        "seconds": {name: [round(s, 4) for s in seconds] for name, seconds in times.items()},
        "max_abs_diff_split_vs_naive": float((outputs["split"] - outputs["naive"]).abs().max()),
        **_bf16_weights_figures(rate, outputs),
        **_graphed_figures(rate, outputs),
        **_flop_figures(_flops_per_image(unet, anchors, shape, cfg), steps, rate, peak_bf16_flops(device)),
        "diversity_own_anchor_noise": mean_pairwise_l2(outputs["split"], cfg.k),
        "mean_l2_to_anchor_own": float((outputs["split"].cpu() - anchors).flatten(1).norm(dim=1).mean()),
    }
    if "shared" in outputs:
        results.update(diversity_shared_anchor_noise=mean_pairwise_l2(outputs["shared"], cfg.k),
                       mean_l2_to_anchor_shared=float((outputs["shared"].cpu() - anchors).flatten(1).norm(dim=1)
                                                      .mean()))
    _progress(started, "done")
    return results


def warm_up(calls: dict, device) -> dict[str, str]:
    """Run each variant's warm-up call once (allocator, cuDNN, torch.compile graphs) -> {variant: its error} for those
    that failed, which the run then leaves out; split and naive (REQUIRED) may not fail."""
    failed = {}
    for name, call in calls.items():
        try:
            call()
        except Exception as error:  # a compile error, an out-of-memory, ...: the other variants are still measured
            if name in REQUIRED:
                raise
            failed[name] = f"{type(error).__name__}: {error}".strip()[:2000]
            print(f"variant {name} failed in its warm-up and is left out of the results:\n"
                  + "".join(traceback.format_exception(error))[-4000:], file=sys.stderr, flush=True)
            if on_cuda(device):
                torch.cuda.empty_cache()
    return failed


def _bf16_weights_figures(rate: dict[str, float], outputs: dict) -> dict:
    """bf16 weights against bf16 autocast (the job's GPU default): speed, and how far apart their positives land."""
    if "bf16-weights" not in rate:
        return {}
    diff = (outputs["bf16-weights"].float() - outputs["split"].float()).abs()
    return {"speedup_bf16_weights_over_autocast": rate["bf16-weights"] / rate["split"],
            "bf16_weights_vs_autocast_abs_diff": {"max": float(diff.max()), "mean": float(diff.mean())}}


def _graphed_figures(rate: dict[str, float], outputs: dict) -> dict:
    """The whole loop as one CUDA graph against the same loop launched step by step: speed, and whether the positives
    are the same bytes (the replay runs the kernels the capture recorded)."""
    if "graphed" not in rate:
        return {}
    return {"speedup_graphed_over_split": rate["graphed"] / rate["split"],
            "graphed_vs_split_max_abs_diff": float((outputs["graphed"].float() - outputs["split"].float()).abs().max())}


def _flop_figures(flops: dict[str, float], steps: int, rate: dict[str, float], peak: float | None) -> dict:
    """FLOPs per image for each sampler form (`flops`: per image-step), the TFLOP/s each variant achieved and, on a
    GPU whose bf16 peak is known (`peak`, FLOP/s), the fraction of that peak."""
    per_variant = {"shared": "split_shared", "naive": "naive"}  # the rest do the split sampler's work
    achieved = {name: flops[per_variant.get(name, "split")] * steps * rate[name] for name in rate}  # FLOP/s
    peak_figures = {} if peak is None else {
        "peak_bf16_tflop_s": peak / 1e12, "fraction_of_peak": {name: f / peak for name, f in achieved.items()}}
    return {
        "flops_per_forward_per_image": flops["forward"],
        "split_step_over_forward": flops["split"] / flops["forward"],
        "encoder_share_of_forward": flops["encoder"] / flops["forward"],
        "split_flops_per_image": flops["split"] * steps,
        "naive_flops_per_image": flops["naive"] * steps,
        "tflop_per_s": {name: f / 1e12 for name, f in achieved.items()},
        **peak_figures,
        "shared_noise_flops_per_image": flops["split_shared"] * steps,
        "shared_noise_flop_saving": 1 - flops["split_shared"] / flops["split"],
    }


def _noise_ms_per_step(anchor_ids, cfg: BenchConfig, shape, device) -> dict[str, float]:
    """Milliseconds to draw one step's noise (anchor + variance) for the whole batch, on `device`, per generator."""
    result = {}
    for kind in ("counter", "cpu-generator"):
        noise = row_noise(kind, cfg.seed, anchor_ids, cfg.k, False, "inductor" if cfg.compile else None)
        # in inference mode, as the sampler draws them (compiled noise: the graphs the sampler runs)
        draw = torch.inference_mode()(lambda: (noise.anchor(3, shape, device), noise.variance(3, shape, device)))
        draw()  # warm-up: compiled noise compiles here, not in a timed round
        times, _ = best_of({kind: draw}, max(3, cfg.repeats), device)
        result[kind] = 1e3 * min(times[kind])
    return result


def launches_per_step(sampler_with_steps, device) -> int:
    """What one denoising step launches (clsp.bench.launches), without the set-up around the steps:
    `sampler_with_steps(n)` -> a call that samples with n steps (already warmed up)."""
    return launches(sampler_with_steps(2), device) - launches(sampler_with_steps(1), device)


def _flops_per_image(unet, anchors, shape, cfg: BenchConfig) -> dict[str, float]:
    """FLOPs of one denoising step per synthetic image: split sampler, naive reference, plain forward, encoder."""
    from clsp.synth.sampler import _hooked_eps  # the naive step itself, so its count is not re-derived here
    from clsp.synth.unet_split import encode

    device = unet.conv_in.weight.device
    b = anchors.shape[0]
    x = torch.randn((b, *shape)).to(device)
    a_t = anchors.to(device)
    counts = {}
    own = torch.arange(b, device=device)  # (B,): each row its own noised anchor
    shared = own // cfg.k  # (B,): the K candidates of an anchor share one noised anchor (rows are anchor-major)
    steps = {
        "split": lambda: mixed_eps(unet, x, a_t, 500, cfg.w, own),
        "split_shared": lambda: mixed_eps(unet, x, a_t[::cfg.k], 500, cfg.w, shared),
        "naive": lambda: _hooked_eps(unet, x, a_t, 500, cfg.w, own),
        "forward": lambda: unet(x, 500),
        "encoder": lambda: encode(unet, x, 500),
    }
    # eagerly: dynamo refuses to compile under a dispatch mode such as the counter, and some torch releases then
    # skip that code for good or raise (pytorch/pytorch#128199, #190286); the FLOPs are the same either way
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else \
        contextlib.nullcontext()
    for name, step in steps.items():
        with eager, torch.inference_mode(), FlopCounterMode(display=False) as counter:
            step()
        counts[name] = counter.get_total_flops() / b
    return counts


def format_table(r: dict) -> str:
    c, ips, tf = r["config"], r["images_per_s"], r["tflop_per_s"]
    rows = [
        ("model", f"{c['model']} ({r['parameters'] / 1e6:.2f}M params), {r['device']}, torch {r['versions']['torch']}"),
        ("run", f"batch {c['batch']} = {c['batch'] // c['k']} anchors x K {c['k']}, {c['steps']} DDIM steps, "
                f"w {c['w']}, eta {c['eta']}, compile {c['compile']}, fast {c['fast']}"),
        *[(f"{name}", f"{ips[name]:.2f} images/s, {1e3 * tf[name]:.2f} GFLOP/s"
                      + (f" ({r['fraction_of_peak'][name]:.1%} of bf16 peak)" if "fraction_of_peak" in r else ""))
          for name in VARIANTS if name in ips],
        *[(name, "FAILED in its warm-up: " + error.split("\n")[0]) for name, error in r.get("failed", {}).items()],
        ("split / naive", f"{r['speedup_split_over_naive']:.2f}x (outputs differ by at most "
                          f"{r['max_abs_diff_split_vs_naive']:.1e})"),
        *([("split / authors' recipe", f"{r['speedup_split_over_authors']:.2f}x")] if "authors" in ips else []),
        *([("bf16 weights / autocast", f"{r['speedup_bf16_weights_over_autocast']:.2f}x (positives differ by "
                                       f"{r['bf16_weights_vs_autocast_abs_diff']['mean']:.1e} on average)")]
          if "bf16-weights" in ips else []),
        *([("CUDA graph / launched", f"{r['speedup_graphed_over_split']:.2f}x (positives differ by at most "
                                     f"{r['graphed_vs_split_max_abs_diff']:.1e})")] if "graphed" in ips else []),
        ("counter / cpu-generator noise", (f"{r['speedup_counter_over_cpu_noise']:.2f}x; " if "cpu-noise" in ips
                                           else "") + f"one step's noise: counter "
                                          f"{r['noise_ms_per_step']['counter']:.2f} ms, cpu-generator "
                                          f"{r['noise_ms_per_step']['cpu-generator']:.2f} ms"),
        ("launches / step", f"split {r['launches_per_step']['split']:,}, naive {r['launches_per_step']['naive']:,} "
                            f"{r['launches_per_step']['counted']}"),
        ("FLOPs / image", f"split {r['split_flops_per_image'] / 1e9:.3f} G, "
                          f"naive {r['naive_flops_per_image'] / 1e9:.3f} G ({c['steps']} steps)"),
        ("step cost", f"split step = {r['split_step_over_forward']:.3f} forward passes; encoder = "
                      f"{100 * r['encoder_share_of_forward']:.1f}% of a forward"),
        ("shared anchor noise", f"{r['shared_noise_flops_per_image'] / 1e9:.3f} GFLOP/image "
                                f"({100 * r['shared_noise_flop_saving']:.1f}% fewer FLOPs)"),
        ("diversity (mean L2 among K)", f"own noise {r['diversity_own_anchor_noise']:.3f}, shared "
                                        f"{r.get('diversity_shared_anchor_noise', float('nan')):.3f}"),
        ("mean L2 to anchor", f"own noise {r['mean_l2_to_anchor_own']:.3f}, "
                              f"shared {r.get('mean_l2_to_anchor_shared', float('nan')):.3f}"),
        *([("warm-up", f"{r['warmup_s']:.1f} s, {r['compiled_graphs']} graphs compiled"
                       + (f"; dynamo's recompile limit was hit {r['recompile_limit_hits']} time(s): some calls ran "
                          "eagerly" if r.get("recompile_limit_hits") else ""))]
          if "compiled_graphs" in r else []),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(model: str = typer.Option("small", help=f"one of {', '.join(MODELS)}"),
         steps: int = typer.Option(None, help="DDIM steps (default: 10 on the CPU, 100 on CUDA)"),
         batch: int = typer.Option(None, help="rows per call, a multiple of --k "
                                              "(default: 16 on the CPU, 1024 on CUDA)"),
         k: int = typer.Option(4, help="candidates per anchor"), w: float = typer.Option(0.1),
         eta: float = typer.Option(0.1), device: str = DEVICE,
         compile: bool = typer.Option(False, help="torch.compile the UNet blocks"),
         fast: bool = typer.Option(True, help="CUDA: bf16 autocast and channels_last (--no-fast: fp32)"),
         repeats: int = REPEATS, seed: int = typer.Option(0), threads: int = THREADS, out: Path = OUT,
         skip: str = typer.Option("", help="variants to leave out, comma-separated: cpu-noise, authors, shared, "
                                           "bf16-weights, graphed (a shorter run; their rows read '—')")) -> None:
    """The split sampler against the naive reference and the authors' recipe, in one run."""
    try:
        cfg = BenchConfig(model, steps, batch, k, w, eta, device, compile, fast, repeats, seed, threads,
                          None if out is None else str(out),
                          tuple(name.strip() for name in skip.split(",") if name.strip()))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    results = run_bench(cfg)
    typer.echo(format_table(results))
    write_results(results, out)


if __name__ == "__main__":
    typer.run(main)
