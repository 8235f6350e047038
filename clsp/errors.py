"""The one error type a user sees: what is wrong and how to fix it. The CLI prints it without a traceback (exit 2).

OS_PROBLEMS words the operating-system failures a user can fix (a full disk, a read-only or foreign path); the CLI
turns any of them into one `error:` line, and stages that must clean up first (a half-written shard or checkpoint)
raise a UserError with the same words.
"""
from __future__ import annotations

import errno
import re


class UserError(ValueError):
    """Bad input or a refused operation, worded for the person at the command line: the problem and the fix.

    Libraries signal bad input with ValueError (config dataclasses validate in ``__post_init__``); a UserError is such
    a ValueError, so a Python caller catches both with ``except ValueError``. Only the CLI prints them, as one
    ``error:`` line (clsp/cli.py); stage commands turn the ValueErrors of their configs into UserErrors."""


class StoppedBySignal(UserError):
    """A run that SIGTERM or Ctrl-C stopped after it saved a checkpoint; the message says how to go on (a caller that
    ran it, such as the study, may say it in its own terms); `by` names the signal ("SIGTERM", "Ctrl-C")."""

    def __init__(self, message: str, by: str) -> None:
        super().__init__(message)
        self.by = by

    def __reduce__(self):  # a study's pool process sends it back pickled: both arguments, not only the message
        return type(self), (str(self), self.by)


_AGAIN = "then run the same command again"
OS_PROBLEMS = {  # errno -> (what happened, the fix)
    errno.ENOSPC: ("the disk is full", f"free some space, {_AGAIN}"),
    errno.EDQUOT: ("the disk quota is used up", f"free some space, {_AGAIN}"),
    errno.EFBIG: ("a file grew past the file-size limit (`ulimit -f`, or the file system's largest file)",
                  f"raise the limit or write to another file system, {_AGAIN}"),
    errno.EROFS: ("the file system is read-only", "choose a writable place"),
    errno.EACCES: ("permission denied", "choose a path you may use, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may use, or change its permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "fix the path"),
    errno.EISDIR: ("a directory is where a file should be", "give a file"),
    errno.EEXIST: ("a file is where a directory should be", "fix the path"),
    errno.ENAMETOOLONG: ("the path is too long", "use a shorter path"),
}
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # writing stopped for lack of room
_RUST_IO = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) report an OS failure


def error_number(error: BaseException) -> int | None:
    """The errno of an OSError, or of an I/O error a Rust library (safetensors) wrapped in its own exception."""
    if isinstance(error, OSError):
        return error.errno
    found = _RUST_IO.search(str(error))
    return int(found.group(1)) if found else None


def os_problem(error: BaseException, doing: str = "") -> str | None:
    """'WHAT (PATH) DOING: FIX' for an OS failure a user can fix, or None (anything else may be a bug: keep it loud)."""
    if error_number(error) not in OS_PROBLEMS:
        return None
    what, fix = OS_PROBLEMS[error_number(error)]
    paths = (error.filename, error.filename2) if isinstance(error, OSError) else ()
    where = " and ".join(str(p) for p in paths if p is not None)
    return f"{what}{f' ({where})' if where else ''}{f' {doing}' if doing else ''}: {fix}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` as it may reach a terminal: control characters (escape sequences, a newline or carriage return that
    would forge a line of its own), which a stranger's shard or manifest may carry into a message, shown escaped."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)
