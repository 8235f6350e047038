"""Recognising our own files by name and content: the checks of a stage's `RunKind.owned` rules (clsp/run_dir.py),
so that --overwrite deletes only files that the stage made; bounded reads of regular files only (`read_regular`,
`small_json`), and the check for links to folders in a run folder (`linked_folders`).
"""
from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

SMALL_JSON = 1 << 20  # JSON files read to recognise our own: at most this many bytes


class NotARegularFile(ValueError):
    """A file that `read_regular` refused unread: not a regular file, or larger than the caller allows."""


def read_regular(path: str | os.PathLike, most: int) -> bytes:
    """The bytes of `path` when it is a regular file (a link to one is followed) of at most `most` bytes; else
    NotARegularFile before any byte is read: a FIFO a stranger's folder holds would be waited on forever, a link to
    /dev/zero read until memory runs out. OSError as open() raises it (FileNotFoundError, PermissionError)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO's open would wait for a writer
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path} is not a regular file (a device, a FIFO or a directory, or a link to one): "
                                  f"it was not read")
        if info.st_size > most:
            raise NotARegularFile(f"{path} is larger than {most} bytes, more than such a file of clsp's takes: it was "
                                  f"not read")
        data = handle.read(most + 1)
    if len(data) > most:  # grew since the fstat
        raise NotARegularFile(f"{path} is larger than {most} bytes: it was not read")
    return data


def small_json(path: Path):
    """The JSON in `path` when it is a file of at most SMALL_JSON bytes that parses, else None."""
    try:
        return json.loads(read_regular(path, SMALL_JSON))
    except (OSError, ValueError):  # missing, not a regular file, too large, not JSON (UnicodeDecodeError included)
        return None


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def json_with(*keys: str, **values) -> Callable[[Path], bool]:
    """Content check: a small JSON object holding these keys (and these values)."""
    def check(path: Path) -> bool:
        data = small_json(path)
        return (isinstance(data, dict) and all(k in data for k in keys)
                and all(data.get(k) == v for k, v in values.items()))
    return check


def starts_with(prefix: bytes) -> Callable[[Path], bool]:
    """Content check: the file's first bytes (a magic number, a CSV header line)."""
    return lambda path: _head(path, len(prefix)) == prefix


def contains(marker: bytes, within: int) -> Callable[[Path], bool]:
    """Content check: `marker` among the file's first `within` bytes (e.g. the version record of an event file)."""
    return lambda path: marker in _head(path, within)


def is_safetensors(path: Path) -> bool:
    """Content check: an 8-byte little-endian header length, then a JSON header (the safetensors layout)."""
    head = _head(path, 9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


IS_PNG = starts_with(b"\x89PNG\r\n\x1a\n")
IS_TORCH_SAVE = starts_with(b"PK\x03\x04")  # torch.save writes a zip archive


def is_temp_of(name: str) -> Callable[[Path], bool]:
    """Name check for a `write_atomic` temp file of `name` that a killed writer left: .NAME.tmp-PID."""
    return lambda path: path.name.startswith(f".{name}.tmp-") and path.name.rsplit("-", 1)[1].isdigit()


def is_atomic_temp(path: Path) -> bool:
    """Name check for any `write_atomic` temp file (.NAME.tmp-PID); whose it is, a stage's owned rules say."""
    return re.fullmatch(r"\..+\.tmp-[0-9]+", path.name) is not None


def left_by_a_killed_writer(path: Path, this_process_too: bool = True) -> bool:
    """Whether `path` is a `write_atomic` temp file whose writer no longer runs on this machine, so a kill cut its
    write short. This process counts as gone where it asks while starting, before it writes anything; asked later
    (`this_process_too=False`), its own are left: another of its threads may be writing one."""
    if not is_atomic_temp(path):
        return False
    pid = int(path.name.rsplit("-", 1)[1])
    if pid == os.getpid():
        return this_process_too
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a pid no process can have
        return True
    except PermissionError:  # another user's process
        return False
    return False


def linked_folders(out: Path) -> list[Path]:
    """Links to folders anywhere under `out`, found without following any: through one, a stage's writes and
    --overwrite's deletions would land in another folder (a stranger's run whose checkpoint/ leads to one of yours)."""
    found = []
    for folder, subfolders, _ in os.walk(out):  # followlinks=False: a link to a folder is listed, never entered
        found += [Path(folder) / name for name in subfolders if os.path.islink(os.path.join(folder, name))]
    return sorted(found)


def _through_a_link(out: Path, path: Path) -> bool:
    """Whether a folder between `out` and `path` is a link (glob follows links to folders)."""
    return any(folder.is_symlink() for folder in path.parents if out in folder.parents)


def owned_files(out: Path, rules: dict[str, Callable[[Path], bool]]) -> list[Path]:
    """Files under `out` that match a rule's glob pattern and pass its content check; never one reached through a link
    to a folder, which lies outside `out`."""
    return sorted({p for pattern, check in rules.items() for p in out.glob(pattern)
                   if not _through_a_link(out, p) and p.is_file() and check(p)})
