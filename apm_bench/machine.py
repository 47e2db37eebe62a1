"""What this machine lends a run: the cores this process may use (a container's or a `taskset`'s
share, not the host's count), which sizes thread pools and parallel runs."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
