"""The training loop: stream shards -> augment on the device -> method forward -> backward -> schedule -> log -> checkpoint.

It knows nothing about methods beyond `Method.forward(views, ids, third) -> dict(loss, loss_base, loss_clsp)`,
`Method.after_step(progress)` and `Method.backbone`. One process on the CPU, or many under `torchrun`/`accelerate launch`
(DDP, bf16 autocast on GPUs). `batch_size` is global: each of N processes takes batch_size / N anchors a step, and every
process takes `steps_per_epoch` equal batches.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clsp import __version__
from clsp.accelerator import SigtermFlag, any_process, fresh_accelerator
from clsp.errors import UserError
from clsp.knn import knn_predict
from clsp.presets import preset_values
from clsp.run_dir import RunKind, prepare_run_dir
from clsp.schedules import warmup_cosine
from shards.manifest import read_manifest
from shards.reader import ShardError
from train.augment import DEFAULT_MEAN, DEFAULT_STD, RECIPES, BatchAugment
from train.backbones import RESNET_LAYOUTS, build_backbone, embed, wants_small_stem
from train.cache import CachedStream, use_cache
from train.checkpoint import (CONFIG, LOG, SUMMARY, TRACKER_DIR, RunLog, describe_run, find_checkpoint, load_checkpoint,
                              run_files, save_backbone, save_checkpoint, write_json)
from train.methods import METHOD_DEFAULTS, MethodConfig, build_method
from train.stream import POSITIVES, WEIGHTINGS, PositiveFilter, ShardStream, StreamConfig, positive_draw, \
    steps_per_epoch

log = logging.getLogger(__name__)
# Options that may change when a run is resumed: they do not change what is computed.
OPERATIONAL = ("out", "workers", "resume", "overwrite", "knn_every", "knn_source", "log_with")
TRAIN_RUN = RunKind("train", CONFIG, "clsp train run", owned=run_files, describe=describe_run,
                    operational=(*(f"config.{name}" for name in OPERATIONAL), "package_version"),
                    legacy_keys=("config", "backbone", "normalize", "data"))
# embedded: 16 px digits (1,437 anchors, 11 steps an epoch) on 2 CPU cores, about 2.5 minutes a run (550 steps).
# lam 0.2 rather than SimCLR's 1.0: on this short schedule a freshly initialised network is nearly collapsed (all
# projections alike) and a pull term of weight >= 0.5 finishes the collapse within ~10 steps, for a third *real* view as
# much as for a synthetic one (measured: base loss stuck at ln(2B-1) for 250 steps); at 0.2 the base loss escapes.
# paper-cifar10: the SimCLR CIFAR-10 setting of the paper (docs: method.md): ResNet-18 (the CIFAR stem follows from the
# 32 px images), projector 4096 -> 256, tau 0.2, lam 1.0, SGD lr 0.5 momentum 0.9 wd 1e-4, 10 warm-up epochs then cosine,
# 1000 epochs, batch 1024 (global: split over the processes).
# Literal values only: `clsp train run --help` reads this dict without importing this module (clsp.presets).
PRESETS = {
    "embedded": dict(backbone="resnet18", width=16, epochs=50, batch_size=128, lr=0.3, warmup_epochs=5.0,
                     weight_decay=5e-4, proj_hidden=512, proj_dim=128, queue_size=1024, lam=0.2, workers=1),
    "paper-cifar10": dict(method="simclr", positives="synthetic", backbone="resnet18", width=64, epochs=1000,
                          batch_size=1024, lr=0.5, momentum=0.9, weight_decay=1e-4, warmup_epochs=10.0, lam=1.0,
                          temperature=0.2, proj_hidden=4096, proj_dim=256),
}
WARMUP_SHARE = 0.1  # a warm-up not given on the command line lasts at most this share of the run


@dataclass(frozen=True)
class TrainConfig:
    shards: str                        # shard directory or fsspec URL (with manifest.json)
    out: str                           # run directory
    method: str = "simclr"
    positives: str = "synthetic"       # synthetic | augment (third real view) | none
    lam: float | None = None           # CLSP weight; None: the method's default
    backbone: str = "resnet18"
    width: int = 64                    # stem channels (64 = standard ResNet)
    image_size: int | None = None      # augmentation output size; None: the shards' image size
    epochs: int = 100
    batch_size: int = 256              # anchors per optimizer step over all processes
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0        # linear warm-up, then cosine to 0, per step
    optimizer: str = "sgd"
    proj_hidden: int | None = None     # method settings; None: the method's default
    proj_dim: int | None = None
    temperature: float | None = None
    queue_size: int | None = None
    seed: int = 0
    workers: int = 2                   # loader processes per training process (streamed input only)
    cache: bool | None = None          # decode every image once and train from memory; None: when it fits (train.cache)
    shuffle_buffer: int = 256
    bf16: bool = True                  # autocast on GPUs (ignored on the CPU)
    knn_every: int = 0                 # epochs between kNN monitor runs (0: off)
    knn_source: str | None = None      # labelled source spec for the monitor, e.g. "digits"
    log_with: str | None = None        # also log log.csv's scalars to this Accelerate tracker (tensorboard, wandb...)
    skip_corrupt: bool = False
    expect_k: int | None = None        # refuse shards with another K
    positive_filter: str | None = None  # e.g. "distance>=0.05": draw only positives whose score passes (scored shards)
    positive_weighting: str | None = None  # "harder": draw a positive in proportion to its distance; None: uniform
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)
        need(self.method in METHOD_DEFAULTS, f"unknown method {self.method!r}: choose one of {sorted(METHOD_DEFAULTS)}")
        need(self.positives in POSITIVES, f"--positives must be one of {', '.join(POSITIVES)}, got {self.positives!r}")
        need(self.optimizer == "sgd", f"optimizer {self.optimizer!r} is not available: use sgd")
        need(self.backbone in RESNET_LAYOUTS, f"--backbone {self.backbone!r} is unknown: use "
             f"{' or '.join(RESNET_LAYOUTS)}")
        for name in ("width", "epochs", "batch_size", "shuffle_buffer"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        need(self.lr > 0 and self.momentum >= 0 and self.weight_decay >= 0, "--lr must be > 0, momentum and "
             "weight decay >= 0")
        need(0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs ({self.warmup_epochs}) must lie in 0..--epochs ({self.epochs}): lower it, or leave it "
             f"out for {WARMUP_SHARE:.0%} of a short run")
        need(self.workers >= 0 and self.knn_every >= 0, "--workers and --knn-every must be >= 0")
        need(self.image_size is None or self.image_size >= 8, "--image-size must be >= 8 pixels")
        need(self.knn_every == 0 or bool(self.knn_source), "--knn-every needs --knn-source (a labelled source spec)")
        need(not (self.resume and self.overwrite), "pass --resume or --overwrite, not both")
        need(self.positive_weighting in (None, *WEIGHTINGS), f"--positive-weighting must be one of "
             f"{', '.join(WEIGHTINGS)}, got {self.positive_weighting!r}")
        if self.positive_filter is not None:  # recorded in its canonical spelling: the same filter, the same config
            object.__setattr__(self, "positive_filter", str(PositiveFilter.parse(self.positive_filter)))
        if self.positive_weighting == "uniform":
            object.__setattr__(self, "positive_weighting", None)
        need(self.positives == "synthetic" or (self.positive_filter, self.positive_weighting) == (None, None),
             "--positive-filter and --positive-weighting choose among synthetic positives: use --positives synthetic")
        self.method_config()  # validates lam, temperature, widths

    def method_config(self) -> MethodConfig:
        try:
            return MethodConfig.for_method(self.method, positives=self.positives, lam=self.lam,
                                           temperature=self.temperature, proj_hidden=self.proj_hidden,
                                           proj_dim=self.proj_dim, queue_size=self.queue_size)
        except ValueError as error:
            raise UserError(str(error)) from None


def make_config(preset: str | None = None, **options) -> TrainConfig:
    """TrainConfig from a preset (or the defaults) with the given options on top; options that are None are unset."""
    unknown = sorted(set(options) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise TypeError(f"unknown TrainConfig option(s) {unknown}")
    values = preset_values(PRESETS, preset, options)
    if options.get("warmup_epochs") is None:  # the default / preset warm-up (10 epochs) scales down with a short run
        epochs = values.get("epochs", TrainConfig.epochs)
        values["warmup_epochs"] = min(values.get("warmup_epochs", TrainConfig.warmup_epochs), WARMUP_SHARE * epochs)
    return TrainConfig(**values)


def tracker_options(log_with: str | None, out: str) -> dict:
    """Accelerator options for --log-with, checked before anything runs: a tracker Accelerate knows whose package is
    installed (tensorboard: `pip install 'clsp-positives[tensorboard]'`)."""
    if not log_with:
        return {}
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import ProjectConfiguration

    if log_with not in LOGGER_TYPE_TO_CLASS:
        raise UserError(f"--log-with {log_with!r} is not a tracker Accelerate supports: use one of "
                        f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    import accelerate.utils as available

    check = getattr(available, f"is_{log_with}_available", None)
    if check is not None and not check():
        extra = " (pip install 'clsp-positives[tensorboard]')" if log_with == "tensorboard" else ""
        raise UserError(f"--log-with {log_with} needs its package, which is not installed: install it{extra}, or leave "
                        "--log-with out (log.csv is always written)")
    return {"log_with": log_with, "project_config": ProjectConfiguration(project_dir=out, logging_dir=out)}


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) the run in `cfg.out`; returns the run directory. Call on every process of a launch."""
    with ExitStack() as stack:  # holds the claim on cfg.out (clsp.run_dir) until the run ends
        return _train(cfg, stack)


def _train(cfg: TrainConfig, stack: ExitStack) -> Path:
    cuda = torch.cuda.is_available()
    acc = fresh_accelerator(cpu=not cuda, mixed_precision="bf16" if cfg.bf16 and cuda else "no",
                            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                            **tracker_options(cfg.log_with, cfg.out))
    try:
        manifest = read_manifest(cfg.shards)
    except (ShardError, OSError) as error:
        raise UserError(f"cannot open shards at {cfg.shards}: {error}") from None
    if cfg.expect_k is not None and manifest.k != cfg.expect_k:
        raise UserError(f"{cfg.shards} holds K={manifest.k} positives per anchor, but --expect-k is {cfg.expect_k}")
    draw = positive_draw(cfg.positive_filter, cfg.positive_weighting, manifest.scores,
                         f"{cfg.shards} (shard schema version {manifest.schema_version})")
    size = cfg.image_size or int(manifest.run["image_size"])
    world = acc.num_processes
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is global and must split evenly over the {world} processes: "
                        f"use a multiple of {world}, e.g. {max(world, cfg.batch_size // world * world)}")
    per_process = cfg.batch_size // world
    spe = steps_per_epoch(manifest.count, world, per_process)
    total = spe * cfg.epochs

    set_seed(cfg.seed)  # identical initial weights on every process
    small_stem = wants_small_stem(size)
    backbone, feat_dim = build_backbone(cfg.backbone, cfg.width, small_stem=small_stem)
    method = build_method(cfg.method, backbone, feat_dim, cfg.method_config())
    recipe = cfg.method if cfg.method in RECIPES else "simclr"
    shard_sums = hashlib.sha256("".join(s["sha256"] for s in manifest.shards).encode()).hexdigest()
    cached = use_cache(cfg.cache, manifest.count, manifest.k, int(manifest.run["image_size"]), cfg.positives, world)
    config = {key: value for key, value in asdict(cfg).items()  # unset options: a record as before they existed
              if key != "cache" and (value is not None or key not in ("positive_filter", "positive_weighting"))}
    if cached:  # the streamed input keeps the record it had before the cache existed; the cache changes the order
        config["cache"] = True
    run = {"config": config, "method": asdict(method.cfg), "augment": recipe, "image_size": size,
           "backbone": {"name": cfg.backbone, "width": cfg.width, "small_stem": small_stem, "feat_dim": feat_dim},
           "normalize": {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}, "package_version": __version__,
           "data": {"count": manifest.count, "k": manifest.k, "shard_image_size": int(manifest.run["image_size"]),
                    "source": manifest.run["source"], "generator": manifest.run.get("generator"),
                    "shards_sha256": shard_sums, "world_size": world, "steps_per_epoch": spe}}
    if world > 1:  # --batch-size became global: a several-process run begun when it was per process is not resumed
        run["data"]["per_process_batch"] = per_process
    contract = manifest.contract()  # checked for every sample and shard as they stream, as `clsp shards verify` does
    stream_cfg = StreamConfig(tuple(manifest.shard_locations()), per_process, spe, manifest.k, cfg.seed,
                              cfg.positives, acc.process_index, world, cfg.shuffle_buffer, cfg.skip_corrupt)
    if cached:  # decoded once, batches drawn from memory in this process: no loader processes
        stream = loader = CachedStream(stream_cfg, contract, draw, progress=acc.is_main_process)
    else:
        stream = ShardStream(stream_cfg, contract.rows, contract, draw)
        loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers, pin_memory=cuda,
                            generator=torch.Generator())  # own generator: iterators must not consume the global RNG
    monitor = _KnnMonitor(cfg.knn_source, size) if cfg.knn_every and acc.is_main_process else None
    out = Path(cfg.out)  # everything above checked the input; nothing was written before this line
    if draw is not None:
        acc.print(draw.note)
    claim = stack.enter_context(prepare_run_dir(out, run, TRAIN_RUN, cfg.resume, cfg.overwrite, acc))
    if claim.resumed and (out / SUMMARY).exists():
        acc.print(f"{out} is already finished with these settings: nothing to do")
        return out
    checkpoint = find_checkpoint(out) if claim.resumed else None
    if cfg.log_with:  # e.g. tensorboard: OUT/tracker/events.out.tfevents.*; the config is in config.json
        acc.init_trackers(TRACKER_DIR)
        stack.callback(acc.end_training)

    augment = BatchAugment(recipe, size, DEFAULT_MEAN, DEFAULT_STD).to(acc.device)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=round(cfg.warmup_epochs * spe), total_steps=total))
    model, optimizer = acc.prepare(method, optimizer)  # model: DDP-wrapped when world > 1, autocast when bf16
    set_seed(cfg.seed, device_specific=True)  # processes augment differently; a checkpoint's RNG replaces this
    position = {"epoch": 0, "step": 0, "global_step": 0}
    if checkpoint is not None:
        position = load_checkpoint(checkpoint, acc.process_index, method, optimizer, scheduler)
        acc.print(f"resuming {out} at epoch {position['epoch']} step {position['step']}")

    run_log = RunLog(out / LOG, acc.is_main_process, keep_steps=position["global_step"])
    bar = tqdm(total=total, initial=position["global_step"], disable=not acc.is_main_process,
               desc=f"{cfg.method}/{cfg.positives}", dynamic_ncols=True)
    stack.callback(bar.close)  # also on an error: its message then starts on a line of its own
    skipped: set[str] = set()
    steps_here = 0
    started = time.perf_counter()
    with SigtermFlag() as sigterm:
        for epoch in range(position["epoch"], cfg.epochs):
            stream.set_position(epoch, position["step"] if epoch == position["epoch"] else 0)
            model.train()
            tick = time.perf_counter()
            for step, batch in enumerate(loader, start=stream.start_step):
                for name in set(batch["skipped"]) - skipped:
                    log.warning("skipped unreadable shard %s (--skip-corrupt)", name)
                skipped.update(batch["skipped"])
                if "error" in batch:  # a shard failed in the stream (in a loader worker or here): one line, no traceback
                    bar.close()  # so that the error starts its own line
                    raise UserError(batch["error"])
                gstep = epoch * spe + step
                anchor = batch["anchor"].to(acc.device, non_blocking=True)  # (B, H, W, 3) uint8
                views = [augment(anchor), augment(anchor)]  # 2 x (B, 3, S, S), independent strong augmentations
                third = None  # (B, 3, S, S): the synthetic positive, or a third real view, with the same augmentation
                if cfg.positives == "synthetic":
                    third = augment(batch["positive"].to(acc.device, non_blocking=True))
                elif cfg.positives == "augment":
                    third = augment(anchor)
                losses = model(views, batch["ids"].to(acc.device), third)
                lr = scheduler.get_last_lr()[0]
                diverged, stop = any_process(acc, not torch.isfinite(losses["loss"].detach()).item(), sigterm.raised)
                if diverged:
                    run_log.flush()
                    raise UserError(f"loss became non-finite at step {gstep + 1} (epoch {epoch + 1}, lr {lr:.3g}); "
                                    f"training stopped and the last good checkpoint in {out} is kept. Lower --lr or "
                                    "raise --warmup-epochs, then start again with --overwrite")
                acc.backward(losses["loss"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                method.after_step((gstep + 1) / total)
                steps_here += 1
                now = time.perf_counter()
                run_log.add(step=gstep + 1, epoch=epoch + 1, lr=lr, images_per_s=world * len(anchor) / (now - tick),
                            **{k: float(v.detach()) for k, v in losses.items()})
                if cfg.log_with:
                    acc.log({k: v for k, v in run_log.last.items() if k not in ("step", "knn_top1_pct")}, gstep + 1)
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{run_log.last['loss']:.3f}")
                if stop:
                    done = step + 1 == spe
                    run_log.flush()
                    save_checkpoint(out, acc, method, optimizer, scheduler, {"epoch": epoch + done, "step": 0 if
                                    done else step + 1, "global_step": gstep + 1}, method.backbone)
                    raise UserError(f"stopped by SIGTERM after step {gstep + 1}; a checkpoint was saved: rerun "
                                    "the same command with --resume to continue")
            if monitor is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
                run_log.set_last(knn_top1_pct=monitor(method.backbone, acc.device))
                if cfg.log_with:
                    acc.log({"knn_top1_pct": run_log.last["knn_top1_pct"]}, (epoch + 1) * spe)
            run_log.flush()
            save_checkpoint(out, acc, method, optimizer, scheduler, {"epoch": epoch + 1, "step": 0,
                            "global_step": (epoch + 1) * spe}, method.backbone)
    bar.close()
    counts = acc.gather(torch.tensor([steps_here, len(skipped)], device=acc.device).view(1, 2)).view(-1, 2).tolist()
    if acc.is_main_process:
        save_backbone(out, method.backbone)
        last = run_log.last or {}
        write_json(out / SUMMARY, {"finished": True, "epochs": cfg.epochs, "steps": total, "world_size": world,
                                   "steps_per_rank_this_launch": [c[0] for c in counts],
                                   "skipped_shards": sorted(skipped), "skipped_per_rank": [c[1] for c in counts],
                                   "final_loss": last.get("loss"), "knn_top1_pct": last.get("knn_top1_pct") or None,
                                   "wall_s_this_launch": round(time.perf_counter() - started, 2)})
    acc.wait_for_everyone()
    return out


class _KnnMonitor:
    """Weighted kNN top-1 in percent (k 20, cosine, T 0.07; as eval reports it) of the backbone on a labelled source:
    train split -> test split."""

    def __init__(self, spec: str, size: int, limit: int = 5000):
        from clsp.sources import load_arrays, open_source
        from train.augment import EvalTransform

        self.bank = load_arrays(open_source(spec, "train", image_size=size), limit)[:2]
        self.query = load_arrays(open_source(spec, "test", image_size=size), limit)[:2]
        self.transform = EvalTransform(size, DEFAULT_MEAN, DEFAULT_STD)

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, device: torch.device, k: int = 20, t: float = 0.07) -> float:
        was_training = backbone.training
        backbone.eval()
        bank, query = (embed(backbone, images, self.transform, 512, device) for images in (self.bank[0], self.query[0]))
        backbone.train(was_training)
        predicted = knn_predict(bank, self.bank[1], query, (k,), t, device=device)[min(k, len(bank))]  # (Q,)
        return float(np.mean(predicted == self.query[1], dtype=np.float32)) * 100.0
