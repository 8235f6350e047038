"""Hostile and malformed shard directories: `clsp shards verify`, `clsp train run` and `clsp eval audit` give the same
verdict, each as clear lines (never a traceback), and nothing read from a shard is ever run.

The directories are forged the way a careless or hostile tool would: shards changed by hand, then manifest.json and
index.parquet rewritten to agree with them, with none of the writer's checks.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
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
from clsp.shards import codecs, reader
from conftest import Planted, build_shard_dir, random_sample
from clsp.shards.manifest import INDEX, MANIFEST, read_manifest
from clsp.shards.manifest_writer import write_manifest
from clsp.shards.reader import MAX_MEMBER_BYTES, ShardError, iter_samples, iter_shard
from clsp.shards.schema import is_schema_key, member_keys, sample_sha256
from clsp.shards.verify import verify
from clsp.shards.writer import ShardWriter, shard_name
from test_stream import write_raw_shard
from clsp.train.stream import ShardStream, StreamConfig, steps_per_epoch

runner = CliRunner()
TRAIN = ["--width", "4", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--proj-hidden", "8",
         "--proj-dim", "8"]


# --- forging -------------------------------------------------------------------------------------------------------
def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """The regular members (links and the like have no bytes of their own)."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


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


def replace_index(d: Path, data: bytes) -> None:
    """index.parquet becomes `data`, and manifest.json gives its checksum."""
    (d / INDEX).write_bytes(data)
    edited_manifest(d, lambda doc: doc["index"].update(sha256=hashlib.sha256(data).hexdigest()))


def corrupt_index(d: Path) -> None:
    data = (d / INDEX).read_bytes()
    replace_index(d, data[:40] + b"\xff" * 64 + data[104:])


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def with_raw_member(path: Path, name: str, raw: bytes, after: bool = False) -> None:
    """Rebuild a shard with `raw` (a member's headers and data, made by hand) in place of member `name`, or after it."""
    blocks = []
    for member, data in tar_members(path):
        info = tarfile.TarInfo(member)
        info.size = len(data)
        blocks += [info.tobuf(tarfile.USTAR_FORMAT) + padded(data)] if after or member != name else []
        blocks += [raw] if member == name else []
    path.write_bytes(b"".join(blocks) + bytes(2 * tarfile.BLOCKSIZE))


def special(name: str, kind: bytes, target: str = "") -> bytes:
    """The header of a member that is not a regular file: a link to `target`, a directory, a device, a FIFO."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info.tobuf(tarfile.USTAR_FORMAT)


def links(d: Path) -> None:
    """Beside anchor-00001's members, a symbolic link to /etc/passwd and a hard link to its anchor image."""
    with_raw_member(d / shard_name(0), "anchor-00001.anchor.png", after=True,
                    raw=special("anchor-00001.payload.pyd", tarfile.SYMTYPE, "/etc/passwd")
                    + special("anchor-00001.model.pth", tarfile.LNKTYPE, "anchor-00001.anchor.png"))
    forge_manifest(d)


def gnu_sparse(name: str, size: int) -> bytes:
    """A GNU sparse member (type S) of `size` bytes, all of them hole: one 512-byte header, no data."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(size, 12, tarfile.GNU_FORMAT) + tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # 0 B at size
    header[483:495] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)  # the size it stands for
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def pax_sparse(name: str, size: int, sparse_map: bytes | None = None) -> bytes:
    """A PAX (GNU 1.0) sparse member of `size` bytes, all of them hole: its map is its only data."""
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(size)}
    data = padded(f"1\n{size}\n0\n".encode() if sparse_map is None else sparse_map)  # one 0-byte block at `size`
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data


def declaring(name: str, size: int) -> bytes:
    """A regular member's header declaring `size` bytes (none of which follow)."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT)


def not_a_file(d: Path, make: Callable[[Path], None]) -> None:
    """shard-000001.tar replaced by something that is not a regular file (`make` puts it at the path)."""
    path = d / shard_name(1)
    path.unlink()
    make(path)


def damaged_header(d: Path) -> None:
    """One byte of anchor-00002's first header changed, the manifest rewritten by a tool that read the tar as far as
    tarfile goes (which ends quietly at a bad header after the first): it agrees with the shard's bytes and count."""
    path = d / shard_name(0)
    data = bytearray(path.read_bytes())
    data[data.find(b"anchor-00002.anchor.png") + 3] ^= 1
    path.write_bytes(bytes(data))
    forge_manifest(d)


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
    # what made the positives: the sweep samples as they say (it met a KeyError, or a hint to fix its own options)
    "an empty sampler": (lambda d: edited_manifest(d, lambda doc: doc["run"].update(sampler={})),
                         ["run.sampler.w is missing"]),
    "sampler w is text": (lambda d: edited_manifest(d, lambda doc: doc["run"]["sampler"].update(
        w="banana", steps=-5)), ["run.sampler.w is 'banana', expected a number"]),
    "sampler steps -5": (lambda d: edited_manifest(d, lambda doc: doc["run"]["sampler"].update(steps=-5)),
                         ["run.sampler.steps is -5, expected at least 1"]),
    "an unknown noise": (lambda d: edited_manifest(d, lambda doc: doc["run"]["sampler"].update(noise="dice")),
                         ["run.sampler.noise is 'dice'"]),
    "shard entry without sha256": (lambda d: edited_manifest(d, lambda doc: doc["shards"][1].pop("sha256")),
                                   ["shards[1].sha256"]),
    "index is text": (lambda d: edited_manifest(d, lambda doc: doc.update(index="x")), ["index is 'x'"]),
    "corrupt index.parquet": (corrupt_index, ["index.parquet", "Parquet"]),
    "shard changed after the manifest": (changed_after_verify, ["shard-000001.tar", "sha256"]),
    "symbolic link to /etc/passwd and a hard link": (links, ["shard-000000.tar", "anchor-00001.payload.pyd",
                                                             "symbolic link to '/etc/passwd'"]),
    # a read of either would never end
    "a shard that is a link to /dev/zero": (lambda d: not_a_file(d, lambda p: p.symlink_to("/dev/zero")),
                                            ["shard-000001.tar", "not a regular file"]),
    "a shard that is a FIFO": (lambda d: not_a_file(d, os.mkfifo), ["shard-000001.tar", "not a regular file"]),
    "a damaged header, the manifest counting the samples before it": (damaged_header, [
        "shard-000000.tar", "no end-of-archive marker where the members end"]),
    "a member named KEY.anchor.png and a newline": (lambda d: (with_raw_member(
        d / shard_name(0), "anchor-00001.anchor.png", after=True, raw=declaring("anchor-00001.anchor.png\n", 0)),
        forge_manifest(d)), ["anchor-00001", "outside the schema"]),
}


@pytest.fixture
def fresh(tmp_path) -> Path:
    return build_shard_dir(tmp_path / "shards")


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", list(CASES))
def test_verify_train_and_audit_refuse_each_malformed_directory_naming_the_problem(case, fresh, tmp_path):
    """The audit is how a team receiving shards decides whether to trust them: it read samples unchecked, and scored
    positives that verify and training refuse (changed pixels, extra anchors or positives, another image size)."""
    damage, words = CASES[case]
    damage(fresh)
    audited = runner.invoke(app, ["eval", "audit", str(fresh), "--source", "digits", "--out", str(tmp_path / "audit"),
                                  "--anchors", "16", "--components", "4"])
    assert audited.exit_code == 2 and "Traceback" not in audited.output, audited.output
    (line,) = error_lines(audited.output)
    assert all(w in line for w in words), line
    assert not (tmp_path / "audit").exists()
    checked = runner.invoke(app, ["shards", "verify", str(fresh)])
    assert checked.exit_code == 1 and isinstance(checked.exception, (SystemExit, type(None))), checked.output  # no bug
    failures = [line for line in checked.output.splitlines() if line.startswith("FAIL ")]
    assert any(all(w in line for w in words) for line in failures), checked.output
    trained = runner.invoke(app, ["train", "run", str(fresh), "--out", str(tmp_path / "run"), "--workers", "0", *TRAIN])
    assert trained.exit_code == 2 and "Traceback" not in trained.output, trained.output
    (line,) = error_lines(trained.output)
    assert all(w in line for w in words), line
    assert not (tmp_path / "run" / "summary.json").exists()


INFLATING = {  # a member put in place of anchor-00004.pos0.png -> how the refusal names it
    "GNU sparse, 3 GiB of hole": (lambda name: gnu_sparse(name, 3 << 30), "is a sparse file declaring 3221225472"),
    "PAX sparse, 3 GiB of hole": (lambda name: pax_sparse(name, 3 << 30), "is a sparse file declaring 3221225472"),
    "declares one byte too many": (lambda name: declaring(name, MAX_MEMBER_BYTES + 1),
                                   f"is more than {MAX_MEMBER_BYTES} bytes, above the limit (it declares "
                                   f"{MAX_MEMBER_BYTES + 1})"),
}


@pytest.mark.parametrize("case", list(INFLATING))
def test_a_member_that_would_inflate_is_refused_by_its_header_and_never_opened(case, fresh, monkeypatch):
    """tarfile fills a sparse member's holes in memory, reading nothing: what reading a member costs is the size its
    header declares, not the bytes the shard holds (a 1.5 KB shard made `verify` take 1.75 GB)."""
    make, refusal = INFLATING[case]
    with_raw_member(fresh / shard_name(1), "anchor-00004.pos0.png", make("anchor-00004.pos0.png"))
    opened, extractfile = [], tarfile.TarFile.extractfile

    def spy(tar, member):
        opened.append(member.name)
        if member.name == "anchor-00004.pos0.png":
            pytest.fail(f"the reader opened {member.name}, which declares {member.size} bytes")  # never inflated
        return extractfile(tar, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    problems = verify(fresh)
    assert any(p.startswith(f"shard-000001.tar: member anchor-00004.pos0.png {refusal}") for p in problems), problems
    assert "anchor-00004.anchor.png" in opened  # the spy does see what the reader opens


NOT_REGULAR = {  # a member put in place of anchor-00004.pos0.png -> how the refusal names it
    "symbolic link": (tarfile.SYMTYPE, "/etc/passwd", "is a symbolic link to '/etc/passwd'"),
    "hard link": (tarfile.LNKTYPE, "anchor-00004.anchor.png", "is a hard link to 'anchor-00004.anchor.png'"),
    "directory": (tarfile.DIRTYPE, "", "is a directory"),
    "FIFO": (tarfile.FIFOTYPE, "", "is a FIFO"),
    "character device": (tarfile.CHRTYPE, "", "is a character device"),
}


@pytest.mark.parametrize("case", list(NOT_REGULAR))
def test_a_member_that_is_not_a_regular_file_is_refused_by_name_never_followed(case, fresh):
    """webdataset's tar stage skips such members unseen, so a schema name could hide behind a link: each is named."""
    kind, target, refusal = NOT_REGULAR[case]
    path = fresh / shard_name(1)
    with_raw_member(path, "anchor-00004.pos0.png", special("anchor-00004.pos0.png", kind, target))
    with pytest.raises(ShardError, match=re.escape(f"shard-000001.tar: member anchor-00004.pos0.png {refusal}; a "
                                                   f"shard holds regular files only")):
        list(iter_shard(str(path)))


def test_tar_headers_are_read_under_a_limit(fresh, monkeypatch):
    """tarfile parses PAX records, long names and sparse maps in memory before anyone sees their member."""
    info = tarfile.TarInfo("anchor-00004.pos0.png")
    info.pax_headers = {"comment": "x" * 8192}
    with_raw_member(fresh / shard_name(1), "anchor-00004.pos0.png", info.tobuf(tarfile.PAX_FORMAT))
    monkeypatch.setattr(reader, "MAX_HEADER_BYTES", 4096, raising=False)  # absent: no limit
    with pytest.raises(ShardError, match=r"^shard-000001.tar: a member's tar headers \(PAX records, long names or "
                                         r"sparse maps\) take more than 4096 bytes, above the limit"):
        list(iter_shard(str(fresh / shard_name(1))))


def test_a_sparse_map_tarfile_cannot_parse_is_a_corrupt_shard_not_a_traceback(fresh):
    with_raw_member(fresh / shard_name(1), "anchor-00004.pos0.png", pax_sparse("anchor-00004.pos0.png", 100, b"x\n"))
    with pytest.raises(ShardError, match=r"^shard-000001.tar: cannot be read as a tar \(malformed header: "):
        list(iter_shard(str(fresh / shard_name(1))))


def index_bytes(index: pa.Table, long_id: str, every_row: bool = False, json: bool = False, **options) -> bytes:
    """The index with `long_id` as its first (or every) anchor id (as JSON text: arrow's json type), written with
    pq.write_table's `options`."""
    ids = pa.array([long_id] * index.num_rows if every_row else [long_id, *index.column(0).to_pylist()[1:]])
    ids = pa.ExtensionArray.from_storage(pa.json_(), ids) if json else ids
    buffer = io.BytesIO()
    pq.write_table(index.set_column(0, pa.field("anchor_id", ids.type), ids), buffer, **options)
    return buffer.getvalue()


def understating(data: bytes) -> bytes:
    """The Parquet file with its footer saying that its first column (and its row group) take 1000 bytes decoded:
    the sizes are rewritten as Thrift varints of the same length (padded with empty 7-bit groups)."""
    def varint(n: int, length: int = 0) -> bytes:
        zigzag, out = n << 1, bytearray()
        while zigzag >= 0x80 or len(out) < length - 1:
            out.append(zigzag & 0x7F | 0x80)
            zigzag >>= 7
        return bytes(out + bytes([zigzag]))

    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    start = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    footer = data[start:-8]
    for size in (metadata.row_group(0).column(0).total_uncompressed_size, metadata.row_group(0).total_byte_size):
        footer = footer.replace(varint(size), varint(1000, len(varint(size))))
    assert pq.ParquetFile(io.BytesIO(data[:start] + footer + data[-8:])).metadata.row_group(0).column(0) \
        .total_uncompressed_size == 1000
    return data[:start] + footer + data[-8:]


LONG = "a" * (8 << 20)
INDEX_BOMBS = {  # how index.parquet is made from the fresh one -> how the refusal names it
    "an 8 MiB id, zstd": (lambda index: index_bytes(index, LONG, compression="zstd"),
                          "holds 11 values of 8388788 bytes decoded"),
    "the same, its footer saying 1000 bytes": (lambda index: understating(index_bytes(index, LONG, compression="zstd")),
                                               "holds 11 values of 8388788 bytes decoded"),
    "one 900 KB id in a dictionary, named by every row": (
        lambda index: index_bytes(index, LONG[:900_000], True, dictionary_pagesize_limit=1 << 30),
        "holds 9900000 bytes of text once decoded"),
    "the same as JSON text, which arrow would not keep as a dictionary": (
        lambda index: index_bytes(index, LONG[:900_000], True, json=True, dictionary_pagesize_limit=1 << 30),
        "holds 9900000 bytes of text once decoded"),
    "one 900 KB id, then its prefix again and again": (
        lambda index: index_bytes(index, LONG[:900_000], True, use_dictionary=False,
                                  column_encoding={"anchor_id": "DELTA_BYTE_ARRAY"}),
        "holds DELTA_BYTE_ARRAY-encoded text"),
}


@pytest.mark.parametrize("case", list(INDEX_BOMBS))
def test_an_index_that_would_decode_into_far_more_than_its_anchors_need_is_refused_unread(case, fresh):
    """A few KB of index.parquet can decode into gigabytes (a 35 KB one into 5.5 GB), and its checksum in
    manifest.json proves nothing (the same stranger wrote both): its pages' own headers are held to what 11 anchors
    of valid values can take before arrow decompresses or decodes them. The footer's sizes may lie; arrow trusts the
    page headers, and so does this check."""
    make, refusal = INDEX_BOMBS[case]
    replace_index(fresh, make(pq.read_table(fresh / INDEX)))
    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)  # counts what arrow allocates while it is the default pool
    pa.set_memory_pool(pool)
    try:
        problems = verify(fresh)
    finally:
        pa.set_memory_pool(default)
    assert any(p.startswith("manifest: index.parquet column anchor_id ") and refusal in p for p in problems), problems
    assert pool.max_memory() < 4 << 20, pool.max_memory()  # never the megabytes the id decodes to


def test_the_readmes_webdataset_pipeline_never_unpickles_a_hostile_member(fresh, tmp_path):
    """The README's example for other teams was `.decode("rgb8")`, which still unpickles a `.pyd` member."""
    import webdataset as wds

    marker = tmp_path / "pwned"
    pickle_member(fresh, marker)
    manifest = read_manifest(str(fresh))
    readme = wds.WebDataset(manifest.shard_locations(), shardshuffle=False).decode("rgb8", only=member_keys(manifest.k))
    samples = {sample["__key__"]: sample for sample in readme}
    assert not marker.exists() and isinstance(samples["anchor-00003"]["pyd"], bytes)  # passed through, undecoded
    assert samples["anchor-00003"]["anchor.png"].shape == (manifest.run["image_size"],) * 2 + (3,)
    list(wds.WebDataset(manifest.shard_locations(), shardshuffle=False).decode("rgb8"))  # why the README names keys
    assert marker.exists()


def test_a_missing_member_is_named_with_its_shard_and_sample_once(fresh):
    """verify said "shard-000000.tar: sample anchor-00001: shard-000000.tar: sample anchor-00001 has no cls.txt",
    beside "... has 2 positives, expected 2; lacks cls.txt"."""
    path = fresh / shard_name(0)
    write_raw_shard(path, [(name, data) for name, data in tar_members(path) if name != "anchor-00001.cls.txt"])
    forge_manifest(fresh)
    problems = [p for p in verify(fresh) if "anchor-00001" in p]
    assert problems == ["shard-000000.tar: sample anchor-00001 lacks cls.txt",
                        "shard-000000.tar: sample anchor-00001 has no cls.txt"]


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
    with pytest.raises(ShardError, match=r"run.k is 0, expected 1\.\.1000"):
        write_manifest(fresh, {**run, "k": 0})  # before it indexes anything
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


def test_an_index_larger_than_its_count_can_make_is_refused_unread(tmp_path):
    """An index padded with 24 MiB of metadata (its checksum in manifest.json to match) was read whole and accepted:
    the bytes read are bounded by what the manifest's count of anchors can take."""
    d = build_shard_dir(tmp_path / "shards")  # 11 anchors, k 2
    table = pq.read_table(d / INDEX)
    pq.write_table(table.replace_schema_metadata({b"pad": b"x" * (24 << 20)}), d / INDEX, compression="none")
    data = (d / INDEX).read_bytes()
    document = json.loads((d / MANIFEST).read_text())
    document["index"]["sha256"] = hashlib.sha256(data).hexdigest()
    (d / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(ShardError, match="larger than"):
        read_manifest(d)
    build_shard_dir(tmp_path / "fine", counts=(400, 400), k=8)  # a real index of many anchors still reads
    assert read_manifest(tmp_path / "fine").count == 800


@pytest.mark.parametrize("count", [10**12, 10**18])
def test_a_forged_count_is_refused_in_words_not_by_an_allocation(tmp_path, count):
    """The index was read with one read(most + 1), `most` from the manifest's count: MemoryError, or OverflowError."""
    d = build_shard_dir(tmp_path / "shards")
    document = json.loads((d / MANIFEST).read_text())
    document["count"] = count
    (d / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(ShardError, match=f"manifest.json counts {count} anchors, index.parquet has 11"):
        read_manifest(d)


@pytest.mark.parametrize("planted", ["zero-manifest", "fifo-manifest", "fifo-pending-index"])
def test_verify_reads_no_device_or_fifo_a_stranger_planted(tmp_path, planted):
    """verify read manifest.json whole (a link to /dev/zero: killed for memory; a FIFO: it waited forever), and
    looked inside files under a pending index's name (a FIFO: forever); every other reader refused them already."""
    d = build_shard_dir(tmp_path / "shards")
    if planted == "fifo-pending-index":
        os.mkfifo(d / "index-abcdef012345.parquet")
        assert verify(d) == []  # not ours: left alone
        return
    (d / MANIFEST).unlink()
    if planted == "zero-manifest":
        os.symlink("/dev/zero", d / MANIFEST)
    else:
        os.mkfifo(d / MANIFEST)
    assert verify(d) == [f"manifest: {d / MANIFEST} cannot be read ({d / MANIFEST} is not a regular file (a device, "
                         f"a FIFO or a directory, or a link to one))"]


def test_a_schema_version_given_as_text_is_named_as_such(tmp_path):
    d = build_shard_dir(tmp_path / "shards")
    document = json.loads((d / MANIFEST).read_text())
    document["schema_version"] = str(document["schema_version"])
    (d / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(ShardError, match="schema_version is '[0-9]+', not an integer"):  # was: "written with
        read_manifest(d)  # schema version 2; this clsp reads version 1 or 2 or 3"


def test_a_strangers_text_reaches_the_terminal_escaped(fresh):
    """A model_id with a terminal's escape sequences and a newline cleared the screen and forged a line of its own
    ("shards: OK (trusted)") in `clsp shards info`; a member name did the same in verify's FAIL lines."""
    forged = "\x1b[2J\x1b[1;32mOK\x1b[0m\nshards: OK (trusted)"
    edited_manifest(fresh, lambda doc: doc["run"]["generator"].update(model_id=forged))
    shown = runner.invoke(app, ["shards", "info", str(fresh)])
    assert shown.exit_code == 0 and "\x1b" not in shown.output, shown.output
    assert "model_id=\\x1b[2J\\x1b[1;32mOK\\x1b[0m\\nshards: OK (trusted)" in shown.output
    assert not any(line.startswith("shards: OK") for line in shown.output.splitlines())
    members = tar_members(fresh / shard_name(0))
    last = members[-1][0].split(".")[0]  # a member of the shard's last sample, outside the schema
    write_raw_shard(fresh / shard_name(0), members + [(f"{last}.x\x1b[31mRED\nFAIL nothing", b"x")])
    checked = runner.invoke(app, ["shards", "verify", str(fresh)])
    assert checked.exit_code == 1 and "\x1b" not in checked.output and "\\x1b[31mRED\\nFAIL nothing" in checked.output
    assert not any(line == "FAIL nothing" or line.startswith("FAIL nothing") for line in checked.output.splitlines())


def test_verify_recomputes_each_positives_distance_that_the_index_records(fresh):
    """An index rewritten with other distances (its checksum in manifest.json to match) passed verify, and
    --positive-filter then drew by the forged numbers."""
    table = pq.read_table(fresh / INDEX)
    distances = table.column("positive_distance").to_pylist()
    distances[3] = [0.9] * len(distances[3])
    forged = table.set_column(table.column_names.index("positive_distance"), "positive_distance",
                              pa.array(distances, table.schema.field("positive_distance").type))
    buffer = io.BytesIO()
    pq.write_table(forged, buffer)
    replace_index(fresh, buffer.getvalue())
    anchor = table.column("anchor_id")[3].as_py()
    assert [p for p in verify(fresh) if "distance" in p] == [
        f"{table.column('shard')[3].as_py()}: sample {anchor}: its positive_distance in {INDEX} is not the distance "
        f"of its images (shards.schema.positive_distances): the index was changed; regenerate the shards, or rerun "
        f"the synth command that made them with --score-reference (it rewrites the index from the images)"]


def test_a_lowered_k_is_named_as_such(fresh):
    """run.k 1 for shards of K = 2: the refusal counted values and bytes and never said K."""
    edited_manifest(fresh, lambda doc: doc["run"].update(k=1))
    with pytest.raises(ShardError, match=r"column positive_distance holds 22 values of \d+ bytes decoded \(2 per "
                                         r"anchor, where manifest.json says K = 1: run.k is not the shards' K\)"):
        read_manifest(fresh)
