"""The manifest, written last: `index.parquet` (one row per anchor) and `manifest.json` (run metadata and shard list).

A shard directory is complete exactly when `manifest.json` exists. The run metadata records what made the shards:
schema version, source (spec, split, fingerprint, count), generator (model id, weights hash), sampler settings, K,
seed, image size, anchors per shard and package version.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards.reader import ShardError, check_location, iter_shard, join_location, open_location
from shards.schema import SCHEMA_VERSION, SchemaError, sample_sha256
from shards.writer import SHARD_PATTERN

MANIFEST, INDEX = "manifest.json", "index.parquet"
FORMAT = "clsp-shards"
INDEX_SCHEMA = pa.schema([("anchor_id", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
                          ("sha256", pa.string())])
RUN_FIELDS = ("source", "generator", "sampler", "k", "seed", "image_size", "anchors_per_shard", "package_version")


@dataclass(frozen=True)
class Manifest:
    location: str
    run: dict
    shards: list[dict]  # [{name, sha256, count, bytes}] in name order
    index: pa.Table  # anchor_id, shard, label, sha256
    count: int

    @property
    def k(self) -> int:
        return int(self.run["k"])

    def shard_locations(self, base: str | None = None) -> list[str]:
        """Where the shards are: beside the manifest, or under `base` (a directory or URL the user gives)."""
        return [join_location(base or self.location, s["name"]) for s in self.shards]


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


def write_manifest(directory: str | Path, run: dict) -> Manifest:
    """Index every finished shard in `directory` and write index.parquet, then manifest.json (last)."""
    directory = Path(directory)
    missing = [f for f in RUN_FIELDS if f not in run]
    if missing:
        raise ValueError(f"run metadata lacks {', '.join(missing)}")
    rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    shards = []
    for path in sorted(p for p in directory.iterdir() if SHARD_PATTERN.match(p.name)):
        count = 0
        for sample in iter_shard(str(path)):
            rows["anchor_id"].append(sample.key)
            rows["shard"].append(path.name)
            rows["label"].append(sample.label)
            rows["sha256"].append(sample_sha256(sample.ordered_members()))
            count += 1
        shards.append({"name": path.name, "sha256": file_sha256(path), "count": count,
                       "bytes": path.stat().st_size})
    if not shards:
        raise ShardError(f"{directory} holds no finished shards: nothing to index")
    index = pa.table(rows, schema=INDEX_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(index, buffer)
    _write_atomic(directory / INDEX, buffer.getvalue())
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "count": index.num_rows, "run": run,
                "shards": shards, "index": {"name": INDEX, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}}
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return Manifest(str(directory), run, shards, index, index.num_rows)


def read_manifest(location: str | Path) -> Manifest:
    """Read and check a manifest from a directory or URL. Raises ShardError naming the problem and the fix."""
    location = check_location(str(location)).rstrip("/")
    try:
        with open_location(join_location(location, MANIFEST)) as handle:
            manifest = json.loads(handle.read(16 << 20).decode("utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{location} has no {MANIFEST}: the synth job did not finish there; rerun it with the same "
                         f"command to complete it") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ShardError(f"{location}/{MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{location}/{MANIFEST} is not a clsp shard manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{location} was written with shard schema version {version}; this clsp reads version "
                         f"{SCHEMA_VERSION}: use a matching clsp release or regenerate the shards")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and SHARD_PATTERN.match(str(s.get("name")))
                                                for s in shards):
        raise ShardError(f"{location}/{MANIFEST}: shard names must look like shard-000000.tar")
    with open_location(join_location(location, INDEX)) as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != manifest.get("index", {}).get("sha256"):
        raise ShardError(f"{location}/{INDEX} does not match the checksum in {MANIFEST}: the index was changed")
    index = pq.read_table(io.BytesIO(data), use_threads=False)  # no arrow thread pool: torch + arrow pools can abort at exit
    if index.schema.names != INDEX_SCHEMA.names:
        raise ShardError(f"{location}/{INDEX} has columns {index.schema.names}, expected {INDEX_SCHEMA.names}")
    return Manifest(location, manifest["run"], shards, index, int(manifest["count"]))


__all__ = ["Manifest", "read_manifest", "write_manifest", "file_sha256", "MANIFEST", "INDEX", "SchemaError"]
