"""`verify`: every shard opens, every anchor exactly once, K positives each, checksums match the manifest.

Returns every problem found (not just the first), each naming the shard or sample and what to do.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from shards.manifest import INDEX, MANIFEST, file_sha256, read_manifest
from shards.reader import RawSample, ShardError, iter_shard
from shards.schema import ANCHOR, LABEL, META, SchemaError, check_id, positive_key, sample_sha256
from shards.writer import SHARD_PATTERN, temp_files


def _check_sample(sample: RawSample, k: int, image_size: int | None) -> list[str]:
    where = f"{sample.shard}: sample {sample.key}"
    problems = []
    if sample.ignored:
        problems.append(f"{where} holds member(s) outside the schema, not decoded: {', '.join(sample.ignored)}")
    try:
        check_id(sample.key)
    except SchemaError as error:
        problems.append(f"{where}: {error}")
    expected = {ANCHOR, LABEL, META} | {positive_key(j) for j in range(k)}
    if set(sample.members) != expected:
        lacking, extra = sorted(expected - set(sample.members)), sorted(set(sample.members) - expected)
        problems.append(f"{where} has {sample.k} positives, expected {k}"
                        + (f"; lacks {', '.join(lacking)}" if lacking else "")
                        + (f"; has extra {', '.join(extra)}" if extra else ""))
    try:
        images = [sample.anchor()] + [sample.positive(j) for j in range(k) if positive_key(j) in sample.members]
        sizes = {im.shape for im in images}
        if image_size is not None and sizes != {(image_size, image_size, 3)}:
            problems.append(f"{where}: image shapes {sorted(sizes)}, expected {(image_size, image_size, 3)}")
        sample.label
        meta = sample.meta
        if len(meta["seeds"]) != k or meta.get("anchor_id") != sample.key:
            problems.append(f"{where}: meta.json must name the anchor and hold {k} seeds")
    except (SchemaError, ValueError, UnicodeDecodeError) as error:
        problems.append(f"{where}: {error}")
    return problems


def verify(directory: str | Path) -> list[str]:
    """All problems of a shard directory; an empty list means it is sound."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    problems = [f"{p.name}: unfinished file left by an interrupted writer: rerun the synth job to finish, "
                f"or delete it" for p in temp_files(directory)]
    try:
        manifest = read_manifest(str(directory))
    except (ShardError, OSError, ValueError) as error:
        return problems + [f"manifest: {error}"]
    k, image_size = manifest.k, manifest.run.get("image_size")
    listed = {s["name"]: s for s in manifest.shards}
    on_disk = sorted(p.name for p in directory.iterdir() if SHARD_PATTERN.match(p.name))
    problems += [f"{name}: listed in {MANIFEST} but missing" for name in sorted(set(listed) - set(on_disk))]
    problems += [f"{name}: on disk but not in {MANIFEST} (from another run?)" for name in on_disk if name not in listed]

    expected = {row["anchor_id"]: row for row in manifest.index.to_pylist()}
    seen: Counter = Counter()
    for name in on_disk:
        entry = listed.get(name)
        if entry is not None and file_sha256(directory / name) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from {MANIFEST}: the file was changed or damaged")
        count = 0
        try:
            for sample in iter_shard(str(directory / name)):
                count += 1
                seen[sample.key] += 1
                problems += _check_sample(sample, k, image_size)
                row = expected.get(sample.key)
                if row is None:
                    problems.append(f"{name}: sample {sample.key} is not in {INDEX}")
                elif row["shard"] != name or row["sha256"] != sample_sha256(sample.ordered_members()):
                    problems.append(f"{name}: sample {sample.key} does not match its {INDEX} entry "
                                    f"(shard {row['shard']}, checksum)")
        except ShardError as error:
            problems.append(str(error))
        if entry is not None and count != entry["count"]:
            problems.append(f"{name}: holds {count} samples, {MANIFEST} says {entry['count']}")
    problems += [f"anchor {key} appears {n} times (each anchor must appear exactly once)"
                 for key, n in sorted(seen.items()) if n > 1]
    absent = sorted(set(expected) - set(seen))
    if absent:
        problems.append(f"{len(absent)} anchor(s) of {INDEX} are in no shard, e.g. {', '.join(absent[:5])}")
    if manifest.count != len(expected):
        problems.append(f"{MANIFEST} counts {manifest.count} anchors, {INDEX} has {len(expected)}")
    return problems
