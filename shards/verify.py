"""`verify`: the manifest and index hold to the contract, every shard opens and matches its manifest entry, every anchor
appears exactly once with K positives, and every image decodes.

The manifest goes through `read_manifest` and each sample through `Contract.problems`, the checks the training stream
makes, so verify and training agree on every directory; verify adds only what training does lazily (decoding every
positive, not just the drawn one, and recomputing each positive's distance to its anchor, which the index records and
--positive-filter reads) and what is beside the run (stray files). Returns every problem found (not just the
first), each naming the shard or sample and what to do.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from clsp.shards.manifest import INDEX, MANIFEST, Contract, ManifestError, read_manifest
from clsp.shards.manifest_checks import score_column
from clsp.shards.manifest_writer import pending_indexes
from clsp.shards.reader import RawSample, ShardError, iter_shard
from clsp.shards.schema import SchemaError, positive_distances
from clsp.shards.writer import SHARD_PATTERN, temp_files


def _sample_problems(sample: RawSample, contract: Contract, distances: list | None) -> list[str]:
    """`distances`: the index's positive_distance column (a list of K floats, or None, per row), or None without it."""
    problems = contract.problems(sample)
    if not problems:  # headers are sound: decode every image, as training will over the epochs
        try:
            anchor, positives = sample.anchor(), np.stack([sample.positive(j) for j in range(contract.k)])
        except SchemaError as error:
            return problems + [str(error)]
        recorded = None if distances is None else distances[contract.rows[sample.key]]
        if recorded is not None and not np.array_equal(np.float32(recorded), positive_distances(anchor, positives)):
            problems.append(f"{sample.shard}: sample {sample.key}: its {score_column('distance')} in {INDEX} is not "
                            f"the distance of its images (shards.schema.positive_distances): the index was changed; "
                            f"regenerate the shards, or rerun the synth command that made them with --score-reference "
                            f"(it rewrites the index from the images)")
    return problems


def verify(directory: str | Path) -> list[str]:
    """All problems of a shard directory; an empty list means it is sound. ShardError when `directory` names no local
    folder: there is nothing to verify, which is not the same as a directory that fails."""
    if "://" in str(directory):  # it lists the folder (shards on disk that the manifest does not name): local only
        raise ShardError(f"{directory}: verify checks a local shard directory; copy the shards to a local folder and "
                         f"verify that (training reads the URL itself and checks every shard it reads against the "
                         f"manifest)")
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"{directory} {'is not a directory' if directory.exists() else 'does not exist'}: name the "
                         f"folder `clsp synth run` wrote (its --out)")
    problems = [f"{p.name}: unfinished file left by an interrupted writer: rerun the synth job to finish, "
                f"or delete it" for p in temp_files(directory)]
    problems += [f"{p.name}: an index whose {MANIFEST} was never written (a manifest write was interrupted): rerun "
                 f"the synth job, which removes it, or delete it" for p in pending_indexes(directory)[1]]
    try:
        manifest = read_manifest(str(directory))
        contract = manifest.contract()
    except ManifestError as error:
        return problems + [f"manifest: {problem}" for problem in error.problems]
    except ShardError as error:
        return problems + [f"manifest: {error}"]
    on_disk = sorted(p.name for p in directory.iterdir() if SHARD_PATTERN.fullmatch(p.name))
    problems += [f"{name}: listed in {MANIFEST} but missing" for name in contract.entries if name not in on_disk]
    problems += [f"{name}: on disk but not in {MANIFEST} (from another run?)" for name in on_disk
                 if name not in contract.entries]
    column = score_column("distance")
    distances = manifest.index.column(column).to_pylist() if column in manifest.index.column_names else None
    seen: set[str] = set()
    listed = [name for name in on_disk if name in contract.entries]
    # every image is decoded: minutes for CIFAR-10 at K = 8, so a bar (on stderr, gone when done)
    for name in tqdm(listed, desc=f"verifying {directory.name}", unit="shard", leave=False, file=sys.stderr):
        try:
            for sample in iter_shard(str(directory / name), contract.entries[name]):
                seen.add(sample.key)
                problems += _sample_problems(sample, contract, distances)
        except ShardError as error:
            problems.append(str(error))
    absent = sorted(set(contract.rows) - seen)
    if absent:
        problems.append(f"{len(absent)} anchor(s) of {INDEX} are in no shard, e.g. {', '.join(absent[:5])}")
    return problems
