"""How many CPU threads a stage uses."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity API on this platform
        return os.cpu_count() or 1


def free_cores() -> int:
    """`$GLMGGUF_THREADS`, else the usable cores minus those other processes keep busy (1-minute load average).

    On a shared CPU, torch with more threads than free cores is several times slower than with fewer: the threads
    wait on each other at every op.
    """
    env = os.environ.get("GLMGGUF_THREADS")
    if env:
        return max(1, int(env))
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))
