"""Which side limits training: `python -m clsp.train.bench [--device cuda]` measures, in one run,

  train     one CLSP-SimCLR step of ResNet-18 on three views per anchor (two real + the synthetic one), input already
            on the device, as `clsp train run` takes it (train.speed: NHWC views on CUDA, --compile): anchors/s,
            achieved FLOP/s (vs the device's peak on a known GPU), and the launches a step takes (clsp.bench.launches);
            then the same steps with their three views augmented on the device first, as the loop does: what share
            of a step the augmentation takes (the two interleaved, best of --repeats)
  loader    the shard stream (decode the anchor and one of K positives) + BatchAugment of the three views on the device,
            from the same shards written with each image codec: png (PIL decodes) and raw (.npy: no decoding), timed
            interleaved, best of --repeats; raw_over_png is their ratio
  stream    the same loaders without BatchAugment (read, check, decode, batch): raw_over_png_stream isolates the codec
  cached    the same from the decoded in-memory input (train.cache, --cache): images decoded once, then indexed
  augment   BatchAugment alone on uint8 batches already on the device
  pil       the per-image PIL pipeline (train.pil_augment.pil_reference), three views per anchor, one process
ratio = loader / train: above 1 the model is the bottleneck, below 1 the input pipeline is.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from clsp.bench import (DEVICE, OUT, REPEATS, THREADS, best_of, launch_unit, launches, peak_bf16_flops, provenance,
                        set_threads, sync, write_results)
from clsp.shards.manifest import read_manifest
from clsp.shards.manifest_writer import write_manifest
from clsp.shards.schema import ShardSample
from clsp.shards.writer import ShardWriter, shard_name
from clsp.train.augment import BatchAugment
from clsp.train.pil_augment import pil_reference
from clsp.train.backbones import build_backbone
from clsp.train.cache import CachedStream
from clsp.train.methods import MethodConfig, build_method
from clsp.train.speed import compile_encoders, to_view_layout, view_layout
from clsp.vocabulary import CPU_COMPILE_REFUSED
from clsp.train.stream import ShardStream, StreamConfig


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    width: int = 64        # ResNet-18 stem channels (64 = standard)
    size: int = 32         # image side, px
    batch: int = 32        # anchors per step
    steps: int = 3         # timed training steps (after one warm-up step)
    anchors: int = 512     # anchors in the temporary shards for the loader
    k: int = 8
    workers: int = 0
    repeats: int = 2       # interleaved rounds of the png and raw loaders; the best of each is reported
    compile: bool = False  # torch.compile the encoder and the augmentation (train.speed), as `--compile` does

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"device {self.device!r} is not available: "
                             f"use cpu{' or cuda' * torch.cuda.is_available()}")
        if min(self.width, self.size, self.batch, self.steps, self.anchors, self.k, self.repeats) < 1 \
                or self.workers < 0:
            raise ValueError("width, size, batch, steps, anchors, k and repeats must be >= 1, workers >= 0")
        if self.compile and self.device != "cuda":
            raise ValueError(CPU_COMPILE_REFUSED)
        if self.anchors < self.batch:
            raise ValueError(f"anchors ({self.anchors}) must fill at least one batch ({self.batch})")


def bench_train(cfg: BenchConfig, device: torch.device) -> dict:
    """Training steps as `clsp train run` takes them on `device` (bf16 autocast and NHWC views on CUDA, the encoder
    and the augmentation compiled with cfg.compile: train.speed), input already on the device."""
    backbone, feat_dim = build_backbone("resnet18", cfg.width, small_stem=True)
    method = build_method("simclr", backbone, feat_dim, MethodConfig.for_method("simclr")).to(device)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    views = [to_view_layout(torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device)) for _ in range(3)]
    images = torch.randint(0, 256, (cfg.batch, cfg.size, cfg.size, 3), dtype=torch.uint8, device=device)  # (B,S,S,3)
    augment = bench_augment(cfg, device)
    ids = torch.arange(cfg.batch, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(views: list[torch.Tensor] = views) -> None:
        with autocast:
            loss = method(views[:2], ids, views[2])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loss to the host after the update, the loop's one wait for the device a step (train.epoch)

    with FlopCounterMode(display=False) as counter:  # one eager step: the FLOPs (and the warm-up when eager)
        step()
    def augmented_step() -> None:  # the loop's step: three views augmented on the device, then the update
        step([to_view_layout(augment(images)) for _ in range(3)])

    compile_s = None
    if cfg.compile:  # compiled after the count (the counter is a dispatch mode); two steps compile and settle
        compile_encoders(method)
        start = time.perf_counter()
        step(), augmented_step()  # the encoder's graphs, then the augmentation's (bench_augment)
        sync(device)
        compile_s = time.perf_counter() - start
    augmented_step()  # warm-up
    times, _ = best_of({"plain": lambda: [step() for _ in range(cfg.steps)],  # cfg.steps queued back to back
                        "augmented": lambda: [augmented_step() for _ in range(cfg.steps)]}, cfg.repeats, device)
    seconds, augmented_seconds = min(times["plain"]) / cfg.steps, min(times["augmented"]) / cfg.steps  # best of each
    launched = launches(step, device)
    augment_launched = launches(lambda: augment(images), device)  # one view's
    flops = counter.get_total_flops() / seconds
    result = {"anchors_per_s": cfg.batch / seconds, "views_per_s": 3 * cfg.batch / seconds,
              "augmented_anchors_per_s": cfg.batch / augmented_seconds,
              "augment_share_of_step": 1 - seconds / augmented_seconds,
              "gflop_per_step": counter.get_total_flops() / 1e9, "achieved_tflop_s": flops / 1e12,
              "compile_s": compile_s, "launches_per_step": launched, "launches_counted": launch_unit(device),
              "augment_launches_per_view": augment_launched,
              "view_layout": str(view_layout(device)).removeprefix("torch.")}
    peak = peak_bf16_flops(device)
    if peak is not None:
        result.update(peak_bf16_tflop_s=peak / 1e12, fraction_of_peak=flops / peak)
    return result


def bench_augment(cfg: BenchConfig, device: torch.device) -> BatchAugment:
    """The loop's augmentation: its stages compiled with cfg.compile, as `clsp train run --compile` does."""
    augment = BatchAugment("simclr", cfg.size).to(device)
    return augment.compile_stages() if cfg.compile else augment


def write_bench_shards(directory: Path, cfg: BenchConfig, codec: str = "png") -> list[str]:
    """Shards of random images (the same for every codec: the generator restarts at seed 0) and their manifest."""
    rng = np.random.default_rng(0)
    urls, per_shard = [], 128
    directory.mkdir(parents=True, exist_ok=True)
    for first in range(0, cfg.anchors, per_shard):
        path = directory / shard_name(first // per_shard)
        with ShardWriter(path, cfg.k, cfg.size, codec) as writer:
            for n in range(first, min(first + per_shard, cfg.anchors)):
                images = rng.integers(0, 256, (cfg.k + 1, cfg.size, cfg.size, 3), dtype=np.uint8)
                writer.write(ShardSample(f"a{n}", images[0], images[1:], n % 10, list(range(cfg.k))))
        urls.append(str(path))
    run = {"source": {"spec": "bench", "split": "train", "fingerprint": "0" * 64, "count": cfg.anchors},
           "generator": {"model_id": "none", "weights_sha256": "0" * 64}, "sampler": {"w": 0.1, "steps": 1, "eta": 0.0},
           "k": cfg.k, "seed": 0, "image_size": cfg.size, "anchors_per_shard": per_shard, "package_version": "bench",
           "codec": codec}
    write_manifest(directory, run)  # the cached input reads through the manifest's contract, as training does
    return urls


def loader_epoch(cfg: BenchConfig, device: torch.device, augment: BatchAugment | None, urls: list[str]):
    """One pass of the streamed loader over `urls`, with the three augmented views unless `augment` is None (the
    stream alone: reading and decoding): () -> the last batch."""
    steps = cfg.anchors // cfg.batch
    stream = ShardStream(StreamConfig(tuple(urls), cfg.batch, steps, cfg.k), {f"a{n}": n for n in range(cfg.anchors)})

    def run() -> dict:
        loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda")
        for batch in loader:
            anchor = batch["anchor"].to(device, non_blocking=True)  # (B, S, S, 3) uint8
            positive = batch["positive"].to(device, non_blocking=True)
            if augment is not None:
                views = [augment(anchor), augment(anchor), augment(positive)]
        return batch if augment is None else {**batch, "views": views}
    return run


def bench_inputs(cfg: BenchConfig, device: torch.device, urls: dict[str, list[str]]) -> dict:
    """urls: {codec: shard paths} for png and raw, the same images in each."""
    augment = bench_augment(cfg, device)
    steps = cfg.anchors // cfg.batch
    variants = {f"{codec}{part}": loader_epoch(cfg, device, augment if part == "" else None, paths)
                for codec, paths in urls.items() for part in ("", " stream")}  # "png", "png stream", "raw", ...
    times, batches = best_of(variants, cfg.repeats, device)
    rates = {name: steps * cfg.batch / min(seconds) for name, seconds in times.items()}
    batch = batches["png"]

    anchor = batch["anchor"].to(device)
    sync(device)  # the copy done: the loop's time is the augmentation's alone
    start = time.perf_counter()
    for _ in range(steps):
        views = [augment(anchor) for _ in range(3)]
    sync(device)
    augment_rate = steps * cfg.batch / (time.perf_counter() - start)

    start = time.perf_counter()
    cached = CachedStream(StreamConfig(tuple(urls["png"]), cfg.batch, steps, cfg.k),
                          read_manifest(str(Path(urls["png"][0]).parent)).contract(), progress=False)
    cached.load()  # read, check and decode every image once
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in cached:
        anchor = batch["anchor"].to(device, non_blocking=True)
        views = [augment(anchor), augment(anchor), augment(batch["positive"].to(device, non_blocking=True))]
    sync(device)
    cached_rate = steps * cfg.batch / (time.perf_counter() - start)
    del views

    reference = pil_reference("simclr", cfg.size)
    images = [Image.fromarray(a) for a in batch["anchor"].numpy()]  # (S, S, 3) uint8 each
    start = time.perf_counter()
    for image in images:
        for _ in range(3):
            reference(image)
    pil_rate = len(images) / (time.perf_counter() - start)
    return {"loader_anchors_per_s": rates["png"], "loader_raw_anchors_per_s": rates["raw"],
            "stream_anchors_per_s": rates["png stream"], "stream_raw_anchors_per_s": rates["raw stream"],
            "augment_anchors_per_s": augment_rate,
            "cached_anchors_per_s": cached_rate, "cache_fill_s": fill_s, "pil_anchors_per_s": pil_rate}


def bench(cfg: BenchConfig) -> dict:
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        urls = {codec: write_bench_shards(Path(directory) / codec, cfg, codec) for codec in ("png", "raw")}
        shard_bytes = {codec: sum(Path(p).stat().st_size for p in paths) for codec, paths in urls.items()}
        inputs = bench_inputs(cfg, device, urls)
    train = bench_train(cfg, device)
    return {"config": asdict(cfg), **provenance(device), "threads": torch.get_num_threads(), "train": train,
            "inputs": inputs, "shard_bytes": shard_bytes,
            "raw_over_png": inputs["loader_raw_anchors_per_s"] / inputs["loader_anchors_per_s"],
            "raw_over_png_stream": inputs["stream_raw_anchors_per_s"] / inputs["stream_anchors_per_s"],
            "loader_over_train": inputs["loader_anchors_per_s"] / train["anchors_per_s"],
            "raw_loader_over_train": inputs["loader_raw_anchors_per_s"] / train["anchors_per_s"],
            "cached_over_train": inputs["cached_anchors_per_s"] / train["anchors_per_s"],
            "batch_augment_over_pil": inputs["augment_anchors_per_s"] / inputs["pil_anchors_per_s"]}


def main(device: str = DEVICE, width: int = typer.Option(64),
         size: int = typer.Option(32), batch: int = typer.Option(32, help="Anchors per step."),
         steps: int = typer.Option(3, help="Timed training steps."), anchors: int = typer.Option(512),
         workers: Optional[int] = typer.Option(None, help="Loader processes (default: 0 on the CPU; on CUDA the "
                                               "cores less two, at most 8)."),
         repeats: int = REPEATS, threads: int = THREADS,
         compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder and the augmentation's "
                                      "stages, as `clsp train run --compile` (the compile is timed apart)."),
         out: Path = OUT) -> None:
    """Training vs input-pipeline throughput (anchors/s; each anchor is three augmented views)."""
    set_threads(threads)
    if device == "cuda":  # GPU defaults: a batch worth timing
        batch, anchors = max(batch, 256), max(anchors, 4096)
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 2)) if device == "cuda" else 0
    result = bench(BenchConfig(device, width, size, batch, steps, anchors, workers=workers, repeats=repeats,
                               compile=compile))
    t, i, mib = result["train"], result["inputs"], {c: b / 2**20 for c, b in result["shard_bytes"].items()}
    lines = [f"device {device}, {result['threads']} threads, {workers} loader processes, ResNet-18 width {width} at "
             f"{size} px, batch {batch}{', compiled' if compile else ''}",
             f"train            {t['anchors_per_s']:9.1f} anchors/s  ({t['views_per_s']:.1f} views/s, "
             f"{t['achieved_tflop_s'] * 1e3:.1f} GFLOP/s achieved; {t['launches_per_step']:,} "
             f"{t['launches_counted']} a step)",
             f"train+augment    {t['augmented_anchors_per_s']:9.1f} anchors/s  (3 views augmented on the device "
             f"first: {t['augment_share_of_step']:.1%} of a step; {t['augment_launches_per_view']:,} "
             f"{t['launches_counted']} a view)",
             f"loader+augment   {i['loader_anchors_per_s']:9.1f} anchors/s  (decode anchor + 1 of "
             f"{result['config']['k']} positives, 3 augmented views; png shards, {mib['png']:.1f} MiB)",
             f"  raw codec      {i['loader_raw_anchors_per_s']:9.1f} anchors/s  (the same from .npy members, "
             f"{mib['raw']:.1f} MiB; raw/png = {result['raw_over_png']:.2f})",
             f"stream only      {i['stream_anchors_per_s']:9.1f} anchors/s  (png: read + decode, no augment); raw "
             f"{i['stream_raw_anchors_per_s']:.1f}, raw/png = {result['raw_over_png_stream']:.2f}",
             f"cached+augment   {i['cached_anchors_per_s']:9.1f} anchors/s  (--cache: decoded once in "
             f"{i['cache_fill_s']:.1f} s, then drawn from memory)",
             f"augment only     {i['augment_anchors_per_s']:9.1f} anchors/s  (BatchAugment, 3 views)",
             f"PIL reference    {i['pil_anchors_per_s']:9.1f} anchors/s  (per image, 3 views)",
             f"input/train: png {result['loader_over_train']:.2f}, raw {result['raw_loader_over_train']:.2f}, "
             f"cached {result['cached_over_train']:.2f} (above 1: the model limits training)",
             f"batch augment / PIL = {result['batch_augment_over_pil']:.2f}"]
    if t.get("fraction_of_peak") is not None:
        lines.append(f"{result['device']}: {t['fraction_of_peak']:.1%} of {t['peak_bf16_tflop_s']:.0f} "
                     "TFLOP/s bf16 peak")
    typer.echo("\n".join(lines))
    write_results(result, out)


if __name__ == "__main__":
    typer.run(main)
