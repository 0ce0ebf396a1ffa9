"""Atomic outputs: work in `X.partial`, rename to `X` only when complete.

Before anything is written the output is checked against the stage's inputs (an output that is, contains or lies
inside an input is refused: `--force` must never delete the model it reads), and `X.lock` is held for the whole
write, so a second run writing the same output fails at once instead of sharing `X.partial`. A full disk, a
file-size limit or a read-only place while writing removes `X.partial` and becomes one `StorageError` naming `X`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from glmgguf.errors import GlmggufError, storage_errors


class OutputExistsError(GlmggufError, FileExistsError):
    """The output already exists and overwriting was not asked for."""


class OutputConflictError(GlmggufError, ValueError):
    """The output overlaps an input, or another run is writing it."""


PathLike = str | os.PathLike


def check_output(target: PathLike, force: bool = False, inputs: Iterable[PathLike] = ()) -> None:
    """Refuse an output that exists (unless `force`), that is, contains or lies inside one of `inputs`, or whose
    folder cannot be written (created when missing): before any work, not after it."""
    out = Path(target).resolve()
    for item in inputs:
        src = Path(item).resolve()
        how = ("is" if out == src else "contains" if src.is_relative_to(out)
               else "lies inside" if out.is_relative_to(src) else None)
        if how:
            raise OutputConflictError(f"output {target} {how} the input {item}: choose an output path outside it")
    if Path(target).exists() and not force:
        raise OutputExistsError(f"{target} already exists (use --force to overwrite)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputConflictError(f"cannot create the folder of {target}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputConflictError(f"cannot write {target}: {parent} is not writable")


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold `target.lock` (non-blocking) while `target` is written; a concurrent writer gets a clear error."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    lock = target.with_name(target.name + ".lock")
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputConflictError(f"another run is writing {target} (it holds {lock})") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_file(path: PathLike, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield `path.partial`; on success rename it to `path`, on failure remove it (see the module docstring)."""
    target = Path(path)
    check_output(target, force, inputs)
    partial = target.with_name(target.name + ".partial")
    with storage_errors(target), output_lock(target):
        partial.unlink(missing_ok=True)
        try:
            yield partial
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


@contextmanager
def atomic_dir(path: PathLike, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield an empty `path.partial/` directory; on success it replaces `path`, on failure it is removed."""
    target = Path(path)
    check_output(target, force, inputs)
    partial = target.with_name(target.name + ".partial")
    with storage_errors(target), output_lock(target):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            yield partial
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
