"""The shard contract: round trip, reproducible and atomic writing, and verify catching every corruption."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import build_shard_dir, random_sample
from clsp.shards import manifest, manifest_writer
from clsp.shards.manifest import MANIFEST, read_manifest
from clsp.shards.manifest_writer import write_manifest
from clsp.shards.reader import ShardError, epoch_shards, iter_samples, iter_shard
from clsp.shards.schema import SchemaError
from clsp.shards.verify import verify
from clsp.shards.writer import ShardWriter, shard_name, temp_files


def test_round_trip_keeps_every_pixel_label_and_seed(tmp_path):
    expected = random_sample("digits-0007", k=3, size=8, label=7, seed=1)
    with ShardWriter(tmp_path / shard_name(0), k=3, image_size=8) as writer:
        writer.write(expected)
    (sample,) = list(iter_shard(str(tmp_path / shard_name(0))))
    assert sample.key == "digits-0007" and sample.k == 3 and sample.label == 7
    assert np.array_equal(sample.anchor(), expected.anchor)
    for j in range(3):
        assert np.array_equal(sample.positive(j), expected.positives[j])
    assert sample.meta == {"anchor_id": "digits-0007", "seeds": expected.seeds}


def test_identical_input_gives_byte_identical_shards(tmp_path):
    a = build_shard_dir(tmp_path / "a")
    b = build_shard_dir(tmp_path / "b")
    for name in sorted(p.name for p in a.glob("shard-*.tar")):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "index.parquet").read_bytes() == (b / "index.parquet").read_bytes()


def test_crash_inside_writer_leaves_no_shard_and_no_temp_file(tmp_path):
    with pytest.raises(RuntimeError, match="disk"):
        with ShardWriter(tmp_path / shard_name(3), k=2, image_size=8) as writer:
            writer.write(random_sample("a", 2, 8, 0, 0))
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_samples_against_the_schema(tmp_path):
    with ShardWriter(tmp_path / shard_name(0), k=2, image_size=8) as writer:
        with pytest.raises(SchemaError, match="no dots"):
            writer.write(random_sample("bad.id", 2, 8, 0, 0))
        with pytest.raises(SchemaError, match="positives must be uint8"):
            writer.write(random_sample("short", 1, 8, 0, 0))
        writer.write(random_sample("ok", 2, 8, 0, 0))
        with pytest.raises(SchemaError, match="written twice"):
            writer.write(random_sample("ok", 2, 8, 0, 0))


def test_sound_directory_verifies_and_manifest_records_the_run(shard_dir):
    assert verify(shard_dir) == []
    with pytest.raises(ShardError, match=r"^file://.*: verify checks a local shard directory; copy the shards to a "
                                         r"local folder and verify that"):
        verify(f"file://{shard_dir}")
    manifest = read_manifest(str(shard_dir))
    assert manifest.count == 11 and manifest.k == 2 and len(manifest.shards) == 3
    assert manifest.index.column("anchor_id").to_pylist() == [f"anchor-{i:05d}" for i in range(11)]
    assert [s.key for s in iter_samples(manifest.shard_locations())] == manifest.index.column("anchor_id").to_pylist()


def test_truncated_shard_is_reported(shard_dir):
    path = shard_dir / shard_name(1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    problems = verify(shard_dir)
    assert any("shard-000001.tar: cannot be read as a tar" in p and "truncated" in p for p in problems)
    with pytest.raises(ShardError, match="shard-000001.tar"):
        list(iter_shard(str(path)))


def test_a_shard_cut_where_its_last_image_ends_in_zero_bytes_is_refused_also_without_its_manifest_entry(tmp_path):
    """A raw (.npy) image with black bottom rows ends in zero bytes, like a tar's end-of-archive blocks: a copy cut
    after such a member must not read as a shorter, complete shard."""
    path = tmp_path / shard_name(0)
    with ShardWriter(path, k=1, image_size=32, codec="raw") as writer:
        for n in range(3):
            sample = random_sample(f"anchor-{n:05d}", k=1, size=32, label=0, seed=n)
            sample.anchor[16:], sample.positives[:, 16:] = 0, 0  # letterboxed: the last 16 rows black
            writer.write(sample)
    data = path.read_bytes()
    members = [m for m in tarfile.open(path).getmembers() if m.name.startswith("anchor-00001.")]
    cut = members[-1].offset_data + -(-members[-1].size // 512) * 512  # the block boundary after anchor-00001
    assert data[cut - 1024:cut] == bytes(1024)  # ends as a tar does
    path.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="shard-000000.tar: cannot be read as a tar \\(no end-of-archive marker"):
        list(iter_shard(str(path)))


def test_a_manifest_above_the_size_limit_is_refused_by_the_reader_and_never_written(shard_dir, monkeypatch):
    before = {p.name: p.read_bytes() for p in shard_dir.iterdir()}
    run = read_manifest(shard_dir).run
    limit = len(before[MANIFEST]) - 1
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", limit)
    with pytest.raises(ShardError, match=f"manifest.json is larger than {limit} bytes, the most a manifest may take, "
                                         r"and was not read: regenerate the shards as fewer shards \(more --anchors"):
        read_manifest(shard_dir)
    monkeypatch.setattr(manifest_writer, "MAX_MANIFEST_BYTES", limit)
    with pytest.raises(ShardError, match=rf"it would take \d+ bytes for 3 shards, more than the {limit} read_manifest "
                                         r"reads: make fewer shards \(more --anchors-per-shard\)"):
        write_manifest(shard_dir, run)
    assert {p.name: p.read_bytes() for p in shard_dir.iterdir()} == before


def test_manifest_that_disagrees_with_its_shards_is_reported(shard_dir):
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    manifest["shards"][2]["count"] = 5
    manifest["shards"] = manifest["shards"][1:]  # forget shard 0
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    problems = verify(shard_dir)
    assert any("index.parquet lists 4 anchor(s) in shard-000000.tar, which manifest.json does not list" in p
               for p in problems)
    assert any("manifest.json says shard-000002.tar holds 5 anchors, index.parquet lists 3" in p for p in problems)


def test_changed_index_is_reported(shard_dir):
    (shard_dir / "index.parquet").write_bytes((shard_dir / "index.parquet").read_bytes() + b"x")
    assert any("index.parquet does not match the checksum" in p for p in verify(shard_dir))


def test_duplicated_anchor_is_refused(shard_dir):
    with ShardWriter(shard_dir / shard_name(3), k=2, image_size=8) as writer:
        writer.write(random_sample("anchor-00002", 2, 8, 2, seed=99))
    with pytest.raises(ShardError, match="anchor anchor-00002 appears 2 times"):  # verify: tests/test_hostile_shards.py
        write_manifest(shard_dir, read_manifest(str(shard_dir)).run)


def test_wrong_number_of_positives_and_leftover_temp_file_are_reported(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(2,), k=2)
    with ShardWriter(directory / shard_name(1), k=1, image_size=8) as writer:
        writer.write(random_sample("short-one", 1, 8, 0, 0))
    write_manifest(directory, read_manifest(str(directory)).run)
    (directory / ".tmp-shard-000002.tar.123").write_bytes(b"partial")
    problems = verify(directory)
    assert any("short-one has 1 positives, expected 2" in p for p in problems)
    assert any("unfinished file left by an interrupted writer" in p for p in problems)
    assert temp_files(directory)


def test_missing_manifest_and_other_schema_version_are_refused(shard_dir):
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="schema version 99.*reads version 1"):
        read_manifest(str(shard_dir))
    (shard_dir / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest.json.*rerun"):
        read_manifest(str(shard_dir))


def test_pipe_urls_and_path_escapes_are_refused(shard_dir):
    with pytest.raises(ShardError, match="refusing to open 'pipe:"):
        list(iter_shard("pipe:touch evil"))
    with pytest.raises(ShardError, match="refusing"):
        read_manifest("ftp://host/x")
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    manifest["shards"][0]["name"] = "../../etc/passwd"
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard names must look like"):
        read_manifest(str(shard_dir))


def test_fsspec_url_reads_the_same_samples(shard_dir):
    local = [s.key for s in iter_samples(read_manifest(str(shard_dir)).shard_locations())]
    manifest = read_manifest(f"file://{shard_dir}")
    assert [s.key for s in iter_samples(manifest.shard_locations())] == local


def test_epoch_shards_reshuffles_and_partitions_by_rank():
    shards = [f"s/shard-{i:06d}.tar" for i in range(20)]
    first, second = epoch_shards(shards, 0, 0), epoch_shards(shards, 0, 1)
    assert sorted(first) == sorted(shards) and first != second
    assert epoch_shards(shards, 0, 0) == first  # reproducible from (seed, epoch)
    ranks = [epoch_shards(shards, 0, 3, rank, 3) for rank in range(3)]
    assert sorted(sum(ranks, [])) == sorted(shards)
    assert not set(ranks[0]) & set(ranks[1])


_FILL_DISK = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
from conftest import random_sample
from clsp.shards.writer import ShardWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
with ShardWriter(sys.argv[1], k=4, image_size=32) as writer:
    for i in range(20):
        writer.write(random_sample(f"a{i}", 4, 32, 0, i))
"""


def test_disk_filling_up_leaves_no_shard_and_no_temp_file(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "out" / shard_name(0)
    target.parent.mkdir()
    result = subprocess.run([sys.executable, "-c", _FILL_DISK, str(target), str(Path(__file__).parent)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "File too large" in result.stderr
    assert list(target.parent.iterdir()) == []


# --- contact sheets ------------------------------------------------------------------------------------------------
def test_a_sheet_out_without_an_image_extension_is_refused_before_any_shard_is_read(tmp_path):
    from typer.testing import CliRunner

    from clsp.cli import app

    result = CliRunner().invoke(app, ["shards", "sheet", str(tmp_path / "no-such-dir"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--out" in result.output and ".png, .jpg, .jpeg, .webp" in result.output, result.output
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "s.png").write_bytes(b"the user's picture")
    for command in (["shards", "sheet", str(tmp_path / "no-such-dir")], ["data", "sheet", "digits"]):
        result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "s.png")])
        assert result.exit_code == 2 and result.output.startswith("error: --out: "), result.output  # not typer's
        assert "exists: pass --overwrite" in result.output and len(result.output.splitlines()) == 1  # usage text
    assert (tmp_path / "s.png").read_bytes() == b"the user's picture"


def test_a_sheet_replaces_an_existing_out_only_when_asked_and_whole(shard_dir, tmp_path, monkeypatch):
    import errno

    from PIL import Image
    from typer.testing import CliRunner

    from clsp.cli import app
    from clsp.shards.sheet import contact_sheet

    out = tmp_path / "sheets" / "s.jpg"
    out.parent.mkdir()
    out.write_bytes(b"the user's own file")
    for command in (["shards", "sheet", str(shard_dir)], ["data", "sheet", "digits"]):
        refused = CliRunner().invoke(app, [*command, "--out", str(out)])
        assert refused.exit_code == 2 and "--overwrite" in refused.output and "Traceback" not in refused.output
        assert out.read_bytes() == b"the user's own file"
    assert contact_sheet(str(shard_dir), out, overwrite=True) == out and Image.open(out).format == "JPEG"
    earlier = out.read_bytes()

    real_save = Image.Image.save

    def full_disk(image, file, format=None):  # writes the start of the image, then the disk fills up
        real_save(image, buffer := io.BytesIO(), format="JPEG")
        with open(file, "wb") if isinstance(file, (str, os.PathLike)) else file as handle:
            handle.write(buffer.getvalue()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError):
        contact_sheet(str(shard_dir), out, overwrite=True)
    assert out.read_bytes() == earlier and list(out.parent.iterdir()) == [out]  # no half sheet, no temp file


def test_a_sheet_is_never_written_into_the_folder_the_shards_were_made_from(shard_dir, tmp_path):
    """`clsp shards sheet` was the one writer without the check: its picture became an image of the source (of another
    size, so that every later read of the source was refused)."""
    from typer.testing import CliRunner

    from clsp.cli import app

    source = tmp_path / "data"
    (source / "train" / "cat").mkdir(parents=True)
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    manifest["run"]["source"]["spec"] = f"folder:{source}"
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    out = source / "train" / "cat" / "sheet.png"
    result = CliRunner().invoke(app, ["shards", "sheet", str(shard_dir), "--out", str(out)])
    assert result.exit_code == 2 and f"lies inside {source}, which the source folder:{source} reads" in result.output
    assert not out.exists()
