"""The shards as a training run reads them: the manifest and positive draw, the batch split over the processes, and
the batches (streamed, or cached in memory)."""
from __future__ import annotations

import os
import sys
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from clsp.accelerator import stop_only_when_the_parent_says, threads_beside_workers
from clsp.errors import UserError
from clsp.shards.manifest import Manifest, read_manifest
from clsp.shards.reader import ShardError
from clsp.train.cache import CachedStream, check_room
from clsp.train.stream import PositiveDraw, ShardStream, StreamConfig, positive_draw, steps_per_epoch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from clsp.train.loop import TrainConfig


def open_shards(cfg: TrainConfig) -> tuple[Manifest, PositiveDraw | None]:
    """The manifest of cfg.shards (checked against --expect-k) and the draw --positive-filter/-weighting ask for."""
    try:
        manifest = read_manifest(cfg.shards)
    except (ShardError, OSError) as error:
        raise UserError(f"cannot open shards at {cfg.shards}: {error}") from None
    check_present(manifest, cfg.shards)
    if cfg.expect_k is not None and manifest.k != cfg.expect_k:
        raise UserError(f"{cfg.shards} holds K={manifest.k} positives per anchor, but --expect-k is {cfg.expect_k}")
    draw = positive_draw(cfg.positive_filter, cfg.positive_weighting, manifest.scores,
                         f"{cfg.shards} (shard schema version {manifest.schema_version})")
    return manifest, draw


def check_present(manifest: Manifest, shards: str) -> None:
    """Refuse shards listed in the manifest that are not there (a copy left some out), before anything is claimed."""
    absent = manifest.absent_shards()
    if absent:
        raise UserError(f"{shards} lists {len(absent)} shard(s) that are not there ({', '.join(absent[:3])}"
                        f"{', ...' if len(absent) > 3 else ''}): copy them from where the shards were made, or rerun "
                        f"the `clsp synth run` command that made them (it makes only the missing ones); `clsp shards "
                        f"verify {shards}` checks every shard")


def split_batch(batch_size: int, count: int, world: int) -> tuple[int, int]:
    """(anchors per process and step, steps per epoch) for a global `batch_size` over `world` processes."""
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is global and must split evenly over the {world} processes: "
                        f"use a multiple of {world}, e.g. {max(world, batch_size // world * world)}")
    per_process = batch_size // world
    return per_process, steps_per_epoch(count, world, per_process)


def open_input(cfg: TrainConfig, manifest: Manifest, draw: PositiveDraw | None, per_process: int, spe: int,
               acc: Accelerator, cached: bool):
    """(stream, loader): this process's batches, decoded once into memory when `cached` (the loader is the stream
    itself), else streamed from the shards by cfg.workers loader processes."""
    contract = manifest.contract()  # checked for every sample and shard as they stream, as `clsp shards verify` does
    stream_cfg = StreamConfig(tuple(manifest.shard_locations()), per_process, spe, manifest.k, cfg.seed,
                              cfg.positives, acc.process_index, acc.num_processes, cfg.shuffle_buffer,
                              cfg.skip_corrupt)
    if cached:  # decoded once, batches drawn from memory in this process: no loader processes
        check_room(manifest.count, manifest.k, int(manifest.run["image_size"]), cfg.positives, acc.num_processes)
        stream = loader = CachedStream(stream_cfg, contract, draw, progress=acc.is_main_process)
    else:
        stream = ShardStream(stream_cfg, contract.rows, contract, draw)
        if acc.device.type == "cpu" and cfg.workers:  # the model's threads beside the loader processes, not on them
            threads_beside_workers(cfg.workers)
        loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator(),  # own generator: iterators must not consume the global RNG
                            # fork on Linux (its default before Python 3.14): what the workers' signal handling needs
                            multiprocessing_context="fork" if sys.platform == "linux" and cfg.workers else None,
                            worker_init_fn=partial(stop_only_when_the_parent_says, parent=os.getpid()))
    return stream, loader
