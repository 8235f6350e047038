"""The decoded in-memory input (train.cache): the same batches' contract as the stream, from images decoded once."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from clsp.errors import UserError
from conftest import build_shard_dir, random_sample
from clsp.shards.manifest import read_manifest
from clsp.train.cache import AUTO_CACHE_BYTES, CachedStream, decoded_bytes, use_cache
from clsp.file_io import read_json
from clsp.train.loop import make_config, train
from clsp.train.stream import StreamConfig, positive_draw, positive_index, steps_per_epoch


def make_cached(directory, batch: int, world: int = 1, rank: int = 0, draw=None, **options) -> CachedStream:
    manifest = read_manifest(directory)
    cfg = StreamConfig(tuple(manifest.shard_locations()), batch, steps_per_epoch(manifest.count, world, batch),
                       manifest.k, seed=3, rank=rank, world_size=world, **options)
    return CachedStream(cfg, manifest.contract(), draw, progress=False)


def epoch(stream: CachedStream, number: int, start_step: int = 0) -> list[dict]:
    stream.set_position(number, start_step)
    return list(stream)


def test_batches_hold_each_anchor_and_the_positive_its_visit_draws(tmp_path):
    k = 3
    directory = build_shard_dir(tmp_path / "s", counts=(5, 4, 3), k=k)
    names = read_manifest(directory).index.column("anchor_id").to_pylist()
    stream = make_cached(directory, batch=4)
    for number in range(2):
        batches = epoch(stream, number)
        assert len(batches) == 3 and all(b["anchor"].shape == (4, 8, 8, 3) for b in batches)
        seen = [i for b in batches for i in b["ids"].tolist()]
        assert len(set(seen)) == 12  # every anchor once per epoch
        for b in batches:
            for anchor, positive, row, label in zip(b["anchor"], b["positive"], b["ids"].tolist(), b["labels"]):
                n = int(names[row].split("-")[1])  # conftest made anchor-n from seed n, label n % 3
                original = random_sample(names[row], k, 8, n % 3, seed=n)
                assert np.array_equal(anchor.numpy(), original.anchor) and int(label) == n % 3
                assert np.array_equal(positive.numpy(), original.positives[positive_index(3, number, names[row], k)])
    orders = [torch.cat([b["ids"] for b in epoch(stream, number)]).tolist() for number in range(3)]
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert orders[1] == torch.cat([b["ids"] for b in epoch(make_cached(directory, batch=4), 1)]).tolist()


def test_ranks_hold_disjoint_anchors_and_a_mid_epoch_start_continues_the_same_order(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(6, 5, 4), k=1)
    ranks = [make_cached(directory, batch=3, world=2, rank=r) for r in range(2)]
    ids = [set(torch.cat([b["ids"] for b in epoch(s, 0)]).tolist()) for s in ranks]
    assert all(len(batches) == 2 for batches in (epoch(s, 0) for s in ranks))  # 15 // (2 * 3) steps on each rank
    assert not ids[0] & ids[1] and all(i % 2 == r for r in range(2) for i in ids[r])
    full = epoch(ranks[0], 1)
    tail = epoch(ranks[0], 1, start_step=1)
    assert len(tail) == 1 and torch.equal(tail[0]["anchor"], full[1]["anchor"])
    assert torch.equal(tail[0]["positive"], full[1]["positive"])


def test_the_positive_filter_narrows_the_draw_as_in_the_stream(tmp_path):
    k = 4
    directory = build_shard_dir(tmp_path / "s", counts=(8,), k=k)
    scores = np.tile(np.array([0.1, 0.9, 0.2, 0.8], np.float32), (8, 1))  # (N, K): positives 1 and 3 pass
    draw = positive_draw("distance>=0.5", None, lambda metric: scores, "test shards")
    stream = make_cached(directory, batch=2, draw=draw)
    names = read_manifest(directory).index.column("anchor_id").to_pylist()
    for number in range(5):
        for b in epoch(stream, number):
            for positive, row in zip(b["positive"], b["ids"].tolist()):
                n = int(names[row].split("-")[1])
                originals = random_sample(names[row], k, 8, n % 3, seed=n).positives
                drawn = [j for j in range(k) if np.array_equal(positive.numpy(), originals[j])]
                assert drawn in ([1], [3])


def test_a_bad_shard_is_named_or_skipped_once(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(4, 4, 4), k=1)
    broken = directory / "shard-000001.tar"
    broken.write_bytes(broken.read_bytes()[:700])  # truncated inside the first sample
    with pytest.raises(UserError, match="shard-000001.tar.*--skip-corrupt"):
        epoch(make_cached(directory, batch=2), 0)  # decoded, and refused, at the first iteration
    stream = make_cached(directory, batch=2, skip_corrupt=True)
    batches = epoch(stream, 0)
    assert len(batches) == 6  # the epoch's quota is met by a second lap over the 8 good anchors
    assert [s for b in batches for s in b["skipped"]] == ["shard-000001.tar"]
    assert not {i for b in batches for i in b["ids"].tolist()} & set(range(4, 8))  # nothing of the bad shard


def test_auto_caches_what_fits_and_the_record_says_so(tmp_path):
    assert decoded_bytes(50000, 8, 32, "synthetic", 1) == 50000 * 9 * 32 * 32 * 3  # CIFAR-10 at K = 8: 1.4 GB
    assert use_cache(None, 50000, 8, 32, "synthetic", 1)
    assert not use_cache(None, 1_300_000, 8, 64, "synthetic", 1)  # ImageNet-scale: streamed
    assert use_cache(None, 1_300_000, 8, 64, "none", 8)  # anchors only, split over 8 processes
    assert decoded_bytes(1_300_000, 8, 64, "none", 8) <= AUTO_CACHE_BYTES
    assert not use_cache(False, 10, 1, 8, "synthetic", 1) and use_cache(True, 10**9, 8, 224, "synthetic", 1)

    directory = build_shard_dir(tmp_path / "s", counts=(6, 6), k=1)
    tiny = dict(shards=str(directory), width=4, epochs=1, batch_size=4, lr=0.05, warmup_epochs=0.0, proj_hidden=16,
                proj_dim=8, workers=0)
    train(make_config(**tiny, out=str(tmp_path / "cached")))
    assert read_json(tmp_path / "cached" / "config.json")["config"]["cache"] is True
    train(make_config(**tiny, out=str(tmp_path / "streamed"), cache=False))
    assert "cache" not in read_json(tmp_path / "streamed" / "config.json")["config"]  # the record streamed runs had
    with pytest.raises(UserError, match="config.cache"):  # a streamed run is not resumed in another order
        train(make_config(**tiny, out=str(tmp_path / "streamed"), resume=True))
    train(make_config(**tiny, out=str(tmp_path / "streamed"), resume=True, cache=False))


def test_a_cache_this_machine_cannot_hold_is_refused_before_anything_is_decoded_or_written(tmp_path, monkeypatch):
    import clsp.accelerator

    directory = build_shard_dir(tmp_path / "s", counts=(6, 6), k=1, size=8)
    tiny = dict(shards=str(directory), width=4, epochs=1, batch_size=4, lr=0.05, warmup_epochs=0.0, proj_hidden=16,
                proj_dim=8, workers=0)
    need = decoded_bytes(12, 1, 8, "synthetic", 1)  # 12 anchors with 1 positive each, 8 px
    assert clsp.accelerator.available_memory() > need  # this machine's own figure (Linux: /proc/meminfo)
    monkeypatch.setattr(clsp.accelerator, "available_memory", lambda: 2 * need - 1)  # two processes need 2 x need
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(CachedStream, "load", lambda self: pytest.fail("decoding began"))
    with pytest.raises(UserError, match=r"needs .* on this machine \(.* per process x 2\).*--no-cache"):
        train(make_config(**tiny, out=str(tmp_path / "cached"), cache=True))
    assert not (tmp_path / "cached").exists()
    monkeypatch.undo()  # one process (LOCAL_WORLD_SIZE unset) and the real load again: it fits in `need`
    monkeypatch.setattr(clsp.accelerator, "available_memory", lambda: need)
    train(make_config(**tiny, out=str(tmp_path / "cached"), cache=True))
    assert read_json(tmp_path / "cached" / "summary.json")["steps"] == 3


def test_an_anchor_visited_again_in_an_epoch_draws_its_positive_again(tmp_path):
    """The method draws one of the K positives each time the anchor is visited: a shard skipped (--skip-corrupt)
    makes an epoch go round the readable anchors again, and the second visit draws anew, as the stream does."""
    shards = build_shard_dir(tmp_path / "shards", counts=(40, 40, 40), k=8, size=8)
    manifest = read_manifest(str(shards))
    broken = shards / "shard-000001.tar"  # changed after the manifest: skipped with skip_corrupt
    data = bytearray(broken.read_bytes())
    data[600] ^= 0xFF
    broken.write_bytes(bytes(data))
    cfg = StreamConfig(tuple(manifest.shard_locations()), 8, 15, 8, 0, "synthetic", 0, 1, 256, True)
    stream = CachedStream(cfg, manifest.contract(), progress=False)
    stream.set_position(0)
    picks = defaultdict(list)
    for batch in stream:
        for anchor_id, positive in zip(batch["ids"].tolist(), batch["positive"]):
            picks[anchor_id].append(positive.numpy().tobytes())
    assert stream.skipped == ["shard-000001.tar"]
    repeated = [v for v in picks.values() if len(v) > 1]
    assert len(repeated) == 40  # 120 visits over the 80 readable anchors
    redrawn = sum(len(set(v)) > 1 for v in repeated)
    assert redrawn >= 25  # a uniform redraw differs 7/8 of the time (~35 of 40); drawn once per epoch: 0
