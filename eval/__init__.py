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
from clsp.file_io import write_atomic


def write_new(path: str | Path, content: str | bytes) -> Path:
    """Write a result file without ever replacing a different earlier one.

    If `path` is free it is written (atomically); if the newest of the series holds the same bytes it is left as is;
    otherwise it goes to the next free `stem-2.ext`, `stem-3.ext`, ... with a note on stderr. Returns the path written.
    """
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    newest = latest(path)
    if newest is not None and newest.read_bytes() == data:
        return newest  # same result as the newest one: nothing to write
    if newest is None:
        candidate = path
    else:  # one past the newest number, so `latest` finds this file
        n = int(newest.stem.rsplit("-", 1)[1]) + 1 if newest != path else 2
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    write_atomic(candidate, data)
    if candidate != path:
        print(f"note: {path} holds an earlier, different result; wrote {candidate} instead", file=sys.stderr)
    return candidate


def write_result(path: str | Path, result: dict, outputs: set[str] | tuple[str, ...]) -> Path:
    """Write a JSON result: over the file of its series (`path`, `stem-2.json`, ...) computed from the same inputs
    (every key but `outputs` is equal: the same weights, data, options), since a rerun of the same evaluation replaces
    its own result; otherwise as `write_new` does (a new `stem-N.json` beside results of other inputs). Every file of
    the series is compared, not only the newest: A, B, A again replaces A's file."""
    text = json.dumps(result, indent=1) + "\n"
    inputs = lambda r: {k: v for k, v in r.items() if k not in outputs}  # noqa: E731
    mine = inputs(json.loads(text))  # as read back (tuples -> lists)
    for earlier in series(path):
        try:
            found = json.loads(earlier.read_text())
        except (OSError, ValueError):
            continue  # not a result of ours: never written over
        if isinstance(found, dict) and inputs(found) == mine:
            write_atomic(earlier, text)
            return earlier
    return write_new(path, text)


def series(path: str | Path) -> list[Path]:
    """The files `path`, `stem-2.ext`, `stem-3.ext`, ... that exist, in number order."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(path.stem) + r"-(\d+)" + re.escape(path.suffix) + r"$")
    numbered = sorted((int(m.group(1)), p) for p in path.parent.iterdir() if (m := pattern.match(p.name)))
    return [path] * path.exists() + [p for _, p in numbered]


def latest(path: str | Path) -> Path | None:
    """The newest of `path`, `stem-2.ext`, `stem-3.ext`, ... (highest number), or None when none exists."""
    found = series(path)
    return found[-1] if found else None
