"""The manifest, written last: `index.parquet` (one row per anchor) and `manifest.json` (run metadata and shard list).

A shard directory is complete exactly when `manifest.json` exists. The run metadata records what made the shards:
schema version, source (spec, split, fingerprint, count, and the class count when the source names its classes),
generator (model id, weights hash, and the scheduler and UNet config digests that the synth job records), sampler
settings, K, seed, image size, anchors per shard and package version, and from schema version 3 the image codec
(run.codec "raw"; absent means png, see shards.schema). A rewrite leaves its new index under `pending_index`'s name
until manifest.json names it; `read_manifest` reads it there when index.parquet is not the one manifest.json names.

`read_manifest` is the one check of a manifest (field types, required fields, bounds, index columns and rows) that every
reader goes through, and `write_manifest` (shards.manifest_writer) refuses to write what it would refuse.
`Manifest.contract()` then holds what the manifest promises about each sample, which `verify` and the training stream
check in the same way.

Schema version 2 adds per-positive scores to the index (list<float32> columns of K values per anchor, in 0..1):
`positive_distance` (always written: `shards.schema.positive_distances` of the decoded images) and `positive_agreement`
(written when `write_manifest` is given an `AgreementScorer`, e.g. the synth job's reference classifier). A row is null
where its sample could not be scored (not K decodable positives: the contract refuses that sample anyway), and an
agreement row is null for an anchor without a label. `Manifest.scores(metric)` hands them to the trainer.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clsp.shards.manifest_checks import INDEX, INDEX_SCHEMA, MANIFEST, document_problems, index_problems, \
    score_column
from clsp.shards.parquet_pages import WHOLE_TEXT_ENCODINGS, column_pages
from clsp.shards.reader import RawSample, ShardError, check_location, iter_shard, join_location, open_location
from clsp.shards.codecs import CODECS, DEFAULT_CODEC, SchemaError, codec_of
from clsp.shards.schema import LEGACY_NOISE, MAX_ID_CHARS, META, READ_VERSIONS, SCHEMA_VERSION, SCORES, is_image_key, \
    member_keys, parse_json, sample_sha256
from clsp.shards.writer import SHARD_PATTERN, shard_name

FORMAT = "clsp-shards"
DISTANCE_RECORD = "RMS pixel difference to the anchor, pixels in [0, 1] (shards.schema.positive_distances)"
FIX = "regenerate the shards with `clsp synth run` (`clsp shards verify DIR` lists every problem)"


class ManifestError(ShardError):
    """A manifest.json or index.parquet that breaks the contract; `problems` lists each problem found."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]

    @classmethod
    def of(cls, where: str, problems: list[str]) -> "ManifestError":
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return cls(f"{where}: {'; '.join(problems[:3])}{more}: {FIX}", tuple(problems))


@dataclass(frozen=True)
class Contract:
    """What a manifest promises about each sample: checked as samples stream (train) and by `verify`, the same way."""

    k: int
    image_size: int
    entries: dict[str, dict]  # shard name -> its manifest entry {name, sha256, count, bytes}
    shard_names: tuple[str, ...]  # the names of `entries`, in order
    rows: dict[str, int]  # anchor id -> row of the index (the integer id the losses use)
    row_shard: np.ndarray  # (N,) int64: each row's shard, as a position in `entries`
    row_label: np.ndarray  # (N,) int64
    row_sha256: np.ndarray  # (N, 32) uint8: each sample's checksum (`sample_sha256`)
    unscored: frozenset[int] = frozenset()  # rows whose scores are null: their samples could not be scored
    codec: str = DEFAULT_CODEC  # every image member of every sample is in this codec (shards.codecs)

    def entry(self, location: str) -> dict:
        """The manifest entry of the shard at `location` (what `iter_shard` compares the shard with)."""
        name = location.rstrip("/").rsplit("/", 1)[-1]
        if name not in self.entries:
            raise ShardError(f"{name} is not listed in {MANIFEST}: it belongs to another run")
        return self.entries[name]

    def problems(self, sample: RawSample) -> list[str]:
        """Everything wrong with a sample, each naming its shard and id; images are checked without decoding."""
        where = f"{sample.shard}: sample {sample.key}"
        problems = self._member_problems(sample, where)
        row = self.rows.get(sample.key)
        shard = None if row is None else self.shard_names[self.row_shard[row]]
        if row is None:
            problems.append(f"{where} is not in {INDEX}: the shards and {MANIFEST} belong to different runs")
        elif shard != sample.shard:
            problems.append(f"{where} is listed in {INDEX} under {shard}: each anchor must appear exactly once")
        try:
            if row is not None and sample.label != self.row_label[row]:
                problems.append(f"{where}: label {sample.label}, {INDEX} says {self.row_label[row]}")
            meta = sample.meta
            if meta["anchor_id"] != sample.key or len(meta["seeds"]) != self.k:
                problems.append(f"{where}: {META} must name the anchor and hold {self.k} seeds")
        except SchemaError as error:  # a missing member's error names the shard and sample itself
            problems.append(str(error) if str(error).startswith(where) else f"{where}: {error}")
        problems += self._image_problems(sample)
        if row in self.unscored and not problems:
            problems.append(f"{where} has no scores in {INDEX}: its images could not be scored when the manifest was "
                            f"written")
        if not problems and bytes.fromhex(sample_sha256(sample.ordered_members())) != self.row_sha256[row].tobytes():
            problems.append(f"{where} does not match its checksum in {INDEX}")
        return problems

    def _member_problems(self, sample: RawSample, where: str) -> list[str]:
        """Members outside the schema, image members in another codec than the manifest's, missing or extra keys."""
        problems = []
        if sample.ignored:
            problems.append(f"{where} holds member(s) outside the schema, not decoded: {', '.join(sample.ignored)}")
        problems += [f"{sample.shard}: {sample.key}.{key} is a {codec_of(key).name} image; {MANIFEST} says every image "
                     f"of this run is {self.codec} (.{CODECS[self.codec].extension})"
                     for key in sample.members if is_image_key(key) and codec_of(key).name != self.codec]
        expected = set(member_keys(self.k, self.codec))
        if set(sample.members) != expected:
            lacking, extra = sorted(expected - set(sample.members)), sorted(set(sample.members) - expected)
            parts = [f"has {sample.k} positives, expected {self.k}"] if sample.k != self.k else []
            parts += [f"lacks {', '.join(lacking)}"] if lacking else []
            parts += [f"has extra {', '.join(extra)}"] if extra else []
            problems.append(f"{where} {'; '.join(parts)}")
        return problems

    def _image_problems(self, sample: RawSample) -> list[str]:
        """Header checks (no decoding) of the image members in the manifest's codec, at the manifest's size."""
        problems = []
        for key in [key for key in sample.members if is_image_key(key) and codec_of(key).name == self.codec]:
            try:
                codec_of(key).check(sample.members[key], f"{sample.shard}: {sample.key}.{key}", self.image_size)
            except SchemaError as error:
                problems.append(str(error))
        return problems

    def check(self, sample: RawSample) -> int:
        """The sample's index row; raises SchemaError naming the shard, the sample and every problem."""
        problems = self.problems(sample)
        if problems:
            raise SchemaError("; ".join(problems))
        return self.rows[sample.key]

    def samples(self, location: str) -> Iterator[RawSample]:
        """One shard's samples, each checked; the shard is compared with its manifest entry once read to its end."""
        for sample in iter_shard(location, self.entry(location)):
            self.check(sample)
            yield sample


@dataclass(frozen=True)
class Manifest:
    location: str
    run: dict
    shards: list[dict]  # [{name, sha256, count, bytes}] in name order
    index: pa.Table  # anchor_id, shard, label, sha256[, positive_distance[, positive_agreement]]
    count: int
    schema_version: int = SCHEMA_VERSION

    @property
    def k(self) -> int:
        return int(self.run["k"])

    @property
    def codec(self) -> str:
        """The image codec of every sample: "png" or "raw" (shards.codecs); absent from the run record means png."""
        return self.run.get("codec", DEFAULT_CODEC)

    def scores(self, metric: str) -> np.ndarray | None:
        """(N, K) float32 scores of each row's positives, NaN where a row holds none; None when the index has none."""
        name = score_column(metric)
        if name not in self.index.column_names:
            return None
        column = self.index.column(name).combine_chunks()  # N lists of K float32, or null
        out = np.full((self.index.num_rows, self.k), np.nan, np.float32)
        valid = column.is_valid().to_numpy(zero_copy_only=False)  # (N,) bool
        out[valid] = column.flatten().to_numpy().reshape(-1, self.k)  # checked by read_manifest: K values a row
        return out

    def shard_locations(self, base: str | None = None) -> list[str]:
        """Where the shards are: beside the manifest, or under `base` (a directory or URL the user gives)."""
        return [join_location(base or self.location, s["name"]) for s in self.shards]

    def absent_shards(self) -> list[str]:
        """The listed shards that are not files beside a local manifest: found before a run claims its --out, not
        hours into it. [] for a URL, whose shards are found as they stream."""
        if "://" in self.location:
            return []
        # a FIFO or a link to a device is there: the reader refuses it as not a regular file
        return [s["name"] for s in self.shards if not Path(self.location, s["name"]).exists()]

    def samples(self, base: str | None = None) -> Iterator[RawSample]:
        """Every sample of every shard in order, each checked against the manifest (SchemaError / ShardError)."""
        contract = self.contract()
        for location in self.shard_locations(base):
            yield from contract.samples(location)

    def contract(self) -> Contract:
        """What the manifest promises about each sample (see `Contract`)."""
        names = [s["name"] for s in self.shards]
        sums = "".join(self.index.column("sha256").to_pylist())  # N x 64 hex digits
        shards = pc.index_in(self.index.column("shard"), value_set=pa.array(names)).to_numpy().astype(np.int64)
        checksums = np.frombuffer(bytes.fromhex(sums), np.uint8).reshape(-1, 32)  # (N, 32)
        distance = score_column("distance")
        unscored = frozenset() if distance not in self.index.column_names else frozenset(
            np.flatnonzero(self.index.column(distance).is_null().to_numpy(zero_copy_only=False)).tolist())
        return Contract(self.k, int(self.run["image_size"]), {s["name"]: s for s in self.shards}, tuple(names),
                        {a: i for i, a in enumerate(self.index.column("anchor_id").to_pylist())}, shards,
                        self.index.column("label").to_numpy(), checksums, unscored, self.codec)


MAX_MANIFEST_BYTES = 16 << 20  # manifest.json: about 170 bytes a shard, so some 100,000 shards


def read_manifest_bytes(location: str) -> bytes:
    """manifest.json's bytes: a regular file (open_location) of at most MAX_MANIFEST_BYTES; else OSError or
    ShardError."""
    with open_location(location) as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ShardError(f"{location} is larger than {MAX_MANIFEST_BYTES} bytes, the most a manifest may take, and "
                         f"was not read: regenerate the shards as fewer shards (more --anchors-per-shard)")
    return data


# the most bytes of one value of each index column the schema allows (a score: one float32 of K); others: MAX_ID_CHARS
VALUE_BYTES = {"anchor_id": MAX_ID_CHARS, "shard": len(shard_name(0)), "label": 8, "sha256": 64,
               **{score_column(metric): 4 for metric in SCORES}}
SLACK_BYTES = 1 << 20  # what a column may take beyond its values: page headers, statistics, a small index's dictionary


def _value_bound(column: str, count: int, k: int) -> tuple[int, int]:
    """(values, decoded bytes) that `count` anchors of values the schema allows can take in index `column`, generously:
    each value twice (a dictionary and Parquet's fallback from it to plain values), with 8 bytes of length and
    levels."""
    values = count * max(k, 1) if column in map(score_column, SCORES) else count  # an empty or null list takes one
    return values, 2 * values * (VALUE_BYTES.get(column, MAX_ID_CHARS) + 8) + SLACK_BYTES


def _page_problems(data: bytes, parquet: pq.ParquetFile, count: int, k: int) -> list[str]:
    """What reading the index would take beyond `count` anchors of values the schema allows (`_value_bound`): more rows,
    or more values or decoded bytes in a column by its pages' own headers (shards.parquet_pages), or text that cannot
    be read as a dictionary (see `_decoded_text`). Checked before any page is read: a small compressed file can decode
    into gigabytes, and the checksum in manifest.json proves nothing about an index a stranger wrote."""
    metadata = parquet.metadata
    rows = max(metadata.num_rows, sum(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)))
    if rows > count:
        return [f"{MANIFEST} counts {count} anchors, {INDEX} has {rows}"]
    problems, declared = [], {}  # column -> [values, decoded bytes] over its leaves
    for path, pages in column_pages(data, metadata).items():
        whole = sorted(WHOLE_TEXT_ENCODINGS[code] for code in pages.encodings & WHOLE_TEXT_ENCODINGS.keys())
        if whole:
            problems.append(f"{INDEX} column {path} holds {' and '.join(whole)}-encoded text, which arrow reads only "
                            f"value by value (in DELTA_BYTE_ARRAY a few bits can stand for a long value): write the "
                            f"index with pyarrow's default encodings")
        sums = declared.setdefault(path.split(".")[0], [0, 0])
        sums[0], sums[1] = sums[0] + pages.values, sums[1] + pages.most_bytes()
    for column, (values, size) in declared.items():
        most_values, most_bytes = _value_bound(column, count, k)
        if values > most_values or size > most_bytes:
            per_anchor = values // count if count and values % count == 0 and column != "anchor_id" else 0
            k_hint = f" ({per_anchor} per anchor, where {MANIFEST} says K = {k}: run.k is not the shards' K)" \
                if column in map(score_column, SCORES) and per_anchor > k else ""
            problems.append(f"{INDEX} column {column} holds {values} values of {size} bytes decoded{k_hint}; {count} "
                            f"anchors take at most {most_values} values of {most_bytes} bytes, so it was not read")
    return problems


def _decoded_text(table: pa.Table, declared: pa.Schema, count: int, k: int) -> tuple[pa.Table, list[str]]:
    """The index with the text columns read as dictionaries (a value named by many rows held once) decoded, once
    what they decode to is known to fit `_value_bound`; what does not fit is a problem, left undecoded."""
    problems = []
    for i, (field, column) in enumerate(zip(declared, table.columns)):
        if pa.types.is_dictionary(column.type) and not pa.types.is_dictionary(field.type):
            size = sum(pc.sum(pc.take(pc.binary_length(chunk.dictionary), chunk.indices)).as_py() or 0
                       for chunk in column.chunks)  # bytes of text once every row holds its own value
            most = _value_bound(field.name, count, k)[1]
            if size > most:
                problems.append(f"{INDEX} column {field.name} holds {size} bytes of text once decoded; {count} "
                                f"anchors take at most {most}, so it was not decoded")
            else:
                table = table.set_column(i, field.name, column.cast(column.type.value_type))
    return table, problems


def _parquet_table(data: bytes, count: int, k: int, where: str) -> pa.Table:
    """A Parquet file's bytes -> its table, in memory that arrow owns, read only once its pages hold no more than
    `count` anchors can take (`_page_problems`, `_decoded_text`: ManifestError naming `where` otherwise). Read from
    Python objects (io.BytesIO, bytes), arrow's pool threads hold buffers whose release needs the GIL; one that lets
    go while the interpreter exits aborts the process ("terminate called without an active exception", exit 134)
    after the command has done its work. Copied into arrow's memory first, and read by the file reader that starts no
    threads, none does."""
    sink = pa.BufferOutputStream()
    sink.write(data)
    buffer = sink.getvalue()
    parquet = pq.ParquetFile(pa.BufferReader(buffer), arrow_extensions_enabled=False)  # JSON text: text, not json
    problems = _page_problems(data, parquet, count, k)
    if problems:
        raise ManifestError.of(where, problems)
    text = [leaf.path for leaf in map(parquet.schema.column, range(len(parquet.schema)))
            if leaf.physical_type == "BYTE_ARRAY"]  # read as dictionaries (an arrow json column would not be)
    table = pq.ParquetFile(pa.BufferReader(buffer), metadata=parquet.metadata, read_dictionary=text,
                           arrow_extensions_enabled=False).read(use_threads=False)
    table, problems = _decoded_text(table, parquet.schema_arrow, count, k)
    if problems:
        raise ManifestError.of(where, problems)
    return table


SYNTH_RECORD = "run.json"  # what `clsp synth run` writes first, before any shard ({"clsp_run": "synth", ...})


def _begun_by_synth(folder: Path) -> bool:
    """Whether a folder without a manifest holds a synth job's record or shards: a job that has not finished (or a copy
    that left the manifest behind), not a folder of something else."""
    try:
        if any(SHARD_PATTERN.fullmatch(p.name) for p in folder.iterdir()):
            return True
        with open(folder / SYNTH_RECORD, "rb") as handle:
            record = json.loads(handle.read(1 << 20))
    except (OSError, ValueError):  # absent, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return False
    return isinstance(record, dict) and record.get("clsp_run") == "synth"


def pending_index(sha256: str) -> str:
    """The name write_manifest gives a new index until the manifest.json that records its checksum has replaced the
    old one; then it becomes index.parquet (shards.manifest_writer). PENDING_INDEX matches every such name."""
    return f"index-{sha256[:12]}.parquet"


PENDING_INDEX = re.compile(r"index-[0-9a-f]{12}\.parquet")  # the names pending_index gives (fullmatch)


def _most_index_bytes(count: int, k: int) -> int:
    """The largest index.parquet that `count` anchors can make (`_value_bound` of every column the schema allows)."""
    columns = [*INDEX_SCHEMA.names, *map(score_column, SCORES)]
    return sum(_value_bound(column, count, k)[1] for column in columns)


def _read_at_most(handle, most: int) -> bytes:
    """Up to `most` + 1 bytes of `handle`, read in chunks: one read(most + 1) would first allocate `most` bytes, which a
    manifest's forged count can make any size."""
    chunks, held = [], 0
    while held <= most:
        chunk = handle.read(min(1 << 24, most + 1 - held))
        if not chunk:
            break
        chunks.append(chunk)
        held += len(chunk)
    return b"".join(chunks)


def _read_index(handle, count: int, k: int, where: str) -> bytes:
    most = _most_index_bytes(count, k)
    data = _read_at_most(handle, most)
    if len(data) > most:
        raise ManifestError.of(where, [f"{INDEX} is larger than the {most} bytes {count} anchors can take, so it was "
                                       f"not read"])
    return data


def _pending_index(location: str, sha256: str, count: int, k: int) -> bytes | None:
    """The bytes of the index that manifest.json names by `sha256` under its pending name, when a write_manifest was
    stopped after it replaced manifest.json and before it renamed that index to index.parquet; else None."""
    try:
        with open_location(join_location(location, pending_index(sha256))) as handle:
            data = _read_at_most(handle, _most_index_bytes(count, k))
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def read_manifest(location: str | Path) -> Manifest:
    """Read and check a manifest and its index from a directory or URL. Raises ShardError (ManifestError for a
    broken contract) naming the problem and the fix."""
    location = check_location(str(location)).rstrip("/")
    where, index_where = join_location(location, MANIFEST), join_location(location, INDEX)
    try:
        manifest = parse_json(read_manifest_bytes(where), where)
    except FileNotFoundError:
        if "://" not in location and not Path(location).is_dir():
            raise ShardError(f"{location} does not exist: name the folder `clsp synth run` wrote (its --out)") from None
        if "://" in location:
            raise ShardError(f"{location} has no {MANIFEST}: it is not a shard directory, or the synth job writing it "
                             f"has not finished") from None
        if not _begun_by_synth(Path(location)):
            raise ShardError(f"{location} is not a shard directory (it has no {MANIFEST}, and no {SYNTH_RECORD} of a "
                             f"`clsp synth run`): name the folder `clsp synth run` wrote (its --out)") from None
        raise ShardError(f"{location} has no {MANIFEST}: the synth job did not finish there (rerun it with the same "
                         f"command to complete it), or the folder was copied without it (copy its {MANIFEST} and "
                         f"{INDEX} too)") from None
    except (OSError, SchemaError) as error:
        raise ShardError(f"{error}: {FIX}" if isinstance(error, SchemaError) else f"{where} cannot be read ({error})") \
            from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{where} is not a clsp shard manifest")
    version = manifest.get("schema_version")
    if type(version) is not int:
        raise ShardError(f"{where}: schema_version is {version!r}, not an integer: the manifest was not written by "
                         f"clsp or was changed; regenerate the shards")
    if version not in READ_VERSIONS:
        raise ShardError(f"{location} was written with shard schema version {version}; this clsp reads version "
                         f"{' or '.join(map(str, READ_VERSIONS))}: use a matching clsp release or regenerate the "
                         f"shards")
    problems = document_problems(manifest)
    if problems:
        raise ManifestError.of(where, problems)
    count, k = manifest["count"], manifest["run"]["k"]
    try:
        with open_location(index_where) as handle:
            data = _read_index(handle, count, k, index_where)
    except OSError as error:  # a first write cut short before its rename
        data = _pending_index(location, manifest["index"]["sha256"], count, k)
        if data is None:
            raise ShardError(f"{index_where} cannot be read ({error}): {FIX}") from None
    if hashlib.sha256(data).hexdigest() != manifest["index"]["sha256"]:
        data = _pending_index(location, manifest["index"]["sha256"], count, k)  # a rewrite cut short before its rename
        if data is None:
            raise ShardError(f"{index_where} does not match the checksum in {MANIFEST}: the index was changed")
    try:
        index = _parquet_table(data, manifest["count"], manifest["run"]["k"], index_where)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ShardError(f"{index_where} cannot be read as Parquet ({str(error)[:120]}): {FIX}") from None
    problems = index_problems(index, manifest)
    if problems:
        raise ManifestError.of(index_where, problems)
    run = manifest["run"]
    if isinstance(run["sampler"], dict):  # shards made before the sampler named its generator of noise
        run["sampler"].setdefault("noise", LEGACY_NOISE)
    return Manifest(location, run, manifest["shards"], index, manifest["count"], version)


__all__ = ["Manifest", "Contract", "ManifestError", "read_manifest", "score_column", "MANIFEST", "INDEX", "SchemaError"]
