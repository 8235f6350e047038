"""Evaluation: embeddings once, then kNN, linear probe, audits of the synthetic positives, plots and the report.

This file holds only the results-file rules shared by the stage: a result is never replaced by one computed from other
inputs; a rerun on the same inputs replaces its own earlier result.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import clsp.shards  # noqa: F401  (loads pyarrow before torch; see shards/__init__.py)
from clsp.file_checks import left_by_a_killed_writer, read_regular
from clsp.file_io import MAX_JSON_BYTES, write_atomic


def write_new(path: str | Path, content: str | bytes) -> Path:
    """Write a result file without ever replacing a different earlier one (`write_new_set` of one file)."""
    return write_new_set({path: content})[0]


def write_new_set(files: dict[str | Path, str | bytes], named: bool = False) -> list[Path]:
    """Write files that belong together (sweep.json, .csv, .md, .png) under one number, never replacing a different
    earlier result; returns the paths written, in order. `named`: the set is read only through a result that names
    its files (not as the newest of its series), so any earlier number whose files all hold these bytes is used as it
    is: A, B, A again writes no third copy of A's files.

    The set's newest number n is the highest of any of its files (1: the bare names, then `stem-2.ext`, ...). If every
    file of the set at n holds these bytes, nothing is written; if those there do and some are missing (a write a kill
    cut short), the missing ones are added at n; otherwise the whole set goes to n + 1, with a note on stderr. So
    `stem-N.*` always come from one computation, and `latest` finds each of them. Each file is created exclusively,
    so two evaluations writing into one folder at once never replace each other's result: the later one moves on.
    Temp files of the set's series that a killed write left are removed first."""
    data = {Path(path): content.encode() if isinstance(content, str) else content for path, content in files.items()}
    for path in data:
        path.parent.mkdir(parents=True, exist_ok=True)
        for temp in _cut_writes(path):
            temp.unlink(missing_ok=True)
    while True:  # again only when another process claimed the number first
        found = {path: latest(path) for path in data}
        newest = max((_number(path, found[path]) for path in data if found[path] is not None), default=0)
        same = [n for n in range(1, newest + 1) if named and all(_holds(_numbered(path, n), content)
                                                                  for path, content in data.items())]
        if same:
            return [_numbered(path, same[-1]) for path in data]
        at = {path: _numbered(path, max(newest, 1)) for path in data}
        if newest and all(not at[path].exists() or _holds(at[path], content) for path, content in data.items()):
            missing, moved = [path for path in data if not at[path].exists()], False
        else:
            at = {path: _numbered(path, newest + 1) for path in data}
            missing, moved = list(data), newest > 0
        if all(_claimed(at[path], data[path]) for path in missing):
            break
    if moved:
        print(f"note: {', '.join(str(p) for p in data)} hold{'s' * (len(data) == 1)} an earlier, different result; "
              f"wrote {', '.join(at[p].name for p in data)} instead", file=sys.stderr)
    return [at[path] for path in data]


def _claimed(path: Path, content: bytes) -> bool:
    """Write `path` unless it exists (created by a concurrent writer meanwhile): True if it now holds `content`."""
    try:
        write_atomic(path, content, exclusive=True)
    except FileExistsError:
        return _holds(path, content)
    return True


def _holds(path: Path, content: bytes) -> bool:
    """Whether `path` is a regular file holding exactly `content` (a FIFO or a device a stranger left is not read)."""
    try:
        return read_regular(path, len(content)) == content
    except (OSError, ValueError):
        return False


def _cut_writes(path: Path, this_process_too: bool = True) -> list[Path]:
    """Temp files of `path`'s series (.stem-N.ext.tmp-PID) that a killed write left behind (left_by_a_killed_writer)."""
    name = re.compile(re.escape(f".{path.stem}") + r"(-\d+)?" + re.escape(path.suffix) + r"\.tmp-\d+")
    return [p for p in path.parent.glob(".*.tmp-*")
            if name.fullmatch(p.name) and left_by_a_killed_writer(p, this_process_too)]


def _number(path: Path, found: Path) -> int:
    """1 for `path` itself, N for its `stem-N.ext` (`found`: a file of its series)."""
    return 1 if found == path else int(found.stem[len(path.stem) + 1:])


def _numbered(path: Path, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")


WRITTEN = "written"  # in every JSON result: the order its series was written in (1, 2, ...), the highest last


def write_result(path: str | Path, result: dict, outputs: set[str] | tuple[str, ...]) -> Path:
    """Write a JSON result: over the file of its series (`path`, `stem-2.json`, ...) computed from the same inputs
    (every key but `outputs` is equal: the same weights, data, options), since a rerun of the same evaluation replaces
    its own result; otherwise as `write_new` does (a new `stem-N.json` beside results of other inputs). Every file of
    the series is compared, not only the newest: A, B, A again replaces A's file.

    Each result records `written`, one more than the series' highest (kept by a rerun of the result already written
    last, so its bytes stay those of the first run): after A, B, A again, A's file is the last written by its content,
    in any copy of the folder; file times would not say so (cp -r, rsync and git write them anew)."""
    inputs = lambda r: {k: v for k, v in r.items() if k not in {*outputs, WRITTEN}}  # noqa: E731
    for temp in _cut_writes(Path(path), this_process_too=False):  # the in-place rewrite below would not remove them
        temp.unlink(missing_ok=True)
    mine = inputs(json.loads(json.dumps(result)))  # as read back (tuples -> lists)
    found = readable_results(series(path))  # a file that holds no JSON object is a stranger's: never written over
    last = max((written_order(content) for _, content in found), default=0)
    for earlier, content in found:
        if inputs(content) == mine:
            alone_last = written_order(content) == last > 0 and sum(written_order(c) == last for _, c in found) == 1
            order = last if alone_last else last + 1  # a tie (two writers at once) is broken by a rerun
            write_atomic(earlier, json.dumps({**result, WRITTEN: order}, indent=1) + "\n")
            return earlier
    return write_new(path, json.dumps({**result, WRITTEN: last + 1}, indent=1) + "\n")


def readable_results(files: list[Path]) -> list[tuple[Path, dict]]:
    """(file, result) of each file that holds a JSON object, in the order given; the others are not results of ours."""
    found = []
    for path in files:
        try:
            result = json.loads(read_regular(path, MAX_JSON_BYTES))  # a FIFO or a device there is not read
        except (OSError, ValueError):
            continue
        if isinstance(result, dict):
            found.append((path, result))
    return found


def written_order(result: dict) -> int:
    """A result's `written` (see write_result); 0 for results from before clsp recorded it."""
    order = result.get(WRITTEN)
    return order if isinstance(order, int) and not isinstance(order, bool) else 0


def series(path: str | Path) -> list[Path]:
    """The files `path`, `stem-2.ext`, `stem-3.ext`, ... that exist, in number order."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(path.stem) + r"-(\d+)" + re.escape(path.suffix) + r"$")
    numbered = sorted((int(m.group(1)), p) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name)))
    return [path] * path.exists() + [p for _, p in numbered]


def latest(path: str | Path) -> Path | None:
    """The newest of `path`, `stem-2.ext`, `stem-3.ext`, ... (highest number), or None when none exists."""
    found = series(path)
    return found[-1] if found else None
