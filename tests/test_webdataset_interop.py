"""Our shards are WebDataset shards: another team's plain `webdataset` pipeline reads them, our reader reads shards that
webdataset's own writer made, and the guarantees webdataset's tar stage does not give itself still hold."""
from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import tracemalloc

import numpy as np
import pytest
import webdataset as wds

from conftest import build_shard_dir, random_sample
from clsp.shards import reader
from clsp.shards.manifest import read_manifest
from clsp.shards.reader import ShardError, iter_samples, iter_shard
from clsp.shards.schema import encode_sample, member_keys
from clsp.shards.verify import verify
from clsp.shards.writer import ShardWriter, shard_name
from test_stream import write_raw_shard


def test_a_plain_webdataset_pipeline_reads_our_shards_as_we_do(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(4, 3), k=2, classes=3)
    urls = [str(directory / shard_name(i)) for i in range(2)]
    # as another team would write it, as the README shows: WebDataset's own URL opener and its standard decoders,
    # for the schema's members only
    theirs = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8", only=member_keys(2)))
    ours = list(iter_samples(read_manifest(directory).shard_locations()))
    assert [s["__key__"] for s in theirs] == [s.key for s in ours] == [f"anchor-{n:05d}" for n in range(7)]
    for n, (their, our) in enumerate(zip(theirs, ours)):
        made = random_sample(f"anchor-{n:05d}", 2, 8, n % 3, seed=n)  # what build_shard_dir wrote
        assert int(their["cls.txt"]) == our.label == made.label
        assert their["meta.json"] == our.meta == {"anchor_id": made.anchor_id, "seeds": made.seeds}
        assert np.array_equal(their["anchor.png"], made.anchor) and np.array_equal(our.anchor(), made.anchor)
        for j in range(2):
            assert np.array_equal(their[f"pos{j}.png"], made.positives[j])
            assert np.array_equal(our.positive(j), made.positives[j])


def test_a_plain_webdataset_pipeline_reads_raw_shards_as_arrays(tmp_path):
    """Raw shards (schema 3) hold standard .npy members: webdataset's default decoders give the same arrays."""
    directory = build_shard_dir(tmp_path / "s", counts=(4, 3), k=2, classes=3, codec="raw")
    urls = [str(directory / shard_name(i)) for i in range(2)]
    theirs = list(wds.WebDataset(urls, shardshuffle=False).decode(only=member_keys(2, "raw")))
    ours = list(read_manifest(directory).samples())
    assert [s["__key__"] for s in theirs] == [s.key for s in ours] == [f"anchor-{n:05d}" for n in range(7)]
    for n, (their, our) in enumerate(zip(theirs, ours)):
        made = random_sample(f"anchor-{n:05d}", 2, 8, n % 3, seed=n)
        assert sorted(k for k in their if not k.startswith("__")) == sorted(member_keys(2, "raw"))
        assert int(their["cls.txt"]) == our.label == made.label and their["meta.json"] == our.meta
        assert their["anchor.npy"].dtype == np.uint8 and their["anchor.npy"].shape == (8, 8, 3)
        assert np.array_equal(their["anchor.npy"], made.anchor) and np.array_equal(our.anchor(), made.anchor)
        for j in range(2):
            assert np.array_equal(their[f"pos{j}.npy"], made.positives[j])
            assert np.array_equal(our.positive(j), made.positives[j])


def test_we_read_a_shard_that_webdatasets_own_writer_made(tmp_path):
    """Their TarWriter with its defaults (owner bigdata, mode 0444, the current time) in our schema."""
    made = [random_sample(f"anchor-{n:05d}", 3, 8, n, seed=n) for n in range(3)]
    with wds.TarWriter(str(tmp_path / shard_name(0)), encoder=False) as writer:
        for sample in made:
            writer.write({"__key__": sample.anchor_id,
                          **{name.split(".", 1)[1]: data for name, data in encode_sample(sample, 3, 8)}})
    read = list(iter_shard(str(tmp_path / shard_name(0))))
    assert [s.key for s in read] == [s.anchor_id for s in made]
    for ours, sample in zip(read, made):
        assert ours.label == sample.label and ours.meta["seeds"] == sample.seeds and not ours.ignored
        assert np.array_equal(ours.anchor(), sample.anchor) and np.array_equal(ours.positive(2), sample.positives[2])


def test_members_keep_the_schema_order_past_pos9(tmp_path):
    """webdataset's TarWriter sorts a sample's keys (pos10 before pos2); the schema and checksums keep pos0..pos11."""
    directory = build_shard_dir(tmp_path / "s", counts=(2,), k=12)
    with tarfile.open(directory / shard_name(0)) as tar:
        names = tar.getnames()
    assert names[:15] == [f"anchor-00000.{key}" for key in member_keys(12)]
    assert verify(directory) == []


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_a_compressed_shard_is_refused_not_inflated(tmp_path, compress):
    """webdataset's tar stage opens streams with tarfile's "r|*", which would inflate a small file into huge members."""
    path = tmp_path / shard_name(0)
    with ShardWriter(path, k=1, image_size=8) as writer:
        writer.write(random_sample("a", 1, 8, 0, seed=0))
    path.write_bytes(compress(path.read_bytes()))
    with pytest.raises(ShardError, match=r"shard-000000.tar is (gzip|bzip2|xz)-compressed; shards are plain tar"):
        list(iter_shard(str(path)))


def test_an_oversized_member_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    """webdataset reads a selected member whole before anyone sees its size: the reader caps the read itself."""
    monkeypatch.setattr(reader, "MAX_MEMBER_BYTES", 4096)
    path = tmp_path / shard_name(0)
    write_raw_shard(path, [("a.anchor.png", bytes(8 << 20)), ("a.cls.txt", b"1")])
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=r"shard-000000.tar: member a.anchor.png is more than 4096 bytes, above"):
            list(iter_shard(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the 8 MiB member was never held


def test_errors_inside_webdatasets_tar_stage_keep_a_plain_message(tmp_path):
    """Its stage appends " @ <stream>" to errors raised while it reads a member; the message stays as before."""
    path = tmp_path / shard_name(0)
    write_raw_shard(path, [("a.anchor.png", bytes(5000)), ("a.cls.txt", b"1")])
    path.write_bytes(path.read_bytes()[:2048])  # cut inside the first member's data
    with pytest.raises(ShardError) as caught:
        list(iter_shard(str(path)))
    assert str(caught.value) == ("shard-000000.tar: cannot be read as a tar (unexpected end of data); it is truncated "
                                 "or corrupt: regenerate it or rerun the synth job")


def test_a_member_key_webdataset_keeps_for_itself_is_refused(tmp_path):
    path = tmp_path / shard_name(0)
    write_raw_shard(path, [("a.anchor.png", b"x"), ("a.__url__", b"pipe:touch evil")])
    with pytest.raises(ShardError, match=r"member 'a.__url__' has a KEY starting with '__'"):
        list(iter_shard(str(path)))
