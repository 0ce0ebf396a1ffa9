"""One inter-process file lock for every cache the toolkit fills (toolchain builds, downloads, testbed copies)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created with its folder); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: callers must not race
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cache_entry_lock(entry: Path) -> contextlib.AbstractContextManager[None]:
    """Wait for, then hold, the right to fill cache entry `entry`: `entry.fill-lock`. (`entry.lock` is the
    non-blocking lock an atomic output holds while it is written; one process taking both must not collide.)"""
    return file_lock(entry.with_name(entry.name + ".fill-lock"))
