"""The checks of a manifest that every reader (read_manifest) and the writer (write_manifest) run: the fields of
manifest.json, their types and bounds, and the columns and rows of index.parquet. Each returns a list of problems, each
naming what is wrong."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from clsp.shards.codecs import CODECS, DEFAULT_CODEC, MAX_IMAGE_SIDE
from clsp.shards.schema import CODEC_VERSIONS, ID_PATTERN, MAX_K, NOISE_KINDS, SCORES
from clsp.shards.writer import SHARD_PATTERN

MANIFEST, INDEX = "manifest.json", "index.parquet"
INDEX_SCHEMA = pa.schema([("anchor_id", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
                          ("sha256", pa.string())])


SCORE_TYPE = pa.list_(pa.float32())  # K scores per anchor, each in 0..1


def looks_like_index(path) -> bool:
    """A Parquet file whose columns begin as an index's do: how `--overwrite` tells our index.parquet from another
    Parquet file of the same name. Reads the footer only."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():  # a FIFO's read would wait forever, a device's go on forever
        return False
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError):
        return False
    return len(schema) >= len(INDEX_SCHEMA) and all(schema.field(i).equals(field)
                                                     for i, field in enumerate(INDEX_SCHEMA))


HEX64 = re.compile(r"^[0-9a-f]{64}$")


# (key, type[, lowest, highest]) of each record of manifest.json; int means a true integer (not a bool)
TOP_SPEC = [("count", int, 0, None), ("run", dict), ("shards", list), ("index", dict)]


RUN_SPEC = [("source", dict), ("generator", dict), ("sampler", dict), ("k", int, 1, MAX_K), ("seed", int),
            ("image_size", int, 1, MAX_IMAGE_SIDE), ("anchors_per_shard", int, 1, None), ("package_version", str)]


SOURCE_SPEC = [("num_classes", int, 1, None)]  # optional: written when the source names its classes


NUMBER = (int, float)  # a JSON number (not a bool)
SAMPLER_SPEC = [("w", NUMBER, 0, 1), ("steps", int, 1, None), ("eta", NUMBER, 0, 1)]  # what every clsp wrote
SAMPLER_OPTIONAL = [("noise", str), ("share_anchor_noise", bool)]  # absent in manifests older than each


SHARD_SPEC = [("name", str), ("sha256", str), ("count", int, 0, None), ("bytes", int, 0, None)]


INDEX_SPEC = [("name", str), ("sha256", str)]


RUN_FIELDS = tuple(field[0] for field in RUN_SPEC)


_KINDS = {int: "an integer", str: "text", dict: "an object", list: "a list", NUMBER: "a number",
          bool: "true or false"}


def score_column(metric: str) -> str:
    """The index column of a per-positive score (shards.schema.SCORES)."""
    if metric not in SCORES:
        raise ValueError(f"unknown score {metric!r}: the shards hold {' and '.join(SCORES)}")
    return f"positive_{metric}"


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
        elif not isinstance(value, kind) or (kind in (int, NUMBER) and isinstance(value, bool)):
            problems.append(f"{where}{key} is {_show(value)}, expected {_KINDS[kind]}")
        elif bounds and not (value >= bounds[0] and (bounds[1] is None or value <= bounds[1])):
            limit = f"{bounds[0]}..{bounds[1]}" if bounds[1] is not None else f"at least {bounds[0]}"
            problems.append(f"{where}{key} is {value}, expected {limit}")
    return len(problems) == before


def document_problems(document: dict) -> list[str]:
    """Types, required fields and bounds of manifest.json (format and schema version are checked before)."""
    problems: list[str] = []
    _check_fields(document, TOP_SPEC, "", problems)
    run, index, shards = document.get("run"), document.get("index"), document.get("shards")
    if isinstance(run, dict):
        problems += run_problems(run, document.get("schema_version"))
    if isinstance(index, dict) and _check_fields(index, INDEX_SPEC, "index.", problems):
        if index["name"] != INDEX or not HEX64.fullmatch(index["sha256"]):
            problems.append(f"index must name {INDEX} and give its sha256 (64 hex digits)")
    if isinstance(shards, list):
        problems += [] if shards else ["shards is empty: a manifest lists at least one shard"]
        for i, entry in enumerate(shards):
            where = f"shards[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"{where} is {_show(entry)}, expected an object")
            elif _check_fields(entry, SHARD_SPEC, f"{where}.", problems):
                if not SHARD_PATTERN.fullmatch(entry["name"]):
                    problems.append(f"{where}.name is {_show(entry['name'])}: shard names must look like "
                                    f"shard-000000.tar")
                if not HEX64.fullmatch(entry["sha256"]):
                    problems.append(f"{where}.sha256 is not 64 hex digits")
        names = [entry.get("name") for entry in shards if isinstance(entry, dict)]
        problems += [f"shard {name} is listed twice" for name in sorted({n for n in names if names.count(n) > 1})]
    return problems


def run_problems(run: dict, version) -> list[str]:
    """Types, required fields and bounds of manifest.json's run record (`version`: the manifest's schema version)."""
    problems: list[str] = []
    if _check_fields(run, RUN_SPEC, "run.", problems) and "num_classes" in run["source"]:
        _check_fields(run["source"], SOURCE_SPEC, "run.source.", problems)
    sampler = run.get("sampler")
    if isinstance(sampler, dict):  # what made the positives: a reader (the sweep) samples the same way
        _check_fields(sampler, SAMPLER_SPEC, "run.sampler.", problems)
        _check_fields(sampler, [field for field in SAMPLER_OPTIONAL if field[0] in sampler], "run.sampler.", problems)
        if isinstance(sampler.get("noise"), str) and sampler["noise"] not in NOISE_KINDS:
            problems.append(f"run.sampler.noise is {_show(sampler['noise'])}: a generator of noise this clsp knows is "
                            f"{' or '.join(map(repr, NOISE_KINDS))}")
    if "codec" in run:
        problems += _codec_problems(run["codec"], version)
    return problems


def _codec_problems(codec, version) -> list[str]:
    """run.codec (optional, absent means png) names a codec that the manifest's schema version has: raw needs 3."""
    if not isinstance(codec, str) or codec not in CODECS:
        return [f"run.codec is {_show(codec)}: the image codec must be {' or '.join(map(repr, CODECS))} (absent means "
                f"{DEFAULT_CODEC})"]
    if codec != DEFAULT_CODEC and version < CODEC_VERSIONS[codec]:
        return [f"run.codec is {codec!r} under schema version {version}: {codec} images need schema version "
                f"{CODEC_VERSIONS[codec]} (a clsp that reads version {version} would not know them)"]
    return []


def index_problems(index: pa.Table, document: dict) -> list[str]:
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
