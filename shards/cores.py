"""The cores this process may run on. It lives here because shards/ imports nothing else of the project and indexes
the manifest on them; every other stage imports it through clsp.accelerator."""
from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
