"""Benchmark the CLSP sampler: split-UNet sampler vs the naive two-pass reference, FLOPs, and shared anchor noise.

    python -m synth.bench                                   # small UNet, few steps: about 1-2 min on 2 CPU cores
    python -m synth.bench --model ddpm-cifar10 --device cuda --steps 100 --batch 512 --compile --out bench.json

All timings come from one run on one model with the same inputs. Weights are random (the speed does not depend on
them; the diversity figures only compare the two anchor-noise options with each other).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from synth.job import prepare_unet
from synth.models import ddpm_cifar10_scheduler, ddpm_cifar10_unet, tiny_unet
from synth.sampler import (
    SamplerConfig,
    candidate_seed,
    mixed_eps,
    naive_reference,
    row_generators,
    sample_positives,
    start_noise,
)

MODELS = ("small", "ddpm-cifar10")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "small"
    steps: int | None = None  # None: 10 on the CPU, 100 (the paper's) on CUDA
    batch: int | None = None  # rows = anchors x k; None: 16 on the CPU, 512 on CUDA
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

    def __post_init__(self) -> None:
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
        SamplerConfig(w=self.w, eta=self.eta)  # same validation as the sampler's

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def resolved(self) -> tuple[int, int]:
        """(steps, batch) with the device defaults filled in."""
        steps = self.steps or (100 if self.on_cuda else 10)
        batch = self.batch or (512 if self.on_cuda else 16)
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


def run_bench(cfg: BenchConfig) -> dict:
    steps, batch = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    unet, scheduler = build_model(cfg.model)
    unet = prepare_unet(unet.eval(), device, cfg.compile)
    size, channels = unet.config.sample_size, unet.config.in_channels
    shape = (channels, size, size)
    n_anchors = batch // cfg.k
    anchor_ids = [f"a{i}" for i in range(n_anchors)]
    one_each = torch.rand((n_anchors, *shape), generator=torch.Generator().manual_seed(cfg.seed)) * 2 - 1
    anchors = one_each.repeat_interleave(cfg.k, dim=0)  # (B, C, H, W): each anchor K times in a row
    seeds = [candidate_seed(cfg.seed, a, j) for a in anchor_ids for j in range(cfg.k)]
    sampler = SamplerConfig(w=cfg.w, steps=steps, eta=cfg.eta)
    shared = SamplerConfig(w=cfg.w, steps=steps, eta=cfg.eta, share_anchor_noise=True)

    def call(fn, config, share=False):
        def go():
            gens = row_generators(seeds)
            anchor_gens = None
            if share:  # one generator object per anchor, repeated for its K rows
                per_anchor = row_generators([candidate_seed(cfg.seed, a, "anchor") for a in anchor_ids])
                anchor_gens = [g for g in per_anchor for _ in range(cfg.k)]
            return fn(unet, scheduler, start_noise(gens, shape), anchors, gens, config, anchor_gens, fast=cfg.fast)
        return go

    warm = SamplerConfig(w=cfg.w, steps=2, eta=cfg.eta)  # warm-up: allocator, kernels, torch.compile graphs
    call(sample_positives, warm)()
    call(naive_reference, warm)()
    variants = {"split": call(sample_positives, sampler), "naive": call(naive_reference, sampler),
                "shared": call(sample_positives, shared, share=True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(cfg.repeats):  # interleaved rounds, best of each: robust to other load on a shared machine
        for name, go in variants.items():
            _sync(device)
            start = time.perf_counter()
            outputs[name] = go()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    t_split, t_naive, t_shared = (min(times[n]) for n in ("split", "naive", "shared"))
    out_split, out_naive, out_shared = (outputs[n] for n in ("split", "naive", "shared"))

    flops = _flops_per_image(unet, anchors, shape, cfg)
    split_ips, naive_ips, shared_ips = batch / t_split, batch / t_naive, batch / t_shared
    return {
        "config": {**asdict(cfg), "steps": steps, "batch": batch},
        "device": torch.cuda.get_device_name(device) if cfg.on_cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "split_images_per_s": split_ips,
        "naive_images_per_s": naive_ips,
        "speedup_split_over_naive": split_ips / naive_ips,
        "seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "max_abs_diff_split_vs_naive": float((out_split - out_naive).abs().max()),
        "flops_per_forward_per_image": flops["forward"],
        "split_step_over_forward": flops["split"] / flops["forward"],
        "encoder_share_of_forward": flops["encoder"] / flops["forward"],
        "split_flops_per_image": flops["split"] * steps,
        "naive_flops_per_image": flops["naive"] * steps,
        "split_flops_per_s": flops["split"] * steps * split_ips,
        "naive_flops_per_s": flops["naive"] * steps * naive_ips,
        "shared_noise_images_per_s": shared_ips,
        "shared_noise_flops_per_image": flops["split_shared"] * steps,
        "shared_noise_flop_saving": 1 - flops["split_shared"] / flops["split"],
        "diversity_own_anchor_noise": mean_pairwise_l2(out_split, cfg.k),
        "diversity_shared_anchor_noise": mean_pairwise_l2(out_shared, cfg.k),
        "mean_l2_to_anchor_own": float((out_split.cpu() - anchors).flatten(1).norm(dim=1).mean()),
        "mean_l2_to_anchor_shared": float((out_shared.cpu() - anchors).flatten(1).norm(dim=1).mean()),
    }


def _flops_per_image(unet, anchors, shape, cfg: BenchConfig) -> dict[str, float]:
    """FLOPs of one denoising step per synthetic image: split sampler, naive reference, plain forward, encoder."""
    from synth.sampler import _hooked_eps  # the naive step itself, so its count is not re-derived here
    from synth.unet_split import encode

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
    for name, step in steps.items():
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            step()
        counts[name] = counter.get_total_flops() / b
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(r: dict) -> str:
    c = r["config"]
    rows = [
        ("model", f"{c['model']} ({r['parameters'] / 1e6:.2f}M params), {r['device']}, torch {r['torch']}"),
        ("run", f"batch {c['batch']} = {c['batch'] // c['k']} anchors x K {c['k']}, {c['steps']} DDIM steps, "
                f"w {c['w']}, eta {c['eta']}, compile {c['compile']}, fast {c['fast']}"),
        ("split sampler", f"{r['split_images_per_s']:.2f} images/s, {r['split_flops_per_s'] / 1e9:.2f} GFLOP/s"),
        ("naive reference", f"{r['naive_images_per_s']:.2f} images/s, {r['naive_flops_per_s'] / 1e9:.2f} GFLOP/s"),
        ("speed-up split/naive", f"{r['speedup_split_over_naive']:.2f}x "
                                 f"(outputs differ by at most {r['max_abs_diff_split_vs_naive']:.1e})"),
        ("FLOPs / image", f"split {r['split_flops_per_image'] / 1e9:.3f} G, "
                          f"naive {r['naive_flops_per_image'] / 1e9:.3f} G ({c['steps']} steps)"),
        ("step cost", f"split step = {r['split_step_over_forward']:.3f} forward passes; encoder = "
                      f"{100 * r['encoder_share_of_forward']:.1f}% of a forward"),
        ("shared anchor noise", f"{r['shared_noise_images_per_s']:.2f} images/s, {r['shared_noise_flops_per_image'] / 1e9:.3f} GFLOP/image ({100 * r['shared_noise_flop_saving']:.1f}% fewer FLOPs)"),
        ("diversity (mean L2 among K)", f"own noise {r['diversity_own_anchor_noise']:.3f}, shared "
                                        f"{r['diversity_shared_anchor_noise']:.3f}"),
        ("mean L2 to anchor", f"own noise {r['mean_l2_to_anchor_own']:.3f}, "
                              f"shared {r['mean_l2_to_anchor_shared']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m synth.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="small")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 10 on CPU, 100 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="rows per call, a multiple of --k (default 16 / 512)")
    p.add_argument("--k", type=int, default=4, help="candidates per anchor")
    p.add_argument("--w", type=float, default=0.1)
    p.add_argument("--eta", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet blocks")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="CUDA: fp32, no bf16 autocast")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return BenchConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    results = run_bench(cfg)
    print(format_table(results))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
