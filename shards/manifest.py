"""The manifest, written last: `index.parquet` (one row per anchor) and `manifest.json` (run metadata and shard list).

A shard directory is complete exactly when `manifest.json` exists. The run metadata records what made the shards:
schema version, source (spec, split, fingerprint, count, and the class count when the source names its classes),
generator (model id, weights hash), sampler settings, K, seed, image size, anchors per shard and package version.

`read_manifest` is the one check of a manifest (field types, required fields, bounds, index columns and rows) that every
reader goes through, and `write_manifest` refuses to write what it would refuse. `Manifest.contract()` then holds what
the manifest promises about each sample, which `verify` and the training stream check in the same way.

Schema version 2 adds per-positive scores to the index (list<float32> columns of K values per anchor, in 0..1):
`positive_distance` (always written: `shards.schema.positive_distances` of the decoded images) and `positive_agreement`
(written when `write_manifest` is given an `AgreementScorer`, e.g. the synth job's reference classifier). A row is null
where its sample could not be scored (not K decodable positives: the contract refuses that sample anyway), and an
agreement row is null for an anchor without a label. `Manifest.scores(metric)` hands them to the trainer.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.reader import RawSample, ShardError, check_location, iter_shard, join_location, open_location
from shards.schema import ANCHOR, ID_PATTERN, MAX_IMAGE_SIDE, MAX_K, META, POSITIVE, READ_VERSIONS, SCHEMA_VERSION, \
    SCORES, SchemaError, check_png, member_keys, parse_json, positive_distances, sample_sha256
from shards.writer import SHARD_PATTERN

MANIFEST, INDEX = "manifest.json", "index.parquet"
FORMAT = "clsp-shards"
INDEX_SCHEMA = pa.schema([("anchor_id", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
                          ("sha256", pa.string())])
SCORE_TYPE = pa.list_(pa.float32())  # K scores per anchor, each in 0..1
DISTANCE_RECORD = "RMS pixel difference to the anchor, pixels in [0, 1] (shards.schema.positive_distances)"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
FIX = "regenerate the shards with `clsp synth run` (`clsp shards verify DIR` lists every problem)"
# (key, type[, lowest, highest]) of each record of manifest.json; int means a true integer (not a bool)
TOP_SPEC = [("count", int, 0, None), ("run", dict), ("shards", list), ("index", dict)]
RUN_SPEC = [("source", dict), ("generator", dict), ("sampler", dict), ("k", int, 0, MAX_K), ("seed", int),
            ("image_size", int, 1, MAX_IMAGE_SIDE), ("anchors_per_shard", int, 1, None), ("package_version", str)]
SOURCE_SPEC = [("num_classes", int, 1, None)]  # optional: written when the source names its classes
SHARD_SPEC = [("name", str), ("sha256", str), ("count", int, 0, None), ("bytes", int, 0, None)]
INDEX_SPEC = [("name", str), ("sha256", str)]
RUN_FIELDS = tuple(field[0] for field in RUN_SPEC)
_KINDS = {int: "an integer", str: "text", dict: "an object", list: "a list"}


def score_column(metric: str) -> str:
    """The index column of a per-positive score (shards.schema.SCORES)."""
    if metric not in SCORES:
        raise ValueError(f"unknown score {metric!r}: the shards hold {' and '.join(SCORES)}")
    return f"positive_{metric}"


@dataclass(frozen=True)
class AgreementScorer:
    """What scores class agreement: `score(positives (n, K, H, W, 3) uint8, labels (n,) >= 0) -> (n, K)` in 0..1, and
    `record`, what it is (written to the manifest's run.scores.agreement)."""

    score: Callable[[np.ndarray, np.ndarray], np.ndarray]
    record: dict = field(default_factory=dict)


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

    def entry(self, location: str) -> dict:
        """The manifest entry of the shard at `location` (what `iter_shard` compares the shard with)."""
        name = location.rstrip("/").rsplit("/", 1)[-1]
        if name not in self.entries:
            raise ShardError(f"{name} is not listed in {MANIFEST}: it belongs to another run")
        return self.entries[name]

    def problems(self, sample: RawSample) -> list[str]:
        """Everything wrong with a sample, each naming its shard and id; images are checked without decoding."""
        where = f"{sample.shard}: sample {sample.key}"
        problems = []
        if sample.ignored:
            problems.append(f"{where} holds member(s) outside the schema, not decoded: {', '.join(sample.ignored)}")
        expected = set(member_keys(self.k))
        if set(sample.members) != expected:
            lacking, extra = sorted(expected - set(sample.members)), sorted(set(sample.members) - expected)
            problems.append(f"{where} has {sample.k} positives, expected {self.k}"
                            + (f"; lacks {', '.join(lacking)}" if lacking else "")
                            + (f"; has extra {', '.join(extra)}" if extra else ""))
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
        except SchemaError as error:
            problems.append(f"{where}: {error}")
        for key in [key for key in sample.members if key == ANCHOR or POSITIVE.match(key)]:
            try:
                check_png(sample.members[key], f"{sample.shard}: {sample.key}.{key}", self.image_size)
            except SchemaError as error:
                problems.append(str(error))
        if row in self.unscored and not problems:
            problems.append(f"{where} has no scores in {INDEX}: its images could not be scored when the manifest was "
                            f"written")
        if not problems and bytes.fromhex(sample_sha256(sample.ordered_members())) != self.row_sha256[row].tobytes():
            problems.append(f"{where} does not match its checksum in {INDEX}")
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
                        self.index.column("label").to_numpy(), checksums, unscored)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_fields(record: dict, spec: list[tuple], where: str, problems: list[str]) -> bool:
    """Add a problem for each field of `record` that is missing, of another type or out of bounds; True if none."""
    before = len(problems)
    for key, kind, *bounds in spec:
        value = record.get(key)
        if key not in record:
            problems.append(f"{where}{key} is missing")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{where}{key} is {_show(value)}, expected {_KINDS[kind]}")
        elif bounds and not (value >= bounds[0] and (bounds[1] is None or value <= bounds[1])):
            limit = f"{bounds[0]}..{bounds[1]}" if bounds[1] is not None else f"at least {bounds[0]}"
            problems.append(f"{where}{key} is {value}, expected {limit}")
    return len(problems) == before


def _document_problems(document: dict) -> list[str]:
    """Types, required fields and bounds of manifest.json (format and schema version are checked before)."""
    problems: list[str] = []
    _check_fields(document, TOP_SPEC, "", problems)
    run, index, shards = document.get("run"), document.get("index"), document.get("shards")
    if isinstance(run, dict) and _check_fields(run, RUN_SPEC, "run.", problems) and "num_classes" in run["source"]:
        _check_fields(run["source"], SOURCE_SPEC, "run.source.", problems)
    if isinstance(index, dict) and _check_fields(index, INDEX_SPEC, "index.", problems):
        if index["name"] != INDEX or not HEX64.match(index["sha256"]):
            problems.append(f"index must name {INDEX} and give its sha256 (64 hex digits)")
    if isinstance(shards, list):
        problems += [] if shards else ["shards is empty: a manifest lists at least one shard"]
        for i, entry in enumerate(shards):
            where = f"shards[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"{where} is {_show(entry)}, expected an object")
            elif _check_fields(entry, SHARD_SPEC, f"{where}.", problems):
                if not SHARD_PATTERN.match(entry["name"]):
                    problems.append(f"{where}.name is {_show(entry['name'])}: shard names must look like "
                                    f"shard-000000.tar")
                if not HEX64.match(entry["sha256"]):
                    problems.append(f"{where}.sha256 is not 64 hex digits")
        names = [entry.get("name") for entry in shards if isinstance(entry, dict)]
        problems += [f"shard {name} is listed twice" for name in sorted({n for n in names if names.count(n) > 1})]
    return problems


def _index_problems(index: pa.Table, document: dict) -> list[str]:
    """The index against the schema and a checked manifest.json: unique, valid ids in listed shards, bounded labels,
    and (version 2) scores."""
    scores = [score_column(m) for m in SCORES if score_column(m) in index.column_names]
    expected = pa.schema([*INDEX_SCHEMA, *(pa.field(name, SCORE_TYPE) for name in scores)]) \
        if document["schema_version"] >= 2 else INDEX_SCHEMA
    if not index.schema.equals(expected):
        def columns(schema: pa.Schema) -> str:
            return ", ".join(f"{f.name} ({f.type})" for f in schema)
        optional = f" (then optionally {', '.join(f'{score_column(m)} ({SCORE_TYPE})' for m in SCORES)})" \
            if document["schema_version"] >= 2 else ""
        return [f"{INDEX} has columns {columns(index.schema)}; expected {columns(INDEX_SCHEMA)}{optional}"]
    empty = [name for name in INDEX_SCHEMA.names if index.column(name).null_count]
    if empty:
        return [f"{INDEX} has empty values in {', '.join(empty)}"]
    problems = []
    if index.num_rows != document["count"]:
        problems.append(f"{MANIFEST} counts {document['count']} anchors, {INDEX} has {index.num_rows}")
    ids = index.column("anchor_id")
    bad = pc.filter(ids, pc.invert(pc.match_substring_regex(ids, ID_PATTERN.pattern)))
    if len(bad):
        problems.append(f"{INDEX} holds {len(bad)} anchor id(s) the schema does not allow (1-80 letters, digits, '_' "
                        f"or '-'), e.g. {_show(bad[0].as_py())}")
    if not pc.all(pc.match_substring_regex(index.column("sha256"), HEX64.pattern)).as_py():
        problems.append(f"{INDEX} holds sample checksums that are not 64 hex digits")
    counts = pc.value_counts(ids)
    twice = pc.filter(counts, pc.greater(counts.field("counts"), 1)).to_pylist()
    problems += [f"anchor {d['values']} appears {d['counts']} times in {INDEX} (each anchor must appear exactly once)"
                 for d in twice[:5]]
    problems += [f"... and {len(twice) - 5} more anchors appear more than once"] if len(twice) > 5 else []
    problems += _label_problems(index, document["run"]["source"].get("num_classes"))
    problems += _score_problems(index, document["run"]["k"])
    per_shard = {d["values"]: d["counts"] for d in pc.value_counts(index.column("shard")).to_pylist()}
    entries = {entry["name"]: entry for entry in document["shards"]}
    problems += [f"{INDEX} lists {n} anchor(s) in {name}, which {MANIFEST} does not list"
                 for name, n in sorted(per_shard.items()) if name not in entries]
    problems += [f"{MANIFEST} says {name} holds {entry['count']} anchors, {INDEX} lists {per_shard.get(name, 0)}"
                 for name, entry in entries.items() if per_shard.get(name, 0) != entry["count"]]
    return problems


def _score_problems(index: pa.Table, k: int) -> list[str]:
    """Each score column holds, per anchor, K finite values in 0..1 or null; agreement is null for unlabelled
    anchors."""
    problems = []
    for name in [score_column(m) for m in SCORES if score_column(m) in index.column_names]:
        column = index.column(name).combine_chunks()  # (N,) lists
        wrong = index.filter(pc.not_equal(pc.list_value_length(column), k))  # null rows are dropped
        if wrong.num_rows:
            first = wrong.slice(0, 1).to_pylist()[0]
            problems.append(f"{INDEX} column {name} holds {len(first[name])} value(s) for anchor {first['anchor_id']}"
                            f" ({wrong.num_rows} anchor(s) in all); expected K={k} per anchor")
        values = column.flatten()  # (valid rows x K,)
        inside = pc.and_(pc.is_finite(values), pc.and_(pc.greater_equal(values, 0), pc.less_equal(values, 1)))
        if values.null_count or not pc.all(inside).as_py():
            problems.append(f"{INDEX} column {name} holds values that are not numbers in 0..1")
    if score_column("agreement") in index.column_names:
        unlabelled = pc.and_(pc.is_valid(index.column(score_column("agreement"))), pc.equal(index.column("label"), -1))
        if pc.any(unlabelled).as_py():
            problems.append(f"{INDEX} gives class agreement scores to anchors without a label (-1)")
    return problems


def _label_problems(index: pa.Table, num_classes: int | None) -> list[str]:
    """Labels are -1 (unknown) or a class in 0..num_classes-1 (any class number when the count is not recorded)."""
    labels = index.column("label")
    outside = pc.less(labels, -1) if num_classes is None else pc.or_(pc.less(labels, -1),
                                                                   pc.greater_equal(labels, num_classes))
    wrong = index.filter(outside)
    if not wrong.num_rows:
        return []
    first = wrong.slice(0, 1).to_pylist()[0]
    allowed = "-1 (unknown)" + (f" or 0..{num_classes - 1} ({num_classes} classes)" if num_classes else
                                " or a class number >= 0")
    return [f"label {first['label']} of anchor {first['anchor_id']} ({first['shard']}) is not {allowed}"
            + (f"; {wrong.num_rows} labels are out of range" if wrong.num_rows > 1 else "")]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _decoded_positives(sample: RawSample, k) -> tuple[np.ndarray, np.ndarray] | None:
    """(anchor (H, W, 3), positives (K, H, W, 3)) uint8 of a sample with K decodable positives of its anchor's size;
    None otherwise (its scores are null, and the contract refuses the sample)."""
    if sample.k != k:
        return None
    try:
        anchor = sample.anchor()
        positives = np.stack([sample.positive(j) for j in range(k)]) if k else np.zeros((0, *anchor.shape), np.uint8)
    except ValueError:  # SchemaError (an image that does not decode), or positives of different sizes
        return None
    return (anchor, positives) if positives.shape[1:] == anchor.shape else None


def _index_shards(directory: Path, k, agreement: AgreementScorer | None) -> tuple[list[dict], pa.Table]:
    """Every finished shard in `directory`: its manifest entry, and one index row per sample with its scores."""
    distance, agree = score_column("distance"), score_column("agreement")
    schema = pa.schema([*INDEX_SCHEMA, pa.field(distance, SCORE_TYPE)]
                       + ([pa.field(agree, SCORE_TYPE)] if agreement is not None else []))
    rows: dict[str, list] = {name: [] for name in schema.names}
    shards = []
    for path in sorted(p for p in directory.iterdir() if SHARD_PATTERN.match(p.name)):
        count, pending = 0, []  # pending: (row, positives (K, H, W, 3), label) for the agreement scorer, per shard
        for sample in iter_shard(str(path)):
            rows["anchor_id"].append(sample.key)
            rows["shard"].append(path.name)
            rows["label"].append(sample.label)
            rows["sha256"].append(sample_sha256(sample.ordered_members()))
            images = _decoded_positives(sample, k)
            rows[distance].append(None if images is None else positive_distances(*images).tolist())
            if agreement is not None:
                rows[agree].append(None)  # unscored, or no label: filled in below
                if images is not None and sample.label >= 0:
                    pending.append((len(rows[agree]) - 1, images[1], sample.label))
            count += 1
        if pending:
            values = agreement.score(np.stack([p[1] for p in pending]), np.array([p[2] for p in pending]))  # (n, K)
            for (row, _, _), scores in zip(pending, np.asarray(values, np.float32).reshape(len(pending), k)):
                rows[agree][row] = scores.tolist()
        shards.append({"name": path.name, "sha256": file_sha256(path), "count": count,
                       "bytes": path.stat().st_size})
    return shards, pa.table(rows, schema=schema)


def write_manifest(directory: str | Path, run: dict, agreement: AgreementScorer | None = None) -> Manifest:
    """Index every finished shard in `directory`, scoring each positive (its distance to the anchor, and with
    `agreement` its class agreement), and write index.parquet, then manifest.json (last). Refuses (writing nothing)
    what `read_manifest` would refuse."""
    directory = Path(directory)
    run = {**run, "scores": {"distance": DISTANCE_RECORD, **({"agreement": agreement.record} if agreement else {})}}
    shards, index = _index_shards(directory, run.get("k"), agreement)
    if not shards:
        raise ShardError(f"{directory} holds no finished shards: nothing to index")
    buffer = io.BytesIO()
    pq.write_table(index, buffer)
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "count": index.num_rows, "run": run,
                "shards": shards, "index": {"name": INDEX, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}}
    problems = _document_problems(manifest) or _index_problems(index, manifest)
    if problems:
        raise ManifestError.of(f"{directory}/{MANIFEST} (not written)", problems)
    _write_atomic(directory / INDEX, buffer.getvalue())
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return Manifest(str(directory), run, shards, index, index.num_rows)


def _read(location: str) -> bytes:
    with open_location(location) as handle:
        return handle.read(16 << 20)


def read_manifest(location: str | Path) -> Manifest:
    """Read and check a manifest and its index from a directory or URL. Raises ShardError (ManifestError for a
    broken contract) naming the problem and the fix."""
    location = check_location(str(location)).rstrip("/")
    where, index_where = join_location(location, MANIFEST), join_location(location, INDEX)
    try:
        manifest = parse_json(_read(where), where)
    except FileNotFoundError:
        raise ShardError(f"{location} has no {MANIFEST}: the synth job did not finish there; rerun it with the same "
                         f"command to complete it") from None
    except (OSError, SchemaError) as error:
        raise ShardError(f"{error}: {FIX}" if isinstance(error, SchemaError) else f"{where} cannot be read ({error})") \
            from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{where} is not a clsp shard manifest")
    version = manifest.get("schema_version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise ShardError(f"{location} was written with shard schema version {version}; this clsp reads version "
                         f"{' or '.join(map(str, READ_VERSIONS))}: use a matching clsp release or regenerate the "
                         f"shards")
    problems = _document_problems(manifest)
    if problems:
        raise ManifestError.of(where, problems)
    try:
        with open_location(index_where) as handle:
            data = handle.read()
    except OSError as error:
        raise ShardError(f"{index_where} cannot be read ({error}): {FIX}") from None
    if hashlib.sha256(data).hexdigest() != manifest["index"]["sha256"]:
        raise ShardError(f"{index_where} does not match the checksum in {MANIFEST}: the index was changed")
    try:  # no arrow thread pool: torch + arrow pools can abort at exit
        index = pq.read_table(io.BytesIO(data), use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ShardError(f"{index_where} cannot be read as Parquet ({str(error)[:120]}): {FIX}") from None
    problems = _index_problems(index, manifest)
    if problems:
        raise ManifestError.of(index_where, problems)
    return Manifest(location, manifest["run"], manifest["shards"], index, manifest["count"], version)


__all__ = ["Manifest", "Contract", "ManifestError", "AgreementScorer", "read_manifest", "write_manifest",
           "score_column", "file_sha256", "MANIFEST", "INDEX", "SchemaError"]
