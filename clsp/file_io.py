"""File writes and loads that every stage shares.

`write_atomic` is the project's one atomic file write, re-exported from shards.atomic (shards/ imports nothing of the
project, so the one implementation lives there), and `write_json` writes through it; `partial_removed` cleans up a
checkpoint or shard that could not be finished, and `refused_if_not_ours` turns a file that does not load (not ours,
or damaged) into a clear error; `remove_cut_writes` removes the temp files of a write that a kill cut short.
"""
from __future__ import annotations

import glob
import io
import json
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

from clsp.errors import NO_ROOM, UserError, error_number, os_problem
from clsp.file_checks import left_by_a_killed_writer, read_regular
from clsp.shards.atomic import write_atomic  # noqa: F401  (re-exported)


@contextmanager
def partial_removed(temp: Path, doing: str, then: str = ""):
    """Writing `temp` (a file or folder that a later rename makes visible): any failure removes it, and a lack of room
    (a full disk, a file-size limit) becomes a UserError: 'WHAT (PATH) DOING: FIX THEN'."""
    try:
        yield
    except BaseException as error:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        if isinstance(error, Exception) and error_number(error) in NO_ROOM:  # also safetensors' "(os error 28)"
            raise UserError(f"{os_problem(error, doing)}{then}") from None
        raise


def remove_cut_writes(path: Path) -> None:
    """Remove the temp files of `path` (.NAME.tmp-PID) whose writers a kill stopped; call before writing `path` again
    where no claimed run folder's own sweep (clsp.run_dir) covers it. This process's own are left: another of its
    threads may be writing one."""
    for temp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if left_by_a_killed_writer(temp, this_process_too=False):
            temp.unlink(missing_ok=True)


@contextmanager
def refused_if_not_ours(path: Path, fix: str):
    """Loading `path` with safetensors or torch.load(weights_only=True), which run nothing: a file that is not ours or
    is damaged becomes a UserError naming it and `fix`, not a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError, EOFError,
            FileNotFoundError) as error:  # FileNotFoundError: a checkpoint that lost a file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"{path} cannot be loaded ({reason}): it was not written by clsp or is damaged; "
                        f"{fix}") from None


def torch_save(obj, path: str | Path) -> None:
    """torch.save(obj, path), with the bytes written by Python: torch's own file writer reports a full disk or a
    file-size limit as a RuntimeError without an errno ("unexpected pos ..."), which partial_removed cannot word."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def write_json(path: str | Path, data: dict) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


MAX_JSON_BYTES = 64 << 20  # a record, position or result JSON of ours takes far less


def read_json(path: str | Path) -> dict:
    """A JSON file of ours: a regular file of at most MAX_JSON_BYTES (NotARegularFile, a ValueError, otherwise)."""
    return json.loads(read_regular(path, MAX_JSON_BYTES))
