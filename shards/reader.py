"""A safe streaming reader: tarfile's stream mode over our own opener reads the tar, every member's header looked at
before its data, webdataset's `group_by_keys` groups the members into samples by key, and only schema keys are kept.

Nothing read from a shard is unpickled, `torch.load`ed or executed: PNGs go to PIL's PNG decoder only, .npy images to
our own strict header parser (never `np.load`), the label is parsed as a decimal, meta as JSON (shards.codecs,
shards.schema). Members with other extensions (`.pyd`, `.pth`, `.pickle`, ...) are never decoded: they are
counted in `RawSample.ignored` (`verify` and the training stream refuse such samples). Locations are local paths or
fsspec URLs that the *user* gives; shard names from a manifest must match `shard-NNNNNN.tar`, so a manifest cannot
point anywhere else, and shell schemes such as `pipe:` are refused outright; a local name must lead to a regular file
(not a device or a FIFO, whose read would never end). Shards are plain tars of regular files: a compressed one is
refused rather than inflated, and so is a shard holding a link, a directory, a device or a sparse
member, or a member that declares more than MAX_MEMBER_BYTES, before any byte of that member is read.
"""
from __future__ import annotations

import hashlib
import os
import random
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator, TypeVar

import numpy as np
from webdataset.tariterators import group_by_keys

from clsp.shards.codecs import SchemaError, codec_of
from clsp.shards.schema import ID_PATTERN, LABEL, META, POSITIVE, decode_label, decode_meta, image_keys, is_schema_key

ALLOWED_SCHEMES = ("file", "http", "https", "s3", "gs", "gcs", "az", "abfs", "abfss", "hf", "memory")
MAX_MEMBER_BYTES = 64 << 20
MAX_HEADER_BYTES = 1 << 20  # a member's headers (PAX records, GNU long names, sparse maps); ours take 512 bytes


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
    """`location` opened for reading; a local path must be a regular file (a link to one is followed): a name that
    leads to a device, a FIFO or a directory (a link a stranger's folder holds to /dev/zero, say) is refused with an
    OSError before any read, as a read of it could go on forever."""
    check_location(location)
    if "://" in location:
        import fsspec

        return fsspec.open(location, "rb").open()
    fd = os.open(location, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO's open would wait for a writer
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{location} is not a regular file (a device, a FIFO or a directory, or a link to one)")
    return os.fdopen(fd, "rb")


def join_location(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


@dataclass
class RawSample:
    """One anchor's encoded members (schema keys only); decode what you need, when you need it."""

    key: str
    shard: str
    members: dict[str, bytes]  # schema key ("anchor.png", "pos3.npy", ...) -> bytes
    ignored: list[str] = field(default_factory=list)  # member names outside the schema, never decoded

    @property
    def k(self) -> int:
        return sum(1 for key in self.members if POSITIVE.fullmatch(key))

    def _need(self, key: str) -> bytes:
        if key not in self.members:
            raise SchemaError(f"{self.shard}: sample {self.key} has no {key}")
        return self.members[key]

    def _image(self, stem: str) -> np.ndarray:
        """The image member "anchor" / "pos{j}" in whichever codec the sample holds it -> (H, W, 3) uint8."""
        found = [key for key in image_keys(stem) if key in self.members]  # anchor.png and/or anchor.npy
        if len(found) != 1:
            raise SchemaError(f"{self.shard}: sample {self.key} has " + (f"{stem} twice ({', '.join(found)})" if found
                                                                          else f"no {stem} image"))
        return codec_of(found[0]).decode(self.members[found[0]], f"{self.shard}: {self.key}.{found[0]}")

    def anchor(self) -> np.ndarray:  # (H, W, 3) uint8
        return self._image("anchor")

    def positive(self, j: int) -> np.ndarray:  # (H, W, 3) uint8
        return self._image(f"pos{j}")

    @property
    def label(self) -> int:
        return decode_label(self._need(LABEL))

    @property
    def meta(self) -> dict:
        return decode_meta(self._need(META))

    def ordered_members(self) -> list[tuple[str, bytes]]:
        """(member name, bytes) in the order they were read: what the sample checksum covers."""
        return [(f"{self.key}.{key}", data) for key, data in self.members.items()]


def _compression(head: bytes) -> str | None:
    """The codec a compressed stream starts with, if any: refused by name (tarfile's "r|" mode would only find no tar
    header)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return "bzip2"
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return "xz"
    return "zstd" if head.startswith(b"\x28\xb5\x2f\xfd") else None  # Python 3.14's tarfile reads zstd too


class _Reading:
    """Wraps a stream: hashes every byte read (sha256), counts them, and notes where the last non-zero byte was (a
    complete tar ends with two 512-byte zero blocks after its last member, which tarfile's stream mode does not insist
    on: a shard cut at a block boundary or damaged in a header would otherwise read as shorter). It refuses a
    compressed stream (a small file must not inflate into a huge member) and, while a member's headers are being
    read, more than MAX_HEADER_BYTES of them plus tarfile's read-ahead of one record: tarfile parses a PAX record, long
    name or sparse map in memory before anyone sees the member."""

    def __init__(self, stream: IO[bytes], name: str):
        self.stream, self.name, self.size, self.digest = stream, name, 0, hashlib.sha256()
        self.content_end = 0  # the stream position just past the last non-zero byte read
        self.limit: int | None = None  # while headers are read: the stream position their reading must not pass

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.size == 0 and (codec := _compression(data)):
            raise ShardError(f"{self.name} is {codec}-compressed; shards are plain tar files: decompress it or "
                             f"regenerate it")
        content = data.rstrip(b"\0") if data and not data[-1] else data  # a copy only where data ends in zeros
        if content:
            self.content_end = self.size + len(content)
        self.size += len(data)
        self.digest.update(data)
        if self.limit is not None and self.size > self.limit:
            raise ShardError(f"{self.name}: a member's tar headers (PAX records, long names or sparse maps) take more "
                             f"than {MAX_HEADER_BYTES} bytes, above the limit: it is not a shard of ours")
        return data

    def ends_cleanly(self, end: int) -> bool:
        """Whether the stream holds only zeros from `end` (where tarfile found no further member header) to its end,
        at least the two 512-byte blocks of an end-of-archive marker: tarfile's stream mode also ends quietly at a
        damaged header, or where a file cut at a block boundary ends (whose last bytes may be zeros too)."""
        while self.read(1 << 20):  # drain what tarfile left unread after the end-of-archive blocks
            pass
        return self.content_end <= end and self.size - end >= 1024


def _split_name(name: str) -> tuple[str, str]:
    """"anchor-00001.pos0.png" -> ("anchor-00001", "pos0.png"): the key ends at the first dot, as in WebDataset."""
    key, _, ext = name.partition(".")
    return key, ext


def _is_schema_member(name: str) -> bool:
    return "/" not in name and is_schema_key(_split_name(name)[1])


def looks_like_shard(path) -> bool:
    """A plain tar whose first member is named ANCHOR_ID.KEY with a schema KEY: how `--overwrite` tells a shard of ours
    from another tar of the same name. Reads one tar header."""
    try:
        with open_location(str(path)) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError):
        return False
    return first is not None and first.isfile() and _is_schema_member(first.name) \
        and ID_PATTERN.fullmatch(_split_name(first.name)[0]) is not None


_MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
                 tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}
_T = TypeVar("_T")


def _member_refusal(member: tarfile.TarInfo, name: str) -> str | None:
    """Why a member's header alone refuses it, if it does: a shard holds regular files of at most MAX_MEMBER_BYTES.
    The declared size is what reading it would cost: tarfile fills a sparse member's holes in memory, reading
    nothing."""
    if not member.isreg():
        target = f" to {member.linkname!r}" if member.issym() or member.islnk() else ""
        return (f"{name}: member {member.name} is {_MEMBER_KINDS.get(member.type, f'of tar type {member.type!r}')}"
                f"{target}; a shard holds regular files only, and links are never followed: regenerate it")
    if member.issparse():
        return (f"{name}: member {member.name} is a sparse file declaring {member.size} bytes; a shard holds plain "
                f"regular files only, and it was not read: regenerate it")
    if member.size > MAX_MEMBER_BYTES:
        return (f"{name}: member {member.name} is more than {MAX_MEMBER_BYTES} bytes, above the limit (it declares "
                f"{member.size}), and it was not read")
    return None


def _headers(reading: _Reading, position: int, parse: Callable[[], _T]) -> _T:
    """`parse()` (tarfile reading the member headers that begin at stream `position`) under MAX_HEADER_BYTES; what
    tarfile's sparse-map parsing lets through of a malformed header (ValueError, IndexError) is a ReadError."""
    reading.limit = position + MAX_HEADER_BYTES + tarfile.RECORDSIZE
    try:
        return parse()
    except (ValueError, IndexError) as error:
        raise tarfile.ReadError(f"malformed header: {error}") from None
    finally:
        reading.limit = None


def _tar_members(reading: _Reading) -> Iterator[tuple[str, bytes | None]]:
    """(member name, bytes) in tar order, bytes None for a member outside the schema (skipped unread, its name handed on
    for `verify` to name). Each member's header is looked at before any byte of its data is read: see
    `_member_refusal`. tarfile's stream mode ends quietly on a missing end-of-archive marker, which is checked here."""
    tar = _headers(reading, 0, lambda: tarfile.open(fileobj=reading, mode="r|"))  # reads the first header
    while (member := _headers(reading, tar.offset, tar.next)) is not None:  # tar.offset: where the next header begins
        refusal = _member_refusal(member, reading.name)
        if refusal:
            raise ShardError(refusal)
        tar.members.clear()  # stream mode keeps every header otherwise
        yield member.name, tar.extractfile(member).read() if _is_schema_member(member.name) else None
    if not reading.ends_cleanly(tar.offset):
        raise EOFError("no end-of-archive marker where the members end: a damaged header, or a cut file")


def _checked(members: Iterator[tuple[str, bytes | None]], name: str, url: str) -> Iterator[dict]:
    """Member records for `group_by_keys`, refusing what it would mishandle: names not ID.KEY (it skips them) or with
    a KEY it keeps for itself (`__key__`, `__url__`), a KEY twice in a sample (its ValueError)."""
    current, keys = None, set()
    for member, data in members:
        key, ext = _split_name(member)
        if not ext or "/" in member:
            raise ShardError(f"{name}: member {member!r} is not named ID.KEY")
        if ext.startswith("__"):
            raise ShardError(f"{name}: member {member!r} has a KEY starting with '__', which WebDataset keeps for "
                             f"its own fields")
        if key != current:
            current, keys = key, set()
        if ext in keys:
            raise ShardError(f"{name}: sample {key} has {ext} twice")
        keys.add(ext)
        yield {"fname": member, "data": data, "__url__": url}


def _raw_sample(group: dict, name: str) -> RawSample:
    """A `group_by_keys` sample {"__key__", "__url__", KEY: bytes or None} -> RawSample, members in tar order."""
    sample = RawSample(group["__key__"], name, {})
    for ext, data in group.items():
        if ext not in ("__key__", "__url__"):
            if data is None:
                sample.ignored.append(f"{sample.key}.{ext}")  # never read, never decoded
            else:
                sample.members[ext] = data
    return sample


def _entry_differences(entry: dict, reading: _Reading, count: int) -> list[str]:
    """How a fully read shard differs from its manifest entry {name, sha256, count, bytes}."""
    found = {"sha256": reading.digest.hexdigest(), "bytes": reading.size, "count": count}
    return [f"{key} {found[key]} where the manifest says {entry[key]}" if key != "sha256" else "sha256 differs"
            for key in ("sha256", "bytes", "count") if found[key] != entry[key]]


def iter_shard(location: str, entry: dict | None = None) -> Iterator[RawSample]:
    """Samples of one shard, in order, read by `_tar_members` and webdataset's `group_by_keys` over our own opener.
    Raises ShardError naming the shard when it is truncated, compressed or not a tar, holds a member that is not a
    regular file of at most MAX_MEMBER_BYTES (named before it is read), holds an anchor twice, or (given
    its manifest `entry`) differs from the entry's sha256, size or count once read to the end: the bytes are hashed as
    they stream, so a shard changed after `verify` is caught at no extra read."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    keys: set[str] = set()
    try:
        with open_location(location) as raw:
            reading = _Reading(raw, name)
            members = _checked(_tar_members(reading), name, location)
            # group_by_keys joins consecutive members of a key; an anchor coming back later is refused here
            for group in group_by_keys(members, keys=_split_name, lcase=False):
                if group["__key__"] in keys:
                    raise ShardError(f"{name}: sample {group['__key__']} appears twice (each anchor must appear "
                                     f"exactly once): regenerate the shard")
                keys.add(group["__key__"])
                yield _raw_sample(group, name)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{name}: cannot be read as a tar ({error}); it is truncated or corrupt: "
                         f"regenerate it or rerun the synth job") from None
    differences = _entry_differences(entry, reading, len(keys)) if entry is not None else []
    if differences:  # raised after the last sample, so that a reader has seen (and can report) every sample
        raise ShardError(f"{name} differs from its manifest entry ({'; '.join(differences)}): it was changed or "
                         f"damaged after the manifest was written: regenerate it or rerun the synth job")


def iter_samples(locations: list[str]) -> Iterator[RawSample]:
    for location in locations:
        yield from iter_shard(location)


def epoch_shards(locations: list[str], seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[str]:
    """This rank's shards for an epoch: the list reshuffled from (seed, epoch), then every world_size-th from rank."""
    order = sorted(locations)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world_size]
