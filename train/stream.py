"""Streaming training input: shards -> batches of (anchor, one synthetic positive, id, label), equal-length per rank.

Order of the stream for one epoch:
  1. shard order reshuffled from (seed, epoch) and split by rank (`shards.reader.epoch_shards`), then split by loader
     worker, each worker's batches in proportion to the anchors its shards hold (`batch_quotas`), so that an epoch
     visits every anchor at most once where the shards allow it (each worker reads only its own shards);
  2. each worker reads its shards in turn (cycling them only when its quota exceeds them), through a small shuffle
     buffer of raw (undecoded) samples; each sample read is checked against the manifest as `clsp shards verify` checks
     it, and each shard read to its end against its manifest entry (its sha256 hashed as it streams). A shard that fails
     either stops training with one error naming it (and the sample), or with skip_corrupt is skipped and counted, its
     still-buffered samples dropped;
  3. each anchor visit draws ONE of its K positives uniformly, from a generator keyed on (seed, epoch, anchor id, pass),
     and decodes only the anchor and that positive. A `PositiveDraw` (--positive-filter, --positive-weighting, from the
     scores in the manifest's index) narrows the draw to the positives that pass the filter and/or weights it by each
     positive's distance to the anchor, from the same keyed generator.
Every rank yields exactly `steps_per_epoch` batches per epoch, so ranks with uneven shards never hang DDP. The dataset
yields whole batches (use `DataLoader(stream, batch_size=None)`). The DataLoader takes one batch from each of its A
active workers in turn, skipping those that are done, so global batch b comes from the worker `batch_owners` names;
after a mid-epoch start its workers take over, in turn, the parts of those that still owe batches, so `start_step` can
resume mid-epoch. The order depends on A: a resume must keep --workers (the run record holds it), and on how batches
are split over the workers (STREAM_PLAN: the record holds it where it matters, `recorded_plan`).
"""
from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clsp.errors import UserError
from clsp.hashing import keyed_seed
from clsp.shards.manifest import Contract
from clsp.shards.reader import ShardError, epoch_shards, iter_shard
from clsp.shards.schema import SchemaError
from clsp.vocabulary import POSITIVES

log = logging.getLogger(__name__)

WEIGHTINGS = ("uniform", "harder")  # --positive-weighting: every kept positive alike, or in proportion to its distance
_FILTER = re.compile(r"^\s*(distance|agreement)\s*(>=|<=|>|<)\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*$")
_COMPARE = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}


def positive_index(seed: int, epoch: int, anchor_id: str, k: int, visit: int = 0, keep: np.ndarray | None = None,
                   weight: np.ndarray | None = None) -> int:
    """Which of the anchor's K positives this visit uses, from a generator keyed on (seed, epoch, anchor id[, repeat
    visit]): uniform over all K by default; over those that `keep` (K,) bool lets through; with `weight` (K,), in
    proportion to it (uniform where the kept weights are unknown or sum to 0)."""
    key = (seed, epoch, anchor_id) if visit == 0 else (seed, epoch, anchor_id, visit)
    rng = np.random.default_rng(keyed_seed("positive", *key))
    candidates = np.arange(k) if keep is None else np.flatnonzero(keep)  # (C,); all K: the same draw as no filter
    w = None if weight is None else weight[candidates]  # (C,)
    if w is None or not np.isfinite(w).all() or w.sum() <= 0:
        return int(candidates[rng.integers(len(candidates))])
    return int(candidates[rng.choice(len(candidates), p=w / w.sum())])


@dataclass(frozen=True)
class PositiveFilter:
    """`METRIC OP NUMBER` (e.g. distance>=0.05): the positives an anchor may draw. Scores are float32 in 0..1."""

    metric: str  # distance | agreement
    op: str  # >= > <= <
    threshold: float

    @classmethod
    def parse(cls, text: str) -> "PositiveFilter":
        match = _FILTER.match(text)
        if match is None or float(match[3]) > 1:
            raise UserError(f"--positive-filter {text!r} is not METRIC OP NUMBER: write e.g. distance>=0.05 or "
                            "agreement>=0.5 (metric distance or agreement, then >=, >, <= or <, then a number in 0..1)")
        return cls(match[1], match[2], float(match[3]))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold!r}"

    def keep(self, scores: np.ndarray) -> tuple[np.ndarray, int]:
        """(N, K) scores (NaN rows: none) -> ((N, K) bool, the positives that pass; how many rows none passed). A row
        without scores keeps all K; a row where none passes keeps its best one (highest score for > and >=, lowest
        for < and <=), so that every anchor keeps a synthetic positive and the batch keeps its shape."""
        known = ~np.isnan(scores).any(axis=1)  # (N,)
        keep = _COMPARE[self.op](scores, np.float32(self.threshold)) | ~known[:, None]  # compared as float32
        empty = np.flatnonzero(~keep.any(axis=1)) if scores.shape[1] else np.zeros(0, np.int64)
        best = (np.argmax if self.op.startswith(">") else np.argmin)(scores[empty], axis=1)  # (E,)
        keep[empty, best] = True
        return keep, len(empty)


@dataclass(frozen=True)
class PositiveDraw:
    """Per index row: keep (N, K) bool, the positives a visit may draw (None: all); weight (N, K) float64, how often
    (None: uniformly; NaN rows: uniformly). `note` says what it does to these shards, for the log."""

    keep: np.ndarray | None
    weight: np.ndarray | None
    note: str

    def row(self, row: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return (None if self.keep is None else self.keep[row]), (None if self.weight is None else self.weight[row])


def positive_draw(positive_filter: str | None, weighting: str | None, scores: Callable[[str], np.ndarray | None],
                  where: str) -> PositiveDraw | None:
    """The draw --positive-filter / --positive-weighting ask for, from `scores(metric)` ((N, K) float32, NaN rows for
    samples without scores, None when the shards hold none: `Manifest.scores`); None: the default uniform draw."""
    def need(metric: str) -> np.ndarray:
        values = scores(metric)
        if values is None:
            how = " with --score-reference" if metric == "agreement" else ""
            raise UserError(f"{where} holds no per-positive {metric} scores, which --positive-filter/--positive-"
                            f"weighting need: rerun the `clsp synth run` command that made them{how} (finished shards "
                            "are kept and rescored), or leave these options out")
        return values

    if positive_filter is None and weighting in (None, "uniform"):
        return None
    keep, weight, notes = None, None, []
    if positive_filter is not None:
        rule = PositiveFilter.parse(positive_filter)
        keep, fallback = rule.keep(need(rule.metric))
        notes.append(f"--positive-filter {rule} keeps {int(keep.sum())} of {keep.size} positives ({fallback} "
                     f"anchor(s) with none left keep their {'highest' if rule.op[0] == '>' else 'lowest'} one)")
    if weighting == "harder":
        weight = need("distance").astype(np.float64)
        notes.append("--positive-weighting harder draws a positive in proportion to its distance to the anchor")
    return PositiveDraw(keep, weight, "; ".join(notes))


def steps_per_epoch(count: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch: every rank takes this many batches of `batch_size` anchors (per rank)."""
    steps = count // (world_size * batch_size)
    if steps < 1:  # --batch-size is global: world_size * batch_size anchors a step
        raise UserError(f"{count} anchors cannot fill one batch of {batch_size} on each of {world_size} processes; "
                        f"lower --batch-size to at most {max(1, count // world_size) * world_size}")
    return steps


# How a streamed epoch's batches are split over a rank's loader processes. 1 (clsp <= 0.3.0): equally, whatever their
# shards held, so a process with fewer anchors visited some twice while others' went unseen; 2: in proportion to them.
STREAM_PLAN = 2


def batch_quotas(anchors: list[int], steps: int, batch: int) -> list[int]:
    """The batches each loader process yields in an epoch of `steps`, from the anchors its shards hold: in proportion,
    rounded down, then one more at a time to the process with the most anchors still unvisited (the first of equals),
    so that none is visited twice where the shards allow it, and the fewest otherwise. Equal anchors: the first
    steps % A processes take one more, as in plan 1."""
    total = max(1, sum(anchors))
    quotas = [steps * count // total for count in anchors]
    while sum(quotas) < steps:
        unvisited = [count - quota * batch for count, quota in zip(anchors, quotas)]
        quotas[unvisited.index(max(unvisited))] += 1
    return quotas


def loader_split(urls: list[str], workers: int, anchors: Callable[[str], int], steps: int,
                 batch: int) -> tuple[list[list[str]], list[int]]:
    """(each active loader process's shards, its batches) from a rank's shards of an epoch (`epoch_shards`): dealt in
    turn to min(workers, shards) processes, each one's batches by `batch_quotas` from `anchors(url)`."""
    active = min(workers, len(urls))
    shards = [urls[w::active] for w in range(active)]
    return shards, batch_quotas([sum(map(anchors, own)) for own in shards], steps, batch)


def batch_owners(quotas: list[int]) -> list[int]:
    """(steps,) the loader process each batch of the epoch comes from: the DataLoader asks them in turn, skipping
    those that yielded all of theirs."""
    return [w for turn in range(max(quotas, default=0)) for w in range(len(quotas)) if quotas[w] > turn]


def recorded_plan(anchors: Mapping[str, int], seed: int, epochs: int, world: int, workers: int, batch: int,
                  steps: int) -> int | None:
    """data.stream_plan in a streamed run's record, for shards `anchors` (name -> anchors it holds): STREAM_PLAN where
    the run's batches differ from plan 1's in some epoch on some rank, so that a run begun with one plan is not resumed
    with the other; None (left out, as in the records plan 1 wrote) where the two agree: one loader process, or
    processes whose shards hold equal anchors."""
    for epoch in range(epochs if workers > 1 else 0):
        for rank in range(world):
            urls = epoch_shards(list(anchors), seed, epoch, rank, world)
            if not urls:  # fewer shards than processes: StreamConfig refuses the run with the fix
                return None
            quotas = loader_split(urls, workers, anchors.__getitem__, steps, batch)[1]
            if quotas != [steps // len(quotas) + (w < steps % len(quotas)) for w in range(len(quotas))]:  # plan 1's
                return STREAM_PLAN
    return None


@dataclass(frozen=True)
class StreamConfig:
    urls: tuple[str, ...]          # every shard of the run (see shards.reader.shard_urls)
    batch_size: int                # per rank
    steps_per_epoch: int
    k: int                         # positives per anchor in the shards
    seed: int = 0
    positives: str = "synthetic"
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 256      # raw samples held per worker to mix shard order into batches
    skip_corrupt: bool = False

    def __post_init__(self) -> None:
        if not self.urls:
            raise UserError("no shards to read; point SHARDS at a directory written by `clsp synth run`")
        if self.positives not in POSITIVES:
            raise UserError(f"positives={self.positives!r} is not one of {', '.join(POSITIVES)}")
        if self.positives == "synthetic" and self.k < 1:
            raise UserError("positives=synthetic needs shards with K >= 1 positives per anchor; "
                            "use --positives augment")
        if self.batch_size < 1 or self.steps_per_epoch < 1 or self.shuffle_buffer < 1:
            raise UserError("batch_size, steps_per_epoch and shuffle_buffer must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world size {self.world_size}")
        if len(self.urls) < self.world_size:  # a rank without a shard could only repeat another rank's batches
            raise UserError(f"{len(self.urls)} shard(s) cannot be streamed by {self.world_size} processes: each "
                            "process reads shards of its own. Train from memory (--cache), or with at most "
                            f"{len(self.urls)} processes")


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def skippable_shard(url: str, exc: Exception, skip_corrupt: bool) -> str:
    """The name of the shard at `url` that failed with `exc`, to skip (skip_corrupt); else the UserError to stop on."""
    name = shard_name(url)
    if not skip_corrupt and isinstance(exc, (ShardError, SchemaError)):  # these name shard, sample and fix
        raise UserError(f"{exc} (or pass --skip-corrupt to skip bad shards)") from exc
    if not skip_corrupt:  # anything else: a missing file, a network error
        raise UserError(f"shard {name} could not be read ({type(exc).__name__}: {exc}); re-create it, "
                        "or pass --skip-corrupt to skip unreadable shards") from exc
    log.debug("skipping unreadable shard %s (%s: %s)", name, type(exc).__name__, exc)
    return name


class ShardStream(IterableDataset):
    """Yields dicts: anchor (B, H, W, 3) uint8, positive (B, H, W, 3) uint8 or absent, ids (B,) int64,
    labels (B,) int64, skipped (list of shard names found unreadable since the previous batch), error (str, only on a
    fatal read error)."""

    def __init__(self, cfg: StreamConfig, id_index: Mapping[str, int], contract: Contract | None = None,
                 draw: PositiveDraw | None = None):
        self.cfg = cfg
        self.id_index = id_index   # anchor id -> row of the manifest index (the integer id the losses use)
        # The manifest's promises (`Manifest.contract()`): every sample read is checked as `clsp shards verify` checks
        # it, and every shard read to its end is compared with its manifest entry (sha256 hashed as the bytes stream).
        # None (benchmarks on bare shards): samples are only looked up in id_index.
        self.contract = contract
        self.draw = draw  # which positives each index row may draw, and how often; None: uniform over all K
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Call before creating the DataLoader iterator: worker processes copy the dataset when the iterator starts."""
        if not 0 <= start_step <= self.cfg.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.cfg.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def worker_plan(self, worker: int, workers: int) -> tuple[list[str], int, int]:
        """(this worker's shards, its batches this epoch, how many of them to skip for a mid-epoch resume)."""
        cfg = self.cfg
        urls = epoch_shards(list(cfg.urls), cfg.seed, self.epoch, cfg.rank, cfg.world_size)  # >= 1: StreamConfig
        shards, quotas = loader_split(urls, workers, self._anchors, cfg.steps_per_epoch, cfg.batch_size)
        owners = batch_owners(quotas)
        # The DataLoader asks workers 0, 1, ... in turn from the first batch it delivers, so after a mid-epoch start
        # process-worker `worker` plays the part of the worker-th of those still owing batches, counted from the owner
        # of global batch start_step; a worker without a shard or a part yields nothing.
        rest = owners[self.start_step:]
        parts = sorted(set(rest), key=lambda part: (part - rest[0]) % len(quotas))
        if worker >= len(parts):
            return [], 0, 0
        part = parts[worker]
        return shards[part], quotas[part], owners[:self.start_step].count(part)

    def _anchors(self, url: str) -> int:
        """The anchors the shard at `url` holds, from the manifest; without one (benchmarks on bare shards) 1 each."""
        return self.contract.entry(url)["count"] if self.contract is not None else 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls, steps, skip = self.worker_plan(worker, workers)
        if steps == 0:
            return
        self._bad: set[str] = set()        # names of shards found unreadable (skip_corrupt): not reopened
        self._skipped: list[str] = []      # ... of which not yet reported in a batch
        samples = self._raw_samples(urls)
        try:
            for _ in range(skip * self.cfg.batch_size):  # fast-forward without decoding
                next(samples)
            for _ in range(steps - skip):
                batch = self._batch(samples)
                self._skipped.clear()
                yield batch
        # bad input: hand the message to the main process as data, with no worker traceback in front of it
        except (UserError, ShardError, SchemaError) as err:
            yield {"error": str(err), "skipped": list(self._skipped)}

    def _raw_samples(self, urls: list[str]) -> Iterator[tuple[object, int]]:
        """(RawSample, pass number) forever: cycles the worker's shards through a seeded shuffle buffer."""
        cfg = self.cfg
        rng = random.Random(keyed_seed("buffer", cfg.seed, self.epoch, *[shard_name(u) for u in urls]))
        buffer: list[tuple[object, int]] = []
        visit = 0
        while True:
            read = 0
            for url in urls:
                name = shard_name(url)
                if name in self._bad:
                    continue
                try:
                    for sample in self.contract.samples(url) if self.contract is not None else iter_shard(url):
                        if name in self._bad:  # an image of it failed to decode (`_batch`): stop reading
                            break
                        buffer.append((sample, visit))
                        read += 1
                        if len(buffer) >= cfg.shuffle_buffer:
                            yield buffer.pop(rng.randrange(len(buffer)))
                except Exception as exc:  # a missing, truncated, malformed or changed shard: name it
                    buffer[:] = [item for item in buffer if item[0].shard != name]  # none of it is used
                    self._corrupt(url, exc)
            if read == 0:
                raise UserError(f"no readable samples in shards {', '.join(shard_name(u) for u in urls)}; "
                                "re-create them (`clsp shards verify` lists problems)")
            while buffer:  # end of a pass: every sample read is used before any is read again
                yield buffer.pop(rng.randrange(len(buffer)))
            visit += 1

    def _corrupt(self, url: str, exc: Exception) -> None:
        name = skippable_shard(url, exc, self.cfg.skip_corrupt)
        if name not in self._bad:  # the loop logs it and counts it
            self._bad.add(name)
            self._skipped.append(name)

    def _batch(self, samples: Iterator[tuple[object, int]]) -> dict:
        cfg = self.cfg
        anchors, positives, ids, labels = [], [], [], []
        while len(anchors) < cfg.batch_size:
            sample, visit = next(samples)
            if sample.shard in self._bad:  # buffered before one of its images failed to decode: none of it is used
                continue
            if sample.key not in self.id_index:
                raise UserError(f"anchor {sample.key!r} in shard {shard_name(sample.shard)} is not in the manifest "
                                "index; the shards and manifest.json belong to different runs")
            try:
                anchor = sample.anchor()  # (H, W, 3) uint8: decode only what this visit uses
                if cfg.positives == "synthetic":
                    narrowed = self.draw.row(self.id_index[sample.key]) if self.draw is not None else ()
                    j = positive_index(cfg.seed, self.epoch, sample.key, cfg.k, visit, *narrowed)
                    positives.append(sample.positive(j))
            except Exception as exc:  # an undecodable image inside an otherwise readable tar
                self._corrupt(sample.shard, exc)
                continue
            anchors.append(anchor)
            ids.append(self.id_index[sample.key])
            labels.append(sample.label)
        batch = {"anchor": torch.from_numpy(np.stack(anchors)), "ids": torch.tensor(ids, dtype=torch.int64),
                 "labels": torch.tensor(labels, dtype=torch.int64), "skipped": list(self._skipped)}
        if positives:
            batch["positive"] = torch.from_numpy(np.stack(positives))
        return batch
