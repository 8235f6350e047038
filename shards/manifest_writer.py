"""Writing a manifest, last, when every shard is complete: index every shard's samples (checksums, per-positive scores),
then `index.parquet` and `manifest.json`, a matching pair at every moment. What it writes passes `read_manifest`'s
checks, which it runs before writing (shards.manifest)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clsp.shards.atomic import fsync_dir, write_atomic
from clsp.shards.manifest import DISTANCE_RECORD, FORMAT, MAX_MANIFEST_BYTES, PENDING_INDEX, Manifest, ManifestError, \
    pending_index, read_manifest_bytes
from clsp.shards.manifest_checks import INDEX, INDEX_SCHEMA, MANIFEST, SCORE_TYPE, document_problems, index_problems, \
    looks_like_index, run_problems, score_column
from clsp.shards.reader import RawSample, ShardError, iter_shard, open_location
from clsp.shards.codecs import DEFAULT_CODEC
from clsp.shards.cores import available_cores
from clsp.shards.schema import CODEC_VERSIONS, SCHEMA_VERSION, positive_distances, sample_sha256
from clsp.shards.writer import SHARD_PATTERN, TEMP_PREFIX, shard_name


@dataclass(frozen=True)
class AgreementScorer:
    """What scores class agreement: `score(positives (n, K, H, W, 3) uint8, labels (n,) >= 0) -> (n, K)` in 0..1, and
    `record`, what it is (written to the manifest's run.scores.agreement)."""

    score: Callable[[np.ndarray, np.ndarray], np.ndarray]
    record: dict = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open_location(str(path)) as handle:  # a regular file only
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _index_shard(path: Path, k, scored: bool) -> tuple[dict, dict[str, list], list]:
    """One finished shard: its manifest entry, its index rows {column: values}, and, when `scored`, (row in the shard,
    positives (K, H, W, 3), label) of the samples the agreement scorer is to score. Runs in a thread: PNG decoding,
    sha256 and numpy let go of the GIL."""
    rows: dict[str, list] = {"anchor_id": [], "shard": [], "label": [], "sha256": [], "distance": []}
    pending = []
    for sample in iter_shard(str(path)):
        rows["anchor_id"].append(sample.key)
        rows["shard"].append(path.name)
        rows["label"].append(sample.label)
        rows["sha256"].append(sample_sha256(sample.ordered_members()))
        images = _decoded_positives(sample, k)
        rows["distance"].append(None if images is None else positive_distances(*images).tolist())
        if scored and images is not None and sample.label >= 0:
            pending.append((len(rows["label"]) - 1, images[1], sample.label))
    entry = {"name": path.name, "sha256": file_sha256(path), "count": len(rows["label"]), "bytes": path.stat().st_size}
    return entry, rows, pending


def _index_shards(directory: Path, k, agreement: AgreementScorer | None) -> tuple[list[dict], pa.Table]:
    """Every finished shard in `directory`: its manifest entry, and one index row per sample with its scores. Shards
    are read and scored on the available cores (a few at a time, so that at most that many shards' positives wait for
    the agreement scorer), and indexed in name order: the same index as one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    distance, agree = score_column("distance"), score_column("agreement")
    schema = pa.schema([*INDEX_SCHEMA, pa.field(distance, SCORE_TYPE)]
                       + ([pa.field(agree, SCORE_TYPE)] if agreement is not None else []))
    columns: dict[str, list] = {name: [] for name in schema.names}
    shards = []
    paths = sorted(p for p in directory.iterdir() if SHARD_PATTERN.fullmatch(p.name))
    # with agreement scores each shard waiting holds its positives (1,000 anchors x K = 8 at 224 px: 1.2 GB): 4 at most
    threads = max(1, min(16 if agreement is None else 4, available_cores(), len(paths)))
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(_index_shard, path, k, agreement is not None) for path in paths[:threads]]
        for i in range(len(paths)):
            entry, rows, pending = futures[i].result()
            futures[i] = None  # its rows are copied below; the window moves on
            if i + threads < len(paths):
                futures.append(pool.submit(_index_shard, paths[i + threads], k, agreement is not None))
            scores = [None] * len(rows["label"])
            if pending:
                values = agreement.score(np.stack([p[1] for p in pending]), np.array([p[2] for p in pending]))
                for (row, _, _), row_scores in zip(pending, np.asarray(values, np.float32).reshape(len(pending), k)):
                    scores[row] = row_scores.tolist()
            for name in INDEX_SCHEMA.names:
                columns[name] += rows[name]
            columns[distance] += rows["distance"]
            if agreement is not None:
                columns[agree] += scores
            shards.append(entry)
    return shards, pa.table(columns, schema=schema)


def manifest_run(run: dict, agreement: AgreementScorer | None = None) -> dict:
    """The `run` record that write_manifest writes for `run`: the codec only when it is not png, and the scores."""
    run = {key: value for key, value in run.items() if key != "codec" or value != DEFAULT_CODEC}
    return {**run, "scores": {"distance": DISTANCE_RECORD, **({"agreement": agreement.record} if agreement else {})}}


def expected_shards(run: dict) -> list[str]:
    """The shard names a synth run of `run` writes: ceil(source.count / anchors_per_shard) of them, from 0."""
    return [shard_name(i) for i in range(math.ceil(run["source"]["count"] / run["anchors_per_shard"]))]


def _missing_shards(directory: Path, run: dict) -> None:
    """Refuses a folder whose shards are not exactly those of `run` (a missing one would be left out of the index)."""
    present = {p.name for p in directory.iterdir() if SHARD_PATTERN.fullmatch(p.name)}
    expected = expected_shards(run)
    missing, extra = [n for n in expected if n not in present], sorted(present - set(expected))
    if missing or extra:
        raise ShardError(f"{directory} does not hold the {len(expected)} shards of its run ({run['source']['count']} "
                         f"anchors, {run['anchors_per_shard']} per shard): "
                         + "; ".join(([f"missing {', '.join(missing[:5])}"] if missing else [])
                                     + ([f"not of this run: {', '.join(extra[:5])}"] if extra else []))
                         + f"; {MANIFEST} not written: "
                         + "; ".join(([f"move {', '.join(extra[:5])} out of {directory} (--overwrite deletes only "
                                      f"the shards clsp wrote)"] if extra else [])
                                     + (["rerun the same `clsp synth run` command to make the missing shards, or "
                                         "--overwrite to start again"] if missing else [])))


def _count_problems(shards: list[dict], run: dict) -> list[str]:
    """Shard i holds anchors [i * aps, (i + 1) * aps) of the run's count: each shard's count must say so."""
    count, per_shard = run["source"]["count"], run["anchors_per_shard"]
    return [f"{s['name']} holds {s['count']} anchors, expected {min(per_shard, count - i * per_shard)} (the run has "
            f"{count} anchors, {per_shard} per shard)"
            for i, s in enumerate(shards) if s["count"] != min(per_shard, count - i * per_shard)]


def _publish(directory: Path, index: bytes, manifest: bytes, index_sha256: str) -> None:
    """Replace index.parquet and manifest.json so that the folder holds a matching pair at every moment: the new index
    is written beside the old one under its pending name, then manifest.json (which records its checksum) replaces
    the old one, and only then the new index becomes index.parquet. Stopped before the manifest, the old pair is whole
    (a failed write removes the pending index again; after a kill, `settle_index` does); stopped after it,
    read_manifest reads the pending index until `settle_index` (the synth job's rerun, or the next write) renames it."""
    settle_index(directory)  # what an earlier write left, before a failure here could remove what it needs
    pending = directory / pending_index(index_sha256)
    temp = lambda name: f"{TEMP_PREFIX}{name}.{os.getpid()}"  # noqa: E731 (what shards.writer.temp_files lists)
    write_atomic(pending, index, temp(pending.name))
    try:
        write_atomic(directory / MANIFEST, manifest, temp(MANIFEST))
    except BaseException:  # also a Ctrl-C or a failed fsync after manifest.json was replaced: its index stays
        if _recorded_index(directory) != index_sha256:
            pending.unlink(missing_ok=True)
        raise
    os.replace(pending, directory / INDEX)
    fsync_dir(directory)


def pending_indexes(directory: Path) -> tuple[Path | None, list[Path]]:
    """The pending indexes a stopped write_manifest left in `directory` (see `_publish`): (the one manifest.json
    records, or None; the others, whose manifest was never written). Files under that name that are no index are
    not ours and are left out."""
    recorded = _recorded_index(directory)
    live, stale = None, []
    for path in sorted(directory.glob("index-*.parquet")):
        if not (PENDING_INDEX.fullmatch(path.name) and looks_like_index(path)):
            continue  # not ours
        if isinstance(recorded, str) and path.name == pending_index(recorded) and file_sha256(path) == recorded:
            live = path
        else:
            stale.append(path)
    return live, stale


def _recorded_index(directory: Path) -> str | None:
    """The index checksum that `directory`'s manifest.json records, if it can be read."""
    try:  # read as every reader reads it: a regular file of at most MAX_MANIFEST_BYTES
        return json.loads(read_manifest_bytes(str(directory / MANIFEST)))["index"]["sha256"]
    except (OSError, ShardError, ValueError, KeyError, TypeError):
        return None


def settle_index(directory: str | Path) -> None:
    """Finish what a stopped write_manifest left: the pending index that manifest.json records becomes index.parquet;
    any other pending index is removed."""
    directory = Path(directory)
    live, stale = pending_indexes(directory)
    for path in stale:
        path.unlink()
    if live is not None:
        os.replace(live, directory / INDEX)
        fsync_dir(directory)


def write_manifest(directory: str | Path, run: dict, agreement: AgreementScorer | None = None,
                   complete: bool = False) -> Manifest:
    """Index every finished shard in `directory`, scoring each positive (its distance to the anchor, and with
    `agreement` its class agreement), and write index.parquet and manifest.json so that the folder holds a matching
    pair at every moment (`_publish`). Refuses (writing nothing) what `read_manifest` would refuse, and with
    `complete` (the synth job) a folder whose shards are not exactly shards 0..N-1 of `run`, holding run.source.count
    anchors, anchors_per_shard per shard (the last the rest).

    `run` may name the image codec (run["codec"], default png): the manifest is written with that codec's schema
    version, and records the codec only when it is not png, so a PNG run's manifest stays as version 2 wrote it."""
    directory = Path(directory)
    codec = run.get("codec", DEFAULT_CODEC)
    run = manifest_run(run, agreement)
    # an unknown codec is refused here (run_problems), naming the codecs
    version = CODEC_VERSIONS.get(codec, SCHEMA_VERSION) if isinstance(codec, str) else SCHEMA_VERSION
    problems = run_problems(run, version)  # before indexing: its scores need a valid K
    if problems:
        raise ManifestError.of(f"{directory}/{MANIFEST} (not written)", problems)
    if complete:
        _missing_shards(directory, run)  # before indexing: nothing is read for a refused folder
    shards, index = _index_shards(directory, run.get("k"), agreement)
    if not shards:
        raise ShardError(f"{directory} holds no finished shards: nothing to index")
    buffer = io.BytesIO()
    pq.write_table(index, buffer)
    manifest = {"format": FORMAT, "schema_version": version, "count": index.num_rows, "run": run,
                "shards": shards, "index": {"name": INDEX, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}}
    problems = document_problems(manifest) or index_problems(index, manifest)
    if not problems and complete:
        problems = _count_problems(shards, run)
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if not problems and len(text) > MAX_MANIFEST_BYTES:
        problems = [f"it would take {len(text)} bytes for {len(shards)} shards, more than the {MAX_MANIFEST_BYTES} "
                    f"read_manifest reads: make fewer shards (more --anchors-per-shard)"]
    if problems:
        raise ManifestError.of(f"{directory}/{MANIFEST} (not written)", problems)
    _publish(directory, buffer.getvalue(), text, manifest["index"]["sha256"])
    return Manifest(str(directory), run, shards, index, index.num_rows, version)
