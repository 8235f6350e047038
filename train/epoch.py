"""One epoch of a training launch: per step augment on the device -> method forward -> backward -> schedule -> log;
then the kNN monitor when due and a checkpoint. A non-finite loss ends the launch within its step, SIGTERM after it
(after the epoch's end when it is the epoch's last)."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clsp.accelerator import StopFlag, say, sum_over_processes
from clsp.errors import StoppedBySignal, UserError
from clsp.train.checkpoint import RunLog, find_checkpoint, save_checkpoint
from clsp.train.speed import to_view_layout

if TYPE_CHECKING:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from clsp.train.augment import BatchAugment
    from clsp.train.cache import CachedStream
    from clsp.train.knn_monitor import KnnMonitor
    from clsp.train.loop import TrainConfig
    from clsp.train.methods import Method
    from clsp.train.stream import ShardStream

log = logging.getLogger(__name__)


@dataclass
class Launch:
    """What one launch of a run holds from its setup (train.loop) through its epochs to its finish."""

    cfg: TrainConfig
    acc: Accelerator
    out: Path
    method: Method                          # checkpoints, after_step, backbone
    model: torch.nn.Module                  # the method as prepared: DDP-wrapped when world > 1, autocast when bf16
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    augment: BatchAugment
    stream: ShardStream | CachedStream
    loader: Iterable[dict]                  # the stream's batches: the stream itself when cached, else a DataLoader
    monitor: KnnMonitor | None              # main process with --knn-every only
    spe: int                                # steps per epoch
    position: dict                          # where this launch starts: epoch, step, global_step
    run_log: RunLog
    bar: tqdm
    skipped: set[str] = field(default_factory=set)  # unreadable shards skipped (--skip-corrupt)
    steps_here: int = 0                     # steps this process took in this launch
    started: float = field(default_factory=time.perf_counter)
    tick: float = 0.0                       # when the last step ended (images_per_s)
    batches: Iterator[dict] | None = None   # the epoch's iterator over `loader` (stopped at once if a loader dies)

    @property
    def total(self) -> int:
        return self.spe * self.cfg.epochs


def run_epoch(run: Launch, epoch: int, stop_flag: StopFlag) -> None:
    """Epoch `epoch` (in the launch's first, from its resumed step), the kNN monitor when due, and a checkpoint.
    SIGTERM or Ctrl-C stops the launch after its step with a checkpoint; on an epoch's last step only after the
    epoch's own work and checkpoint (the resumed run then logs what an uninterrupted one does); on the run's last step
    the run finishes."""
    cfg, acc = run.cfg, run.acc
    run.stream.set_position(epoch, run.position["step"] if epoch == run.position["epoch"] else 0)
    run.model.train()
    run.tick = time.perf_counter()
    stop, by = False, ""
    run.batches = iter(run.loader)
    for step, batch in enumerate(fetched(run.batches), start=run.stream.start_step):
        _check_batch(run, batch)
        stop = _step(run, epoch, step, batch, stop_flag)
        by = (stop_flag.by or "a stop signal to another process") if stop else ""
        if stop and step + 1 < run.spe:
            _checkpoint(run, {"epoch": epoch, "step": step + 1, "global_step": epoch * run.spe + step + 1}, by)
    if run.monitor is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
        run.run_log.set_last(knn_top1_pct=run.monitor(run.method.backbone, acc.device))
        if cfg.log_with:
            acc.log({"knn_top1_pct": run.run_log.last["knn_top1_pct"]}, (epoch + 1) * run.spe)
    _checkpoint(run, {"epoch": epoch + 1, "step": 0, "global_step": (epoch + 1) * run.spe},
                by if epoch + 1 < cfg.epochs else "")
    if stop:  # on the run's last step nothing is left to resume: the launch finishes the run (a few files)
        run.bar.close()  # so that the note starts its own line
        say(acc, f"{by} came during the run's last step: {run.out} is finished")


def fetched(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches`, marking a ConnectionError raised while one is fetched (`error.in_fetch = True`): only such a cut
    can be a loader process's death (train.loop), not one raised by the step, a tracker or a user's hook."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ConnectionError as error:
            error.in_fetch = True
            raise
        yield batch


def _checkpoint(run: Launch, position: dict, stopped_by: str = "") -> None:
    """The log and a checkpoint at `position`; then, when `stopped_by` names a signal, StoppedBySignal."""
    run.run_log.flush()
    save_checkpoint(run.out, run.acc, run.method, run.optimizer, run.scheduler, position, run.method.backbone)
    if stopped_by:
        raise StoppedBySignal(f"stopped by {stopped_by} after step {position['global_step']}; a checkpoint was saved: "
                               "rerun the same command with --resume to continue", by=stopped_by)


def _check_batch(run: Launch, batch: dict) -> None:
    """Warn once for each shard skipped as unreadable; a shard that failed in the stream ends the run."""
    for name in set(batch["skipped"]) - run.skipped:
        log.warning("skipped unreadable shard %s (--skip-corrupt)", name)
    run.skipped.update(batch["skipped"])
    if "error" in batch:  # a shard failed in the stream (in a loader worker or here): one line, no traceback
        run.bar.close()  # so that the error starts its own line
        raise UserError(batch["error"])


def _step(run: Launch, epoch: int, step: int, batch: dict, stop_flag: StopFlag) -> bool:
    """One optimiser step; a non-finite loss (on any process) stops the run. True: SIGTERM or Ctrl-C came (on any
    process), the launch stops after this step.

    The losses come to the host once, after the update (neither the augmentation nor the method's step waits for the
    device: tests/test_augment.py and tests/test_methods.py check that on the meta device): a check
    before backward would hold the backward's launch until the forward had run. A non-finite loss has then updated
    the weights in memory, which the run drops: it stops here, and its checkpoints on disk are kept."""
    acc = run.acc
    gstep = epoch * run.spe + step
    losses = _losses(run, batch)
    lr = run.scheduler.get_last_lr()[0]
    raised = stop_flag.raised  # read where it always was: a signal that comes during the update counts for the next
    acc.backward(losses["loss"])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.method.after_step((gstep + 1) / run.total)
    # (losses + 1,): the losses and the stop flag, summed over the processes in one reduction and one copy, so that
    # log.csv holds each loss's mean over the processes and every process stops at the same step; a non-finite loss
    # on any process makes the mean non-finite, so every process stops on it
    local = torch.stack([v.detach().float() for v in losses.values()])
    *sums, stops = sum_over_processes(acc, torch.cat([local, local.new_tensor([float(raised)])]))
    values = {name: total / acc.num_processes for name, total in zip(losses, sums)}
    diverged, stop = not math.isfinite(values["loss"]), stops > 0
    if diverged:
        run.run_log.flush()
        kept = (f"the last good checkpoint in {run.out} is kept" if find_checkpoint(run.out) is not None
                else "no checkpoint had been saved yet")
        raise UserError(f"loss became non-finite at step {gstep + 1} (epoch {epoch + 1}, lr {lr:.3g}); "
                        f"training stopped and {kept}. Lower --lr or raise --warmup-epochs, then start again with "
                        "--overwrite")
    run.steps_here += 1
    _log_step(run, epoch, gstep, lr, values, len(batch["anchor"]))
    return stop


def _losses(run: Launch, batch: dict) -> dict:
    """The method's losses on two augmented views of the anchors and, per --positives, a third view."""
    device = run.acc.device
    anchor = batch["anchor"].to(device, non_blocking=True)  # (B, H, W, 3) uint8

    def view(images: torch.Tensor, which: int) -> torch.Tensor:  # (B, H, W, 3) uint8 -> (B, 3, S, S), NHWC on a GPU
        return to_view_layout(run.augment(images, view=which))

    views = [view(anchor, 0), view(anchor, 1)]  # independent strong augmentations
    # the synthetic positive, or a third real view, augmented as view 2: it is paired with view 1 (z1), as view 2 is
    third = None
    if run.cfg.positives == "synthetic":
        third = view(batch["positive"].to(device, non_blocking=True), 1)
    elif run.cfg.positives == "augment":
        third = view(anchor, 1)
    return run.model(views, batch["ids"].to(device), third)


def _log_step(run: Launch, epoch: int, gstep: int, lr: float, losses: dict[str, float], anchors: int) -> None:
    now = time.perf_counter()
    run.run_log.add(step=gstep + 1, epoch=epoch + 1, lr=lr, images_per_s=run.acc.num_processes * anchors /
                    (now - run.tick), **losses)
    if run.cfg.log_with:
        run.acc.log({k: v for k, v in run.run_log.last.items() if k not in ("step", "knn_top1_pct")}, gstep + 1)
    run.tick = now
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{run.run_log.last['loss']:.3f}", refresh=False)  # drawn at the bar's pace
