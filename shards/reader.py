"""A safe streaming reader: tar members are grouped into samples by key and only schema keys are kept.

Nothing read from a shard is unpickled, `torch.load`ed or executed: PNGs go to PIL's PNG decoder only, the label is
parsed as a decimal, meta as JSON. Members with other extensions (`.pyd`, `.pth`, ...) are never decoded: they are
counted in `RawSample.ignored` (and `verify` reports them). Locations are local paths or fsspec URLs that the *user*
gives; shard names from a manifest must match `shard-NNNNNN.tar`, so a manifest cannot point anywhere else, and shell
schemes such as `pipe:` are refused outright.
"""
from __future__ import annotations

import random
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

import numpy as np

from shards.schema import ANCHOR, LABEL, META, POSITIVE, SchemaError, decode_label, decode_meta, decode_png, \
    is_schema_key, positive_key

ALLOWED_SCHEMES = ("file", "http", "https", "s3", "gs", "gcs", "az", "abfs", "abfss", "hf", "memory")
MAX_MEMBER_BYTES = 64 << 20


class ShardError(RuntimeError):
    """A shard that cannot be read; the message names the shard."""


def check_location(location: str) -> str:
    """Local path or URL with an allowed scheme; anything that would run a command is refused."""
    scheme, sep, _ = location.partition("://")
    if location.startswith("pipe:") or (sep and scheme.lower() not in ALLOWED_SCHEMES):
        raise ShardError(f"refusing to open {location!r}: only local paths and {', '.join(ALLOWED_SCHEMES)} URLs "
                         f"are read (never pipe: or other command schemes)")
    return location


def open_location(location: str) -> IO[bytes]:
    check_location(location)
    if "://" in location:
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def join_location(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


@dataclass
class RawSample:
    """One anchor's encoded members (schema keys only); decode what you need, when you need it."""

    key: str
    shard: str
    members: dict[str, bytes]  # schema key ("anchor.png", "pos3.png", ...) -> bytes
    ignored: list[str] = field(default_factory=list)  # member names outside the schema, never decoded

    @property
    def k(self) -> int:
        return sum(1 for key in self.members if POSITIVE.match(key))

    def _need(self, key: str) -> bytes:
        if key not in self.members:
            raise SchemaError(f"{self.shard}: sample {self.key} has no {key}")
        return self.members[key]

    def anchor(self) -> np.ndarray:  # (H, W, 3) uint8
        return decode_png(self._need(ANCHOR), f"{self.shard}: {self.key}.{ANCHOR}")

    def positive(self, j: int) -> np.ndarray:  # (H, W, 3) uint8
        key = positive_key(j)
        return decode_png(self._need(key), f"{self.shard}: {self.key}.{key}")

    @property
    def label(self) -> int:
        return decode_label(self._need(LABEL))

    @property
    def meta(self) -> dict:
        return decode_meta(self._need(META))

    def ordered_members(self) -> list[tuple[str, bytes]]:
        """(member name, bytes) in the order they were read: what the sample checksum covers."""
        return [(f"{self.key}.{key}", data) for key, data in self.members.items()]


class _TailKeeper:
    """Wraps a stream and keeps its last 1024 bytes: a complete tar ends with two 512-byte zero blocks, which
    tarfile's stream mode does not insist on (a shard cut at a block boundary would otherwise read as shorter)."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.tail = stream, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.tail = (self.tail + data)[-1024:]
        return data

    def ends_cleanly(self) -> bool:
        while self.read(1 << 20):  # drain what tarfile left unread after the end-of-archive blocks
            pass
        return self.tail == bytes(1024)


def iter_shard(location: str) -> Iterator[RawSample]:
    """Samples of one shard, in order. Raises ShardError naming the shard when it is truncated or not a tar."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    current: RawSample | None = None
    try:
        with open_location(location) as raw, tarfile.open(fileobj=(stream := _TailKeeper(raw)), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    raise ShardError(f"{name}: member {member.name!r} is not a regular file")
                key, dot, ext = member.name.partition(".")
                if not dot or "/" in member.name:
                    raise ShardError(f"{name}: member {member.name!r} is not named ID.KEY")
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, name, {})
                if not is_schema_key(ext):
                    current.ignored.append(member.name)  # never read, never decoded
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise ShardError(f"{name}: member {member.name} is {member.size} bytes, above the limit")
                if ext in current.members:
                    raise ShardError(f"{name}: sample {key} has {ext} twice")
                current.members[ext] = tar.extractfile(member).read()
            if not stream.ends_cleanly():
                raise EOFError("no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{name}: cannot be read as a tar ({error}); it is truncated or corrupt: "
                         f"regenerate it or rerun the synth job") from None
    if current is not None:
        yield current


def iter_samples(locations: list[str]) -> Iterator[RawSample]:
    for location in locations:
        yield from iter_shard(location)


def epoch_shards(locations: list[str], seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[str]:
    """This rank's shards for an epoch: the list reshuffled from (seed, epoch), then every world_size-th from rank."""
    order = sorted(locations)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world_size]
