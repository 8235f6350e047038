"""The project's one atomic file write. It lives here because shards/ imports nothing else of the project, and every
other stage imports it through clsp.file_io."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str | Callable[[Path], object], temp_name: str | None = None) -> Path:
    """Write `data` to `path`: a reader sees the old file or the new one, never half of one, and a failure (a full
    disk) leaves neither a temp file nor a changed `path` behind. `data` may be a function that writes the file at the
    path it is given (a library's own saver, e.g. safetensors' save_model). The temp file is `temp_name` beside `path`
    (default .NAME.tmp-PID, the name the stages recognise as a killed writer's leftover)."""
    path = Path(path)
    temp = path.with_name(temp_name or f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(temp)
        else:
            temp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())  # on disk before the rename makes it visible
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power loss
    return path


def fsync_dir(directory: Path) -> None:
    """Make the names in `directory` (a rename into it) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
