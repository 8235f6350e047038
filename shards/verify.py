"""`verify`: the manifest and index hold to the contract, every shard opens and matches its manifest entry, every anchor
appears exactly once with K positives, and every image decodes.

The manifest goes through `read_manifest` and each sample through `Contract.problems`, the checks the training stream
makes, so verify and training agree on every directory; verify adds only what training does lazily (decoding every
positive, not just the drawn one) and what is beside the run (stray files). Returns every problem found (not just the
first), each naming the shard or sample and what to do.
"""
from __future__ import annotations

from pathlib import Path

from clsp.shards.manifest import INDEX, MANIFEST, Contract, ManifestError, read_manifest
from clsp.shards.manifest_writer import pending_indexes
from clsp.shards.reader import RawSample, ShardError, iter_shard
from clsp.shards.schema import SchemaError
from clsp.shards.writer import SHARD_PATTERN, temp_files


def _sample_problems(sample: RawSample, contract: Contract) -> list[str]:
    problems = contract.problems(sample)
    if not problems:  # headers are sound: decode every image, as training will over the epochs
        try:
            sample.anchor(), [sample.positive(j) for j in range(contract.k)]
        except SchemaError as error:
            problems.append(str(error))
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
        contract = read_manifest(str(directory)).contract()
    except ManifestError as error:
        return problems + [f"manifest: {problem}" for problem in error.problems]
    except ShardError as error:
        return problems + [f"manifest: {error}"]
    on_disk = sorted(p.name for p in directory.iterdir() if SHARD_PATTERN.fullmatch(p.name))
    problems += [f"{name}: listed in {MANIFEST} but missing" for name in contract.entries if name not in on_disk]
    problems += [f"{name}: on disk but not in {MANIFEST} (from another run?)" for name in on_disk
                 if name not in contract.entries]
    seen: set[str] = set()
    for name in [name for name in on_disk if name in contract.entries]:
        try:
            for sample in iter_shard(str(directory / name), contract.entries[name]):
                seen.add(sample.key)
                problems += _sample_problems(sample, contract)
        except ShardError as error:
            problems.append(str(error))
    absent = sorted(set(contract.rows) - seen)
    if absent:
        problems.append(f"{len(absent)} anchor(s) of {INDEX} are in no shard, e.g. {', '.join(absent[:5])}")
    return problems
