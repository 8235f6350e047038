"""The training loop: stream shards -> augment on the device -> method forward -> backward -> schedule -> log ->
checkpoint.

It knows nothing about methods beyond `Method.forward(views, ids, third) -> dict(loss, loss_base, loss_clsp)`,
`Method.after_step(progress)` and `Method.backbone` (and, for the run record, `Method.cfg` and `Method.state_layout`).
One process on the CPU, or many under `torchrun`/`accelerate launch` (DDP, bf16 autocast on GPUs). `batch_size` is
global: each of N processes takes batch_size / N anchors a step, and every process takes `steps_per_epoch` equal
batches.

Here: the config, the presets, the run record and a launch's setup and finish; train.epoch runs the epochs,
train.shard_input reads the shards.
"""
from __future__ import annotations

import hashlib
import numbers
import os
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import get_type_hints

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from clsp import __version__
from clsp.accelerator import StopFlag, fresh_accelerator, say, stop_loader_processes
from clsp.errors import UserError
from clsp.file_io import write_json
from clsp.presets import preset_values
from clsp.run_dir import RunKind, prepare_run_dir, read_record
from clsp.schedules import warmup_cosine
from clsp.sources import refuse_out_in_sources
from clsp.shards.manifest import Manifest
from clsp.train.augment import AUGMENT_DRAWS, DEFAULT_MEAN, DEFAULT_STD, BatchAugment, recipe_for
from clsp.train.backbones import RESNET_LAYOUTS, build_backbone, wants_small_stem
from clsp.train.cache import use_cache
from clsp.train.checkpoint import (BACKBONE, CONFIG, LOG, SUMMARY, TRACKER_DIR, RunLog, describe_run, find_checkpoint,
                                   load_checkpoint, run_files, save_backbone, settle_checkpoint)
from clsp.train.epoch import Launch, run_epoch
from clsp.train.knn_monitor import KnnMonitor
from clsp.train.methods import Method, MethodConfig, build_method, method_names, setting_names
from clsp.train.speed import compile_encoders
from clsp.vocabulary import CPU_COMPILE_REFUSED, POSITIVES
from clsp.train.shard_input import open_input, open_shards, split_batch
from clsp.train.stream import WEIGHTINGS, PositiveFilter, recorded_plan
from clsp.train.trackers import tracker_options

# Options that may change when a run is resumed: they do not change what is computed (the streamed input's order
# depends on --workers: the record's data.stream_workers holds it; the shards may move or be spelt otherwise: the
# record's data.shards_sha256 holds their bytes).
OPERATIONAL = ("out", "shards", "workers", "resume", "overwrite", "knn_every", "knn_source", "log_with")
METHOD_SETTINGS = ("lam", "temperature", "proj_hidden", "proj_dim", "queue_size")  # options a method may lack


def _upgrade_record(record: dict) -> dict:
    """Records of clsp < 0.3 list every method's settings under "method" (one config class served all methods): keep
    those the run's method has; the others never took part in it."""
    config, settings = record.get("config", {}), record.get("method")
    method = config.get("method")
    if isinstance(settings, dict) and method in method_names():
        record["method"] = {key: value for key, value in settings.items() if key in setting_names(method)}
    data = record.get("data")
    if isinstance(data, dict) and "cache" not in config and "stream_workers" not in data and "workers" in config:
        data["stream_workers"] = stream_workers(config["workers"])  # older records: streamed with config.workers
    return record


def stream_workers(workers: int) -> int:
    """The loader processes a streamed run's order depends on: each reads its own shards through its own shuffle
    buffer (train.stream), so a resume with another count would visit other anchors. 0 (in the training process)
    reads as one would."""
    return max(1, workers)


def stream_plan(cfg: TrainConfig, manifest: Manifest, world: int) -> int | None:
    """A streamed run's data.stream_plan: how its batches are split over its loader processes (train.stream
    STREAM_PLAN), where that split differs from clsp 0.3.0's, so that a run begun by either is not resumed by the
    other; None (left out, as 0.3.0 wrote it) where the two agree: one loader process, or shards that split evenly."""
    per_process, spe = split_batch(cfg.batch_size, manifest.count, world)
    return recorded_plan({shard["name"]: shard["count"] for shard in manifest.shards}, cfg.seed, cfg.epochs, world,
                         stream_workers(cfg.workers), per_process, spe)


TRAIN_RUN = RunKind("train", CONFIG, "clsp train run", owned=run_files, describe=describe_run,
                    # data.source.spec: the same images spelt otherwise (a rerun of synth from another folder
                    # rewrites it); the source's fingerprint and data.shards_sha256 pin the data
                    operational=(*(f"config.{name}" for name in OPERATIONAL), "package_version", "compute.threads",
                                 "data.source.spec"),
                    legacy_keys=("config", "backbone", "normalize", "data"), absent_means={"method_state": 1},
                    upgrade=_upgrade_record,
                    hints={"data.stream_plan": "its loader processes split the batches as clsp <= 0.3.0 did, which no "
                                               "option brings back: finish it with that version",
                           "augment": "BYOL and NNCLR runs begun before they trained on BYOL's recipe were "
                                      "augmented with SimCLR's, which no option brings back: finish it with the clsp "
                                      "that began it",
                           "augment_draws": "its views were augmented by kornia's modules as clsp <= 0.3.0 did, which "
                                            "no option brings back: finish it with that version",
                           "compute.device": "a run goes on on the kind of device it began on (its augmentation draws "
                                             "come from that device's generator, and its float sums differ): resume "
                                             "it on a machine like the first",
                           "compute.precision": "bf16 autocast runs on a GPU only: resume it on the kind of device it "
                                                "began on, with the --precision it began with",
                           # the global batch splits over the processes, each drawing its own part of every step
                           "data.world_size": "a run goes on on as many processes as it began on (data.world_size "
                                              "there): relaunch it so, e.g. `accelerate launch --num_processes N -m "
                                              "clsp train run ... --resume`",
                           "data.per_process_batch": "each process's batch is --batch-size over the processes: pass "
                                                     "the --batch-size it began with, on as many processes"})
# embedded: 16 px digits (1,437 anchors, 11 steps an epoch) on 2 CPU cores, about 2.5 minutes a run (550 steps).
# lam 0.2 rather than SimCLR's 1.0: on this short schedule a freshly initialised network is nearly collapsed (all
# projections alike) and a pull term of weight >= 0.5 finishes the collapse within ~10 steps, for a third *real* view as
# much as for a synthetic one (measured: base loss stuck at ln(2B-1) for 250 steps); at 0.2 the base loss escapes.
# paper-cifar10: the SimCLR CIFAR-10 setting of the paper: ResNet-18 (the CIFAR stem follows from the
# 32 px images), projector 4096 -> 256, tau 0.2, lam 1.0, SGD lr 0.5 momentum 0.9 wd 1e-4, 10 warm-up epochs then
# cosine, 1000 epochs, batch 1024 (global: split over the processes).
# Literal values only: `clsp train run --help` reads this dict without importing this module (clsp.presets).
PRESETS = {
    "embedded": dict(backbone="resnet18", width=16, epochs=50, batch_size=128, lr=0.3, warmup_epochs=5.0,
                     weight_decay=5e-4, proj_hidden=512, proj_dim=128, queue_size=1024, lam=0.2, workers=1),
    "paper-cifar10": dict(method="simclr", positives="synthetic", backbone="resnet18", width=64, epochs=1000,
                          batch_size=1024, lr=0.5, momentum=0.9, weight_decay=1e-4, warmup_epochs=10.0, lam=1.0,
                          temperature=0.2, proj_hidden=4096, proj_dim=256),
}
WARMUP_SHARE = 0.1  # a warm-up not given on the command line lasts at most this share of the run
# How torch's DataLoader words the death of a loader process. It raises it wherever the training process is when it
# learns of it (SIGCHLD), mid-step too, so the run stops at its last checkpoint rather than saving a half-done step.
LOADER_DIED = "DataLoader worker (pid"


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
    compile: bool = False              # torch.compile the encoders (train.speed)
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
        for name, kinds in _FIELD_TYPES.items():  # a study's --train-option values come typed only as JSON reads them
            value = _as_builtin(getattr(self, name), kinds)  # a Path, numpy's scalars: as JSON records them
            object.__setattr__(self, name, value)
            need(type(value) in kinds or (float in kinds and type(value) is int), f"--{name.replace('_', '-')} must "
                 f"be {' or '.join(_TYPE_WORDS[k] for k in kinds)}, got {value!r}")
        need(self.method in method_names(), f"unknown method {self.method!r}: choose one of {method_names()}")
        need(self.positives in POSITIVES, f"--positives must be one of {', '.join(POSITIVES)}, got {self.positives!r}")
        need(self.optimizer == "sgd", f"optimizer {self.optimizer!r} is not available: use sgd")
        need(self.backbone in RESNET_LAYOUTS, f"--backbone {self.backbone!r} is unknown: use "
             f"{' or '.join(RESNET_LAYOUTS)}")
        for name in ("width", "epochs", "batch_size", "shuffle_buffer"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        need(self.lr > 0 and self.weight_decay >= 0, "--lr must be > 0 and --weight-decay >= 0")
        need(0 <= self.momentum < 1, f"--momentum {self.momentum}: SGD momentum must lie in [0, 1), e.g. 0.9 (at 1 "
             f"or more the updates grow without bound)")
        need(0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs ({self.warmup_epochs}) must lie in 0..--epochs ({self.epochs}): lower it, or leave it "
             f"out for {WARMUP_SHARE:.0%} of a short run")
        need(self.workers >= 0 and self.knn_every >= 0, "--workers and --knn-every must be >= 0")
        need(0 <= self.seed < 2**31, f"--seed {self.seed}: use 0 .. 2**31 - 1 (numpy's and each process's seeds must "
             f"fit 32 bits)")
        need(self.image_size is None or self.image_size >= 8, "--image-size must be >= 8 pixels")
        need(self.knn_every == 0 or bool(self.knn_source), "--knn-every needs --knn-source (a labelled source spec)")
        need(self.knn_every > 0 or not self.knn_source, "--knn-source is used only with --knn-every N (epochs between "
             "kNN monitor runs): pass both, or neither")
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
        """The method's settings from this config; one the method lacks (a preset's queue size for SimCLR) is left out
        (`make_config` refuses such an option when it is given explicitly)."""
        known = setting_names(self.method)
        settings = {name: getattr(self, name) for name in METHOD_SETTINGS if name in known}
        try:
            return MethodConfig.for_method(self.method, positives=self.positives, **settings)
        except ValueError as error:
            raise UserError(str(error)) from None


def _as_builtin(value, kinds: tuple[type, ...]):
    """`value` as the builtin type of its option when it is another spelling of one (os.PathLike for text, numpy's
    integers and floats for numbers); else as it is, for the type check."""
    if type(value) in kinds or isinstance(value, bool):
        return value
    if str in kinds and isinstance(value, os.PathLike):
        return os.fspath(value)
    if int in kinds and isinstance(value, numbers.Integral):
        return int(value)
    if float in kinds and isinstance(value, numbers.Real):
        return float(value)
    return value


_TYPE_WORDS = {bool: "true/false", int: "a whole number", float: "a number", str: "text", type(None): "unset"}
# each option's accepted value types, from its annotation ("int | None" -> (int, NoneType))
_FIELD_TYPES = {name: tuple(getattr(kind, "__args__", (kind,))) for name, kind in get_type_hints(TrainConfig).items()}


def make_config(preset: str | None = None, **options) -> TrainConfig:
    """TrainConfig from a preset (or the defaults) with the given options on top; options that are None are unset."""
    unknown = sorted(set(options) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise TypeError(f"unknown TrainConfig option(s) {unknown}")
    values = preset_values(PRESETS, preset, options)
    method = values.get("method", TrainConfig.method)
    made_for = PRESETS[preset].get("method", method) if preset else method
    if method != made_for:  # its lam, temperature and projector are that method's, not this one's defaults
        raise UserError(f"--preset {preset} is the paper's {made_for} setting (its lam, temperature, projector and "
                        f"schedule are {made_for}'s): for --method {method} leave --preset out (the method's defaults "
                        f"are its own settings) and give the schedule as options")
    stray = [name for name in METHOD_SETTINGS if options.get(name) is not None and method in method_names()
             and name not in setting_names(method)]
    if stray:
        raise UserError(f"--{stray[0].replace('_', '-')} does not apply to {method}: its settings are "
                        f"{', '.join(sorted(setting_names(method) & set(METHOD_SETTINGS)))}")
    if options.get("warmup_epochs") is None:  # the default / preset warm-up (10 epochs) scales down with a short run
        epochs = values.get("epochs", TrainConfig.epochs)
        values["warmup_epochs"] = min(values.get("warmup_epochs", TrainConfig.warmup_epochs), WARMUP_SHARE * epochs)
    return TrainConfig(**values)


def train(cfg: TrainConfig, stop_flag: StopFlag | None = None) -> Path:
    """Train (or resume) the run in `cfg.out`; returns the run directory. Call on every process of a launch.

    stop_flag: a StopFlag for train to enter around its steps in place of a new one, so that the caller can read it
    afterwards: SIGTERM or Ctrl-C during the run's last step finishes the run and train returns as usual (the study
    stops on it)."""
    with ExitStack() as stack:  # holds the claim on cfg.out (clsp.run_dir) until the run ends
        return _train(cfg, stack, stop_flag)


def _train(cfg: TrainConfig, stack: ExitStack, stop_flag: StopFlag | None) -> Path:
    run = _setup(cfg, stack)
    if run is not None:  # None: the run was already finished
        try:
            with stop_flag if stop_flag is not None else StopFlag() as stop_flag:
                for epoch in range(run.position["epoch"], cfg.epochs):
                    run_epoch(run, epoch, stop_flag)
                _finish(run)  # under the flag: a stop while the last files are written lets them finish
        except (RuntimeError, ConnectionError) as error:
            if not _loader_died(error, run):
                raise
            stop_loader_processes(run.batches)  # before torch's SIGCHLD handler raises about them again
            run.bar.close()  # so that the error starts its own line
            # torch says "is killed by signal: Killed." or "exited unexpectedly", as its SIGCHLD handler or its fetch
            # notices first; a batch whose sender died before handing over its shared memory cuts the connection
            died = str(error).strip().rstrip(".")
            if isinstance(error, ConnectionError):
                died = f"its connection was cut ({type(error).__name__}: {died})"
            raise UserError(f"a loader process died: {died}. The out-of-memory killer is the usual "
                            f"cause. {run.out} holds {describe_run(run.out)}: rerun the same command with --resume to "
                            f"go on from there "
                            f"(fewer --workers or a smaller --shuffle-buffer use less memory)") from None
    return Path(cfg.out)


def _loader_died(error: Exception, run: Launch) -> bool:
    """Whether `error` is how torch tells the training process that a loader process died. A ConnectionError counts
    only where loader processes stream the input and it was raised fetching a batch (train.epoch.fetched), and not
    when a loader raised it itself (reading shards over a network, say): the DataLoader passes those on as "Caught
    ConnectionResetError in DataLoader worker process N"."""
    if isinstance(error, ConnectionError):
        return (getattr(error, "in_fetch", False) and getattr(run.loader, "num_workers", 0) > 0
                and "in DataLoader worker process" not in str(error))
    return str(error).startswith(LOADER_DIED)


def _setup(cfg: TrainConfig, stack: ExitStack) -> Launch | None:
    """Check the input and build the method and its batches (nothing written until then), claim cfg.out, and start
    the launch (_start). None when cfg.out holds this run finished."""
    cuda = torch.cuda.is_available()
    if cfg.compile and not cuda:
        raise UserError(CPU_COMPILE_REFUSED)
    acc = fresh_accelerator(cpu=not cuda, mixed_precision="bf16" if cfg.bf16 and cuda else "no",
                            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                            **tracker_options(cfg.log_with, cfg.out))
    manifest, draw = open_shards(cfg)
    # what train writes inside a folder source would become part of it (the shards' source, the kNN monitor's)
    refuse_out_in_sources(cfg.out, [cfg.knn_source], [(manifest.run.get("source") or {}).get("spec")])
    size = cfg.image_size or int(manifest.run["image_size"])
    world = acc.num_processes
    per_process, spe = split_batch(cfg.batch_size, manifest.count, world)
    set_seed(cfg.seed)  # identical initial weights on every process
    method, built = _build_method(cfg, size)
    if cfg.compile:
        compile_encoders(method)  # lazily: the first step compiles
    cached = use_cache(cfg.cache, manifest.count, manifest.k, int(manifest.run["image_size"]), cfg.positives, world)
    record = _run_record(cfg, manifest, built, cached, world, per_process, spe)
    record["compute"] = {"device": acc.device.type, "precision": "bf16" if acc.mixed_precision == "bf16" else "fp32"}
    stream, loader = open_input(cfg, manifest, draw, per_process, spe, acc, cached)  # may set the CPU's threads
    if acc.device.type == "cpu":  # float sums round by the thread count: recorded, and a resume on another one said
        record["compute"]["threads"] = torch.get_num_threads()
    monitor = KnnMonitor(cfg.knn_source, size) if cfg.knn_every and acc.is_main_process else None
    out = Path(cfg.out)  # everything above checked the input; nothing was written before this line
    if draw is not None:
        say(acc, draw.note)
    # a run begun before the device was recorded: where it ran cannot be known, so it reads as run here and resumes
    kind = replace(TRAIN_RUN, absent_means={**TRAIN_RUN.absent_means, "compute": record["compute"]})
    before = (read_record(out, kind) or {}).get("compute", {}) if cfg.resume else {}  # the claim rewrites the record
    claim = stack.enter_context(prepare_run_dir(out, record, kind, cfg.resume, cfg.overwrite, acc))
    if claim.resumed and (out / SUMMARY).exists():
        say(acc, f"{out} is already finished with these settings: nothing to do")
        acc.wait_for_everyone()  # no process leaves while another is still in a collective (gloo aborts then)
        return None
    checkpoint = find_checkpoint(out) if claim.resumed else None
    threads = record["compute"].get("threads")  # None on a GPU; a record without the count reads as this one
    began = before.get("threads", threads)
    # without a checkpoint the run begins again from its first step: on this count, as an uninterrupted run would
    if checkpoint is not None and began != threads:
        say(acc, f"note: {out} trained on {began} CPU thread(s) per process and goes on on {threads}: a CPU run's "
                  f"weights depend on its thread count, so from here on they differ from an uninterrupted run's on "
                  f"either count (to keep them, go on with {began} thread(s) per process: OMP_NUM_THREADS={began}, "
                  f"or in a study the --jobs and cores it began with)")
    if cfg.log_with:  # e.g. tensorboard: OUT/tracker/events.out.tfevents.*; the config is in config.json
        acc.init_trackers(TRACKER_DIR)
        stack.callback(acc.end_training)
    augment = BatchAugment(built["augment"], size, DEFAULT_MEAN, DEFAULT_STD).to(acc.device)
    if cfg.compile:
        augment.compile_stages()  # lazily, as the encoders: the first step compiles
    return _start(cfg, acc, method, checkpoint, stack, spe=spe, augment=augment, stream=stream, loader=loader,
                  monitor=monitor)


def shards_sha256(manifest: Manifest) -> str:
    """One digest of every shard's bytes (their manifest sha256s, in order): the data a run's record names."""
    return hashlib.sha256("".join(s["sha256"] for s in manifest.shards).encode()).hexdigest()


def recorded_generator(manifest: Manifest) -> dict | None:
    """The generator as a run's record names it: its name and weights. The shards' bytes (shards_sha256) pin the rest;
    the config digests that synth records since are left out, so a rerun of the synth job, which adds them to an older
    manifest, does not make its runs resume as trained on other data."""
    generator = manifest.run.get("generator")
    return {key: generator.get(key) for key in ("model_id", "weights_sha256")} if isinstance(generator, dict) \
        else generator


def _run_record(cfg: TrainConfig, manifest: Manifest, built: dict, cached: bool, world: int, per_process: int,
                spe: int) -> dict:
    """The record config.json holds (a resume must match it): the config, `built` (method, augment, image_size,
    backbone), the normalisation, the package version and the data."""
    config = {key: value for key, value in asdict(cfg).items()  # unset options: a record as before they existed
              if key != "cache" and (value is not None or key not in ("positive_filter", "positive_weighting"))
              and (value or key != "compile")}  # an eager run keeps the record it had before --compile existed
    if cached:  # the streamed input keeps the record it had before the cache existed; the cache changes the order
        config["cache"] = True
    run = {"config": config, **built,
           "normalize": {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}, "package_version": __version__,
           "data": {"count": manifest.count, "k": manifest.k, "shard_image_size": int(manifest.run["image_size"]),
                    "source": manifest.run["source"], "generator": recorded_generator(manifest),
                    "shards_sha256": shards_sha256(manifest), "world_size": world, "steps_per_epoch": spe}}
    if not cached:  # --workers stays operational for the cached input, which has no loader processes
        run["data"]["stream_workers"] = stream_workers(cfg.workers)
        if (plan := stream_plan(cfg, manifest, world)) is not None:
            run["data"]["stream_plan"] = plan
    if world > 1:  # --batch-size became global: a several-process run begun when it was per process is not resumed
        run["data"]["per_process_batch"] = per_process
    return run


def _build_method(cfg: TrainConfig, size: int) -> tuple[Method, dict]:
    """The method on a fresh backbone (from the RNG as seeded), and what the run record says of how it was built."""
    small_stem = wants_small_stem(size)
    backbone, feat_dim = build_backbone(cfg.backbone, cfg.width, small_stem=small_stem)
    method = build_method(cfg.method, backbone, feat_dim, cfg.method_config())
    return method, {"method": asdict(method.cfg), "method_state": method.state_layout,
                    "augment": recipe_for(cfg.method),
                    "augment_draws": AUGMENT_DRAWS, "image_size": size,
                    "backbone": {"name": cfg.backbone, "width": cfg.width, "small_stem": small_stem,
                                 "feat_dim": feat_dim}}


def _start(cfg: TrainConfig, acc: Accelerator, method: Method, checkpoint: Path | None, stack: ExitStack, *,
           spe: int, augment: BatchAugment, stream, loader, monitor: KnnMonitor | None) -> Launch:
    """The launch: the optimiser and LR schedule, prepared with the method; the checkpoint's state (weights, position,
    RNG) when resuming; the log and the progress bar."""
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=round(cfg.warmup_epochs * spe), total_steps=spe * cfg.epochs))
    with warnings.catch_warnings():  # torch deprecates DDP's broadcast_buffers for forward_sync_buffers, which
        # accelerate's DDP kwargs do not pass yet; buffers are loaded after this, so the two do the same here
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        model, optimizer = acc.prepare(method, optimizer)  # model: DDP-wrapped when world > 1, autocast when bf16
    set_seed(cfg.seed, device_specific=True)  # processes augment differently; a checkpoint's RNG replaces this
    out = Path(cfg.out)
    position = {"epoch": 0, "step": 0, "global_step": 0}
    if checkpoint is not None:
        position = load_checkpoint(checkpoint, acc.process_index, method, optimizer, scheduler)
        total, step = spe * cfg.epochs, position["global_step"]
        say(acc, f"resuming {out} after step {step} of {total}" + (": finishing it" if step >= total else
                  f", in epoch {position['epoch'] + 1} of {cfg.epochs} (as log.csv counts them)"))
    run_log = RunLog(out / LOG, acc.is_main_process, keep_steps=position["global_step"])
    bar = tqdm(total=spe * cfg.epochs, initial=position["global_step"], disable=not acc.is_main_process,
               desc=f"{cfg.method}/{cfg.positives}", dynamic_ncols=True)
    stack.callback(bar.close)  # also on an error: its message then starts on a line of its own
    return Launch(cfg, acc, out, method, model, optimizer, scheduler, augment, stream, loader, monitor, spe, position,
                  run_log, bar)


def _finish(run: Launch) -> None:
    """The backbone and summary.json (main process), with every process's count of steps and skipped shards."""
    acc = run.acc
    run.bar.close()
    counts = acc.gather(torch.tensor([run.steps_here, len(run.skipped)], device=acc.device).view(1, 2)).view(-1, 2)
    counts = counts.tolist()
    if acc.is_main_process:
        settle_checkpoint(run.out)  # a resume at the last step saves no checkpoint that would settle it
        save_backbone(run.out, run.method.backbone)
        last = run.run_log.last or {}
        write_json(run.out / SUMMARY, {
            "finished": True, "epochs": run.cfg.epochs, "steps": run.total, "world_size": acc.num_processes,
            "device": acc.device.type, "mixed_precision": acc.mixed_precision,  # what this launch ran with
            "steps_per_rank_this_launch": [c[0] for c in counts],
            "skipped_shards": sorted(run.skipped), "skipped_per_rank": [c[1] for c in counts],
            "final_loss": last.get("loss"), "knn_top1_pct": last.get("knn_top1_pct") or None,
            "wall_s_this_launch": round(time.perf_counter() - run.started, 2)})
        knn = f", kNN monitor {last['knn_top1_pct']:.2f}%" if last.get("knn_top1_pct") else ""
        loss = f", final loss {last['loss']:.4f}" if isinstance(last.get("loss"), float) else ""
        say(acc, f"{run.out}: finished {run.total} steps{loss}{knn}; wrote {BACKBONE} and {SUMMARY}")
    acc.wait_for_everyone()
