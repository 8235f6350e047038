"""Progress bars in a log: where stderr is no terminal (a log file, a pipe, a scheduler's output) a bar draws a frame
every 30 s rather than up to ten a second, so a long run's log stays small (a 48,800-step run wrote megabytes of
frames on one line). tqdm reads its defaults from the environment when it is imported, so these are set before."""
from __future__ import annotations

import os
import sys

INTERVALS = {"TQDM_MININTERVAL": "30", "TQDM_MAXINTERVAL": "60"}  # seconds; a user's own values stand


def bars_for_a_log() -> None:
    """Bars of this process (if tqdm is not imported yet) and of the processes it starts draw at the log's pace."""
    for name, value in INTERVALS.items():
        os.environ.setdefault(name, value)


def bars_for_stderr() -> None:
    """bars_for_a_log() where this process's stderr is no terminal (also where it is closed: `2>&-`)."""
    if sys.stderr is None or not sys.stderr.isatty():
        bars_for_a_log()
