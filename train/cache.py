"""Decoded in-memory input: read and check every shard once, keep the decoded images, then draw batches from memory.

Why: per anchor visit the stream (train.stream) parses the sample, builds a keyed generator and decodes two images
(PNGs, or .npy files with the raw codec), in loader processes that compete with the model for the same cores. When the
decoded images fit in memory (CIFAR-10 at K = 8: about 1.4 GB; the embedded digits: 5.5 MB), decoding each image once
and indexing arrays afterwards removes the input pipeline from the step time, and no loader process is needed.

What stays the same as the stream: every sample is checked against the manifest as it is read (`Contract.samples`:
schema keys only, checksums, each shard's sha256) and bad shards stop the run or, with skip_corrupt, are skipped and
named; each anchor visit draws one of its K positives with `positive_index(seed, epoch, anchor id)` (the same draw,
filter and weighting as the stream); every rank yields `steps_per_epoch` batches. What differs: the order. Each rank
holds the index rows with row % world_size == rank and visits them in a permutation keyed on (seed, epoch, rank), a
full shuffle instead of shard order through a shuffle buffer, so a cached run and a streamed run of the same config
see the anchors in different orders (the run record says which input it used).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset
from tqdm import tqdm

from clsp.errors import UserError
from clsp.hashing import keyed_seed
from clsp.shards.manifest import Contract
from clsp.train.stream import PositiveDraw, StreamConfig, positive_index, shard_name, skippable_shard

AUTO_CACHE_BYTES = 4 << 30  # --cache unset: cache when one process's decoded images fit in this many bytes


def decoded_bytes(count: int, k: int, image_size: int, positives: str, world_size: int) -> int:
    """Bytes one process's cache holds: its share of the anchors, each with its K positives when it draws them."""
    images = 1 + (k if positives == "synthetic" else 0)
    return -(-count // world_size) * images * image_size * image_size * 3


def use_cache(requested: bool | None, count: int, k: int, image_size: int, positives: str, world_size: int) -> bool:
    """--cache / --no-cache as given; unset: cache when the decoded share fits in AUTO_CACHE_BYTES. A function of the
    config and the shards only (not of this machine's memory), so a resume elsewhere makes the same choice."""
    if requested is not None:
        return requested
    return decoded_bytes(count, k, image_size, positives, world_size) <= AUTO_CACHE_BYTES


def check_room(count: int, k: int, image_size: int, positives: str, world_size: int) -> None:
    """Refuses a cache that this machine's processes could not hold (UserError), before anything is decoded: the
    arrays are filled as the shards are read, so a cache too large for the memory would be killed part way, and could
    take other jobs on the machine with it."""
    from clsp.accelerator import available_memory, processes_here

    per_process, processes, available = decoded_bytes(count, k, image_size, positives, world_size), processes_here(), \
        available_memory()
    if available is not None and per_process * processes > available:
        gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
        raise UserError(f"the decoded cache needs {gib(per_process * processes)} on this machine ({gib(per_process)} "
                        f"per process x {processes}), and {gib(available)} is available: pass --no-cache to stream "
                        f"the shards instead (a run of its own: it visits the anchors in another order), or free "
                        f"memory or run on a machine with more")


class CachedStream(IterableDataset):
    """Same batches as `ShardStream` yields (anchor (B, H, W, 3) uint8, positive (B, H, W, 3) uint8 when synthetic,
    ids (B,) int64, labels (B,) int64, skipped), from images decoded once. Iterate it directly (no DataLoader
    needed)."""

    def __init__(self, cfg: StreamConfig, contract: Contract, draw: PositiveDraw | None = None, progress: bool = True):
        self.cfg, self.draw = cfg, draw
        self.epoch = 0
        self.start_step = 0
        self._source: tuple[Contract, bool] | None = (contract, progress)  # decoded at the first iteration: a finished
        # run that is only asked to resume returns before that, and errors surface where the stream's would

    def load(self) -> None:
        """Read, check and decode every shard now, once (the first iteration does it otherwise)."""
        if self._source is not None:
            contract, progress = self._source
            self.skipped = self._load(contract, progress)
            self._source = None

    def _load(self, contract: Contract, progress: bool) -> list[str]:
        cfg = self.cfg
        mine = {anchor_id: row for anchor_id, row in contract.rows.items() if row % cfg.world_size == cfg.rank}
        size, k = contract.image_size, cfg.k if cfg.positives == "synthetic" else 0
        images = np.empty((len(mine), 1 + k, size, size, 3), np.uint8)  # (N_rank, 1 + K, H, W, 3)
        rows, labels, keys = np.empty(len(mine), np.int64), np.empty(len(mine), np.int64), [""] * len(mine)
        filled, skipped = 0, []
        bar = tqdm(cfg.urls, desc="decoding shards into memory", unit="shard", disable=not progress, leave=False,
                   position=0)  # on the training bar's line, which it replaces while it runs
        for url in bar:
            start = filled
            try:
                for sample in contract.samples(url):
                    row = mine.get(sample.key)
                    if row is None:  # another rank's anchor
                        continue
                    images[filled, 0] = sample.anchor()
                    for j in range(k):
                        images[filled, 1 + j] = sample.positive(j)
                    rows[filled], labels[filled], keys[filled] = row, sample.label, sample.key
                    filled += 1
            except Exception as exc:  # a missing, truncated, malformed or changed shard: name it, keep none of it
                filled = start
                skipped.append(skippable_shard(url, exc, cfg.skip_corrupt))
        bar.close()
        if filled == 0:
            raise UserError(f"no readable samples in shards {', '.join(shard_name(u) for u in cfg.urls)}; "
                            "re-create them (`clsp shards verify` lists problems)")
        self.images, self.rows, self.labels, self.keys = images[:filled], rows[:filled], labels[:filled], keys[:filled]
        return skipped

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.cfg.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.cfg.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def order(self) -> np.ndarray:
        """(steps_per_epoch * batch_size,) positions in this rank's cache, the epoch's visiting order. Permutations
        keyed on (seed, epoch, rank, lap) follow one another when skipped shards leave fewer anchors than an epoch
        needs."""
        cfg = self.cfg
        need, laps = cfg.steps_per_epoch * cfg.batch_size, []
        while sum(len(lap) for lap in laps) < need:
            rng = np.random.default_rng(keyed_seed("cache-order", cfg.seed, self.epoch, cfg.rank, len(laps)))
            laps.append(rng.permutation(len(self.rows)))
        return np.concatenate(laps)[:need]

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        self.load()
        order = self.order()
        for step in range(self.start_step, cfg.steps_per_epoch):
            at = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]  # (B,) positions in the cache
            batch = {"anchor": torch.from_numpy(self.images[at, 0]), "ids": torch.from_numpy(self.rows[at]),
                     "labels": torch.from_numpy(self.labels[at]),
                     "skipped": self.skipped if step == self.start_step else []}
            if cfg.positives == "synthetic":
                visit = np.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) // len(self.rows)  # (B,) lap
                pick = [positive_index(cfg.seed, self.epoch, self.keys[i], cfg.k, int(v),
                                       *(self.draw.row(int(self.rows[i])) if self.draw is not None else ()))
                        for i, v in zip(at, visit)]  # (B,) which positive each visit uses, as the stream draws it
                batch["positive"] = torch.from_numpy(self.images[at, 1 + np.asarray(pick)])
            yield batch
