"""The shard stream: equal batches per rank, one uniformly drawn positive per visit, per-epoch shard order, workers."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import build_shard_dir, random_sample
from clsp.errors import UserError
from clsp.shards.manifest import read_manifest
from clsp.train.stream import ShardStream, StreamConfig, positive_index, steps_per_epoch


def make_stream(directory: Path, batch: int, world: int = 1, rank: int = 0, **options) -> ShardStream:
    manifest = read_manifest(directory)
    ids = {a: i for i, a in enumerate(manifest.index.column("anchor_id").to_pylist())}
    steps = steps_per_epoch(manifest.count, world, batch)
    cfg = StreamConfig(tuple(manifest.shard_locations()), batch, steps, manifest.k, seed=3, rank=rank,
                       world_size=world, **options)
    return ShardStream(cfg, ids)


def epoch_batches(stream: ShardStream, epoch: int, workers: int = 0, start_step: int = 0) -> list[dict]:
    stream.set_position(epoch, start_step)
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def test_every_rank_yields_the_same_number_of_full_batches_from_uneven_shards(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(9, 2, 6, 1, 5), k=2)  # 23 anchors, very uneven shards
    for world in (2, 3):
        expected = steps_per_epoch(23, world, 3)
        for rank in range(world):
            stream = make_stream(directory, batch=3, world=world, rank=rank)
            for epoch in range(3):  # each epoch gives this rank other shards, with other totals
                batches = epoch_batches(stream, epoch)
                assert len(batches) == expected
                assert all(b["anchor"].shape == (3, 8, 8, 3) and b["anchor"].dtype == torch.uint8 for b in batches)
                assert all(b["positive"].shape == (3, 8, 8, 3) and b["ids"].shape == (3,) for b in batches)


def test_each_visit_uses_one_positive_of_that_anchor_drawn_uniformly(tmp_path):
    k = 4
    directory = build_shard_dir(tmp_path / "s", counts=(6, 6), k=k)
    stream = make_stream(directory, batch=4)
    manifest = read_manifest(directory)
    names = manifest.index.column("anchor_id").to_pylist()
    for epoch in range(2):
        for batch in epoch_batches(stream, epoch):
            for anchor, positive, index in zip(batch["anchor"], batch["positive"], batch["ids"].tolist()):
                n = int(names[index].split("-")[1])  # conftest made anchor-n from seed n
                original = random_sample(names[index], k, 8, n % 3, seed=n)
                assert np.array_equal(anchor.numpy(), original.anchor)
                j = positive_index(3, epoch, names[index], k)
                assert np.array_equal(positive.numpy(), original.positives[j])
    draws = Counter(positive_index(0, epoch, f"a{i}", k) for epoch in range(40) for i in range(50))  # 2000 visits
    assert set(draws) == set(range(k))
    assert all(abs(count - 500) < 100 for count in draws.values())  # +-4.6 sigma
    assert len({positive_index(0, e, "a1", k) for e in range(40)}) == k  # the draw changes between epochs


def write_raw_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_only_the_anchor_and_the_drawn_positive_are_decoded(tmp_path):
    """Positives that were not drawn are garbage bytes: the stream must never try to decode them."""
    from clsp.shards.schema import encode_sample

    k, ids, members = 3, {}, []
    for n in range(4):
        sample = random_sample(f"anchor-{n:05d}", k, 8, 0, seed=n)
        drawn = positive_index(3, 0, sample.anchor_id, k)
        for name, data in encode_sample(sample, k, 8):
            is_other_positive = ".pos" in name and not name.endswith(f".pos{drawn}.png")
            members.append((name, b"not a png" if is_other_positive else data))
        ids[sample.anchor_id] = n
    write_raw_shard(tmp_path / "shard-000000.tar", members)
    cfg = StreamConfig((str(tmp_path / "shard-000000.tar"),), 2, 2, k, seed=3)
    batches = epoch_batches(ShardStream(cfg, ids), epoch=0)
    assert len(batches) == 2 and "error" not in batches[0]
    none = ShardStream(StreamConfig(cfg.urls, 2, 2, k, seed=3, positives="none"), ids)
    assert "positive" not in epoch_batches(none, epoch=0)[0]


def shard_sequence(batches: list[dict], names: list[str], shard_of: dict) -> list[str]:
    order = [shard_of[names[i]] for b in batches for i in b["ids"].tolist()]
    return [s for j, s in enumerate(order) if j == 0 or s != order[j - 1]]


def test_shard_order_is_reshuffled_every_epoch_and_reproducible(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(2,) * 6, k=1)
    manifest = read_manifest(directory)
    names = manifest.index.column("anchor_id").to_pylist()
    shard_of = dict(zip(names, manifest.index.column("shard").to_pylist()))
    stream = make_stream(directory, batch=2, shuffle_buffer=1)  # buffer 1: samples in shard order
    orders = [shard_sequence(epoch_batches(stream, e), names, shard_of) for e in range(4)]
    assert all(sorted(o) == sorted(orders[0]) and len(o) == 6 for o in orders)  # each shard once per epoch
    assert len({tuple(o) for o in orders}) > 1
    assert shard_sequence(epoch_batches(stream, 2), names, shard_of) == orders[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_split_shards_and_a_mid_epoch_start_continues_the_same_sequence(tmp_path, workers):
    directory = build_shard_dir(tmp_path / "s", counts=(4, 4, 4, 4), k=2)
    stream = make_stream(directory, batch=4, shuffle_buffer=3)
    full = epoch_batches(stream, 1, workers)
    assert len(full) == 4
    assert sorted(i for b in full for i in b["ids"].tolist()) == list(range(16))  # every anchor once
    tail = epoch_batches(stream, 1, workers, start_step=3)
    assert len(tail) == 1 and torch.equal(tail[0]["ids"], full[3]["ids"])
    assert torch.equal(tail[0]["positive"], full[3]["positive"])
    assert [b["ids"].tolist() for b in epoch_batches(stream, 1, workers, start_step=1)] == \
        [b["ids"].tolist() for b in full[1:]]


@pytest.mark.parametrize("workers", [2, 3])
def test_loader_processes_take_batches_in_proportion_to_their_anchors_so_an_epoch_visits_each_once(tmp_path, workers):
    """Each loader process reads only its own shards. With the same number of batches each, one whose shards held
    fewer anchors visited some twice while the others' surplus went unseen; in proportion, every epoch visits each
    anchor once but the 3 that do not fill a batch, and a mid-epoch start still continues the same sequence."""
    directory = build_shard_dir(tmp_path / "s", counts=(16, 4, 12, 8, 20, 7), k=1)  # 67 anchors: 16 batches of 4
    manifest = read_manifest(directory)
    contract = manifest.contract()
    cfg = StreamConfig(tuple(manifest.shard_locations()), 4, steps_per_epoch(manifest.count, 1, 4), manifest.k,
                       seed=3, shuffle_buffer=3)
    stream = ShardStream(cfg, contract.rows, contract)  # the manifest says what each shard holds
    for epoch in range(3):  # each epoch deals the shards out anew
        full = epoch_batches(stream, epoch, workers)
        visits = Counter(i for b in full for i in b["ids"].tolist())
        assert len(full) == 16 and len(visits) == 64 and max(visits.values()) == 1, (epoch, visits)
    for start in (1, 7, 14):
        assert [b["ids"].tolist() for b in epoch_batches(stream, 2, workers, start_step=start)] == \
            [b["ids"].tolist() for b in full[start:]]


def test_a_corrupt_shard_is_named_or_skipped_and_counted(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(4, 4, 4), k=1)
    broken = directory / "shard-000001.tar"
    broken.write_bytes(broken.read_bytes()[:700])  # truncated inside the first sample
    batches = epoch_batches(make_stream(directory, batch=2), 0)
    assert "error" in batches[-1] and "shard-000001.tar" in batches[-1]["error"]
    assert "--skip-corrupt" in batches[-1]["error"]
    batches = epoch_batches(make_stream(directory, batch=2, skip_corrupt=True), 0)
    assert len(batches) == 6 and all("error" not in b for b in batches)  # quota met by cycling good shards
    assert [s for b in batches for s in b["skipped"]] == ["shard-000001.tar"]
    missing = StreamConfig((str(directory / "shard-000009.tar"),), 2, 1, 1)
    assert "shard-000009.tar" in epoch_batches(ShardStream(missing, {}), 0)[0]["error"]


def test_a_shard_with_an_undecodable_image_is_dropped_at_once_with_skip_corrupt(tmp_path):
    """The tar reads, but one anchor's positives are not PNGs: from that failure on, no sample of that shard is used,
    those already in the shuffle buffer included, and later passes skip it."""
    from clsp.shards.schema import encode_sample

    k, ids, urls = 2, {}, []
    for shard in range(3):
        members = []
        for n in range(shard * 4, shard * 4 + 4):
            sample = random_sample(f"anchor-{n:05d}", k, 8, 0, seed=n)
            for name, data in encode_sample(sample, k, 8):
                members.append((name, b"not a png" if n == 5 and ".pos" in name else data))
            ids[sample.anchor_id] = n
        urls.append(str(tmp_path / f"shard-{shard:06d}.tar"))
        write_raw_shard(Path(urls[-1]), members)
    cfg = StreamConfig(tuple(urls), 2, 10, k, seed=3, shuffle_buffer=64, skip_corrupt=True)  # 20 visits: 3 passes
    batches = epoch_batches(ShardStream(cfg, ids), epoch=0)
    assert len(batches) == 10 and [s for b in batches for s in b["skipped"]] == ["shard-000001.tar"]
    reported = next(i for i, b in enumerate(batches) if b["skipped"])
    later = {i for b in batches[reported + 1:] for i in b["ids"].tolist()}
    assert later and not later & set(range(4, 8))


def test_fewer_shards_than_processes_is_refused_with_a_fix():
    with pytest.raises(UserError, match="2 shard.*3 processes.*--cache"):
        StreamConfig(("a/shard-000000.tar", "a/shard-000001.tar"), 2, 1, 1, rank=0, world_size=3)


def test_the_batch_size_advice_is_a_global_batch_that_fits():
    with pytest.raises(UserError, match="at most 100"):
        steps_per_epoch(100, 2, 64)  # 128 anchors a step over 2 processes; 2 x 50 = 100 fit
    assert steps_per_epoch(100, 2, 50) == 1


def test_a_rank_without_shards_leaves_the_refusal_to_the_stream():
    """More processes than shards: the record's plan check ran first and raised a bare ValueError (max() of nothing);
    StreamConfig's refusal, which names the fix, is what the user must see."""
    from clsp.train.stream import recorded_plan

    assert recorded_plan({"shard-000000.tar": 10}, seed=0, epochs=1, world=2, workers=2, batch=4, steps=2) is None
