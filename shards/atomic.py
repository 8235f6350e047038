"""The project's one atomic file write. It lives here because shards/ imports nothing else of the project, and every
other stage imports it through clsp.file_io."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str | Callable[[Path], object], temp_name: str | None = None,
                 exclusive: bool = False) -> Path:
    """Write `data` to `path`: a reader sees the old file or the new one, never half of one, and a failure (a full
    disk) leaves neither a temp file nor a changed `path` behind. `data` may be a function that writes the file at the
    path it is given (a library's own saver, e.g. safetensors' save_model). The temp file is `temp_name` beside `path`
    (default .NAME.tmp-PID, the name the stages recognise as a killed writer's leftover). `exclusive`: never replace
    an existing `path`, also one another process creates meanwhile (FileExistsError), for claiming a name."""
    path = Path(path)
    temp = path.with_name(temp_name or f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(temp)
        else:
            temp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())  # on disk before the rename makes it visible
        _publish_exclusively(temp, path) if exclusive else os.replace(temp, path)
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


def _publish_exclusively(temp: Path, path: Path) -> None:
    """Give the written `temp` the name `path` unless that name exists (FileExistsError), atomically: a hard link fails
    on an existing name where a rename would replace it. A file system without hard links gets the name claimed by an
    exclusive create first, so a reader may briefly see it empty there."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(temp, path)
    else:
        temp.unlink()
