"""Hostile and malformed shard directories: `clsp shards verify` and `clsp train run` give the same verdict, each as
clear lines (never a traceback), and nothing read from a shard is ever run.

The directories are forged the way a careless or hostile tool would: shards changed by hand, then manifest.json and
index.parquet rewritten to agree with them, with none of the writer's checks.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from clsp.cli import app
from clsp.shards import codecs
from conftest import Planted, build_shard_dir, random_sample
from clsp.shards.manifest import INDEX, MANIFEST, read_manifest
from clsp.shards.manifest_writer import write_manifest
from clsp.shards.reader import ShardError, iter_samples
from clsp.shards.schema import is_schema_key, sample_sha256
from clsp.shards.verify import verify
from clsp.shards.writer import ShardWriter, shard_name
from test_stream import write_raw_shard
from clsp.train.stream import ShardStream, StreamConfig, steps_per_epoch

runner = CliRunner()
TRAIN = ["--width", "4", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--proj-hidden", "8",
         "--proj-dim", "8"]


# --- forging -------------------------------------------------------------------------------------------------------
def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def replace_member(path: Path, name: str, data: bytes) -> None:
    write_raw_shard(path, [(n, data if n == name else d) for n, d in tar_members(path)])


def grouped(members: list[tuple[str, bytes]]) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """[(key, schema members)] in tar order, consecutive members of one key forming one sample."""
    samples: list[tuple[str, list]] = []
    for name, data in members:
        key = name.split(".", 1)[0]
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        if is_schema_key(name.split(".", 1)[1]):
            samples[-1][1].append((name, data))
    return samples


def forge_manifest(directory: Path, edit: Callable[[dict], None] | None = None, unique: bool = False,
                   label_type: pa.DataType = pa.int64()) -> None:
    """Rewrite index.parquet and manifest.json to match the shards as they are now, checking nothing.
    unique: list each anchor once (its first sample), with shard counts that agree with the index."""
    document = json.loads((directory / MANIFEST).read_text())
    rows, seen, entries = [], set(), []
    for path in sorted(directory.glob("shard-*.tar")):
        mine = 0
        for key, members in grouped(tar_members(path)):
            if unique and key in seen:
                continue
            seen.add(key)
            label = int(dict(members).get(f"{key}.cls.txt", b"-1"))
            rows.append((key, path.name, label, sample_sha256(members)))
            mine += 1
        data = path.read_bytes()
        entries.append({"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "count": mine,
                        "bytes": len(data)})
    columns = [list(c) for c in zip(*rows)]
    labels = pa.array([str(v) for v in columns[2]] if label_type == pa.string() else columns[2], label_type)
    table = pa.table({"anchor_id": columns[0], "shard": columns[1], "label": labels, "sha256": columns[3]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (directory / INDEX).write_bytes(buffer.getvalue())
    document.update(shards=entries, count=len(rows))
    document["index"]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    if edit is not None:
        edit(document)
    (directory / MANIFEST).write_text(json.dumps(document))


def png(image: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    (picture.convert("P") if mode == "P" else picture.convert(mode)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_with_a_second_ihdr(side: int) -> bytes:
    """A grayscale PNG with a second, RGB IHDR after its image data: every CRC sound, PIL decodes it by the first
    IHDR (grayscale, 2-D), a parser that kept the last header saw 8-bit RGB."""
    gray, chunks, pos = png(np.full((side, side), 90, np.uint8), "L"), [], 8
    while pos < len(gray):
        length, kind = struct.unpack(">I4s", gray[pos:pos + 8])
        chunks.append((kind, gray[pos + 8:pos + 8 + length]))
        pos += 12 + length
    chunks.insert(-1, (b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)))  # before IEND
    return gray[:8] + b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
                               for k, d in chunks)


# --- the hostile cases -----------------------------------------------------------------------------------------------
def duplicate_across_shards(d: Path, unique: bool) -> None:
    with ShardWriter(d / shard_name(3), k=2, image_size=8) as writer:
        writer.write(random_sample("anchor-00002", 2, 8, 2, seed=99))
    forge_manifest(d, unique=unique)


def duplicate_within_shard(d: Path) -> None:
    members = tar_members(d / shard_name(0))
    write_raw_shard(d / shard_name(0), members + [(n, b) for n, b in members if n.startswith("anchor-00001.")])
    forge_manifest(d, unique=True)


def images_of_another_size(d: Path, size: int) -> None:
    """Every image (or one anchor, size 16) at another size, the manifest still saying 8."""
    if size == 64:
        for path in d.glob("shard-*.tar"):
            path.unlink()
        build_shard_dir(d, k=2, size=64)
        forge_manifest(d, edit=lambda doc: doc["run"].update(image_size=8))
    else:
        replace_member(d / shard_name(1), "anchor-00005.anchor.png", png(np.zeros((size, size, 3), np.uint8), "RGB"))
        forge_manifest(d)


def anchor_in_mode(d: Path, mode: str) -> None:
    replace_member(d / shard_name(0), "anchor-00001.anchor.png", png(np.full((8, 8, 3), 90, np.uint8), mode))
    forge_manifest(d)


def second_ihdr(d: Path) -> None:
    replace_member(d / shard_name(0), "anchor-00001.pos1.png", png_with_a_second_ihdr(8))
    forge_manifest(d)


def label(d: Path, value: int) -> None:
    replace_member(d / shard_name(2), "anchor-00009.cls.txt", str(value).encode())
    forge_manifest(d, edit=lambda doc: doc["run"]["source"].update(num_classes=10))


def string_labels(d: Path) -> None:
    forge_manifest(d, label_type=pa.string())


def nested_meta(d: Path) -> None:
    replace_member(d / shard_name(1), "anchor-00004.meta.json", b"[" * (60 << 10))
    forge_manifest(d)


def pickle_member(d: Path, marker: Path) -> None:
    members = tar_members(d / shard_name(0))
    write_raw_shard(d / shard_name(0), members + [("anchor-00003.pyd", pickle.dumps(Planted(marker)))])
    forge_manifest(d)


def edited_manifest(d: Path, edit: Callable[[dict], None]) -> None:
    document = json.loads((d / MANIFEST).read_text())
    edit(document)
    (d / MANIFEST).write_text(json.dumps(document))


def corrupt_index(d: Path) -> None:
    data = (d / INDEX).read_bytes()
    (d / INDEX).write_bytes(data[:40] + b"\xff" * 64 + data[104:])
    edited_manifest(d, lambda doc: doc["index"].update(sha256=hashlib.sha256((d / INDEX).read_bytes()).hexdigest()))


def changed_after_verify(d: Path) -> None:
    """One byte of a member's zero padding changed: the tar still reads, only its checksum tells."""
    path = d / shard_name(1)
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.size % 512)
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size] = 0xFF
    path.write_bytes(bytes(data))


CASES = {  # name -> (damage, words that both verdicts must name)
    "duplicate across shards": (lambda d: duplicate_across_shards(d, unique=False), ["anchor-00002"]),
    "duplicate across shards, index listing it once": (lambda d: duplicate_across_shards(d, unique=True),
                                                        ["anchor-00002", "shard-000003.tar"]),
    "duplicate within a shard": (duplicate_within_shard, ["anchor-00001", "shard-000000.tar"]),
    "every image 64x64, manifest says 8": (lambda d: images_of_another_size(d, 64), ["64x64", "8x8"]),
    "one anchor 16x16": (lambda d: images_of_another_size(d, 16), ["anchor-00005", "16x16"]),
    "grayscale anchor": (lambda d: anchor_in_mode(d, "L"), ["anchor-00001", "grayscale"]),
    "RGBA anchor": (lambda d: anchor_in_mode(d, "RGBA"), ["anchor-00001", "RGBA"]),
    "palette anchor": (lambda d: anchor_in_mode(d, "P"), ["anchor-00001", "palette"]),
    "grayscale positive with a second, RGB IHDR": (second_ihdr, ["anchor-00001.pos1.png", "IHDR"]),
    "label -7": (lambda d: label(d, -7), ["-7"]),
    "label 5000 of 10 classes": (lambda d: label(d, 5000), ["5000", "10 classes"]),
    "index labels are strings": (string_labels, ["label", "string"]),
    "60 KiB of nested [ in meta.json": (nested_meta, ["anchor-00004", "meta.json"]),
    "run.k is text": (lambda d: edited_manifest(d, lambda doc: doc["run"].update(k="two")), ["run.k", "'two'"]),
    "no run": (lambda d: edited_manifest(d, lambda doc: doc.pop("run")), ["run is missing"]),
    "shard entry without sha256": (lambda d: edited_manifest(d, lambda doc: doc["shards"][1].pop("sha256")),
                                   ["shards[1].sha256"]),
    "index is text": (lambda d: edited_manifest(d, lambda doc: doc.update(index="x")), ["index is 'x'"]),
    "corrupt index.parquet": (corrupt_index, ["index.parquet", "Parquet"]),
    "shard changed after the manifest": (changed_after_verify, ["shard-000001.tar", "sha256"]),
}


@pytest.fixture
def fresh(tmp_path) -> Path:
    return build_shard_dir(tmp_path / "shards")


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", list(CASES))
def test_verify_and_train_refuse_each_malformed_directory_naming_the_problem(case, fresh, tmp_path):
    damage, words = CASES[case]
    damage(fresh)
    checked = runner.invoke(app, ["shards", "verify", str(fresh)])
    assert checked.exit_code == 1 and isinstance(checked.exception, (SystemExit, type(None))), checked.output  # no bug
    failures = [line for line in checked.output.splitlines() if line.startswith("FAIL ")]
    assert any(all(w in line for w in words) for line in failures), checked.output
    trained = runner.invoke(app, ["train", "run", str(fresh), "--out", str(tmp_path / "run"), "--workers", "0", *TRAIN])
    assert trained.exit_code == 2 and "Traceback" not in trained.output, trained.output
    (line,) = error_lines(trained.output)
    assert all(w in line for w in words), line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_what_pil_decodes_is_checked_even_where_the_header_check_is_fooled(monkeypatch):
    """decode_png's own guard: with the header check bypassed, the 2-D grayscale pixels are still refused."""
    forged = png_with_a_second_ihdr(8)
    monkeypatch.setattr(codecs, "check_png", lambda data, what, size: (8, 8))
    with pytest.raises(codecs.SchemaError, match=r"shard-000000.tar: anchor-00001.pos1.png decodes to PIL mode L .*"
                                                 r"\(8, 8, 3\)"):
        codecs.decode_png(forged, "shard-000000.tar: anchor-00001.pos1.png", 8)


def test_a_hostile_pickle_member_fails_both_and_is_never_run(fresh, tmp_path):
    marker = tmp_path / "pwned"
    pickle_member(fresh, marker)
    assert any("anchor-00003" in p and ".pyd" in p and "outside the schema" in p for p in verify(fresh))
    for sample in iter_samples(read_manifest(str(fresh)).shard_locations()):  # read and decode everything
        sample.anchor(), [sample.positive(j) for j in range(sample.k)], sample.label, sample.meta
        assert set(sample.members) <= {"anchor.png", "cls.txt", "meta.json", *(f"pos{j}.png" for j in range(sample.k))}
        assert sample.ignored == (["anchor-00003.pyd"] if sample.key == "anchor-00003" else [])
    trained = runner.invoke(app, ["train", "run", str(fresh), "--out", str(tmp_path / "run"), "--workers", "0", *TRAIN])
    (line,) = error_lines(trained.output)
    assert trained.exit_code == 2 and "anchor-00003" in line and ".pyd" in line
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["one anchor 16x16", "60 KiB of nested [ in meta.json"])
def test_an_error_inside_a_loader_worker_reaches_the_user_as_one_line(damage, fresh, tmp_path):
    CASES[damage][0](fresh)
    trained = runner.invoke(app, ["train", "run", str(fresh), "--out", str(tmp_path / "run"), "--workers", "1", *TRAIN])
    assert trained.exit_code == 2 and "Traceback" not in trained.output and "Caught" not in trained.output
    (line,) = error_lines(trained.output)
    assert all(w in line for w in CASES[damage][1]) and "--skip-corrupt" in line


def test_a_shard_changed_after_the_manifest_is_skipped_whole_with_skip_corrupt(fresh):
    changed_after_verify(fresh)
    manifest = read_manifest(fresh)
    cfg = StreamConfig(tuple(manifest.shard_locations()), 2, steps_per_epoch(manifest.count, 1, 2), manifest.k,
                       skip_corrupt=True)
    contract = manifest.contract()
    batches = list(ShardStream(cfg, contract.rows, contract))
    assert [s for b in batches for s in b["skipped"]] == ["shard-000001.tar"] and all("error" not in b for b in batches)
    in_changed = {row for key, row in contract.rows.items() if key in {f"anchor-{n:05d}" for n in range(4, 8)}}
    assert not in_changed & {i for b in batches for i in b["ids"].tolist()}  # none of its samples was used


def test_the_writer_refuses_a_manifest_that_readers_would_refuse_and_writes_nothing(fresh):
    run = read_manifest(fresh).run
    label(fresh, 12)  # forged: the index and manifest now hold a class number the run's 10 classes do not have
    forged = {name: (fresh / name).read_bytes() for name in (MANIFEST, INDEX)}
    with pytest.raises(ShardError, match="run.k is 'two', expected an integer"):
        write_manifest(fresh, {**run, "k": "two"})
    with pytest.raises(ShardError, match=r"label 12 of anchor anchor-00009 .* is not -1 \(unknown\) or 0..9"):
        write_manifest(fresh, {**run, "source": {**run["source"], "num_classes": 10}})
    assert {name: (fresh / name).read_bytes() for name in (MANIFEST, INDEX)} == forged


def test_the_synth_job_records_the_class_count_that_bounds_the_labels(tmp_path):
    from clsp.sources import open_source
    from clsp.synth.job import SynthConfig
    from clsp.synth.job_setup import run_metadata

    source = open_source("digits", "train", 8)
    run = run_metadata(SynthConfig(source="digits", model="google/ddpm-cifar10-32", out=tmp_path), source, len(source),
                       {"model_id": "none", "weights_sha256": "0" * 64})
    assert run["source"]["num_classes"] == 10
