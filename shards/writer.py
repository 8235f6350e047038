"""An atomic, reproducible shard writer.

A shard is written to a hidden temporary name in the same directory and renamed to `shard-NNNNNN.tar` only after every
sample is in and the bytes are on disk: a crash, a kill or a full disk leaves no file under a final name. The tar is
written by webdataset's `TarWriter` (any WebDataset reader reads it), with a fixed mtime, owner and mode, so identical
samples give byte-identical tars. Names come from the shard's index, which the caller derives from a fixed anchor range,
so parallel processes never write the same name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from webdataset import TarWriter

from clsp.shards.atomic import fsync_dir
from clsp.shards.codecs import DEFAULT_CODEC, get_codec
from clsp.shards.schema import SchemaError, ShardSample, encode_sample, sample_sha256

SHARD_PATTERN = re.compile(r"^shard-[0-9]{6}\.tar$")
TEMP_PREFIX = ".tmp-"


def shard_name(index: int) -> str:
    if not 0 <= index < 1_000_000:
        raise ValueError(f"shard index {index} is outside 0..999999")
    return f"shard-{index:06d}.tar"


def temp_files(directory: str | Path) -> list[Path]:
    """Unfinished shards a crashed writer left behind (never read as shards)."""
    return sorted(Path(directory).glob(f"{TEMP_PREFIX}*"))


class ShardWriter:
    """`with ShardWriter(path, k, image_size) as w: w.write(sample)`; the shard appears at `path` on a clean exit.
    Images are written with `codec` ("png" or "raw", shards.codecs): one codec for a whole run, as its manifest says."""

    def __init__(self, path: str | Path, k: int, image_size: int, codec: str = DEFAULT_CODEC):
        self.path = Path(path)
        if not SHARD_PATTERN.fullmatch(self.path.name):
            raise ValueError(f"shard file name {self.path.name!r} must look like {shard_name(0)}")
        self.k, self.image_size, self.codec = k, image_size, get_codec(codec).name  # ValueError naming the codecs
        self.temp = self.path.with_name(f"{TEMP_PREFIX}{self.path.name}.{os.getpid()}")
        self.checksums: dict[str, str] = {}  # anchor id -> sample sha256, in write order

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.temp, "wb")
        # mtime 0, no owner names, mode 0644 (uid/gid stay 0): nothing of the machine or the hour enters the bytes.
        # TarWriter leaves tarfile's PAX format; for ASCII member names under 100 characters (check_id) that writes
        # plain ustar headers, byte for byte what the writer wrote before it used webdataset.
        self._tar = TarWriter(self._file, user="", group="", mode=0o644, mtime=0, encoder=False)
        return self

    def write(self, sample: ShardSample) -> str:
        if sample.anchor_id in self.checksums:
            raise SchemaError(f"anchor {sample.anchor_id} is written twice to {self.path.name}")
        members = encode_sample(sample, self.k, self.image_size, self.codec)
        for name, data in members:  # one member per call: TarWriter sorts a sample's keys (pos10 before pos2)
            key, _, ext = name.partition(".")
            self._tar.write({"__key__": key, ext: data})
        self.checksums[sample.anchor_id] = sample_sha256(members)
        return self.checksums[sample.anchor_id]

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                self._tar.close()
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()  # may fail again on a full disk: the temp file is removed all the same
        except BaseException:
            self.temp.unlink(missing_ok=True)
            raise
        if exc_type is not None:
            self.temp.unlink(missing_ok=True)
            return
        os.replace(self.temp, self.path)  # atomic on POSIX: the final name only ever holds a complete shard
        fsync_dir(self.path.parent)
