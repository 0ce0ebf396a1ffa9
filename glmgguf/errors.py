"""The toolkit's one error hierarchy: every expected failure is a `GlmggufError`.

Bad input, a missing or inconsistent file, an output that would overwrite an input, a tool that fails: each stage
raises a subclass of `GlmggufError` (most also subclass `ValueError` or `RuntimeError`, as before), and the
command line turns any of them into one `Error:` line with exit status 1 (`glmgguf.cli` catches them once, for
every command). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click


class GlmggufError(Exception):
    """An expected failure, reported to the user as one line."""


class StorageError(GlmggufError, OSError):
    """An output could not be written: a full disk or quota, a file-size limit, a read-only or forbidden place."""


# built-in errors that mean the user named something that is not there
USER_OS_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError,)

STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit, `ulimit -f`, or the filesystem's maximum)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

# Rust I/O errors (safetensors) carry the errno only in their message
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def storage_error(e: BaseException, path: str | os.PathLike | None = None) -> StorageError | None:
    """`e` as a `StorageError` naming `path` (else the file the error names) when it is a storage failure (full
    disk, quota, size limit, read-only, forbidden: from Python or from a Rust extension), else None."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := _RUST_OS_ERROR.search(str(e))):
        code = int(m.group(1))
    if code not in STORAGE_ERRNOS or isinstance(e, StorageError):
        return None
    if path is not None:
        return StorageError(f"cannot write {path}: {STORAGE_ERRNOS[code]}")
    return StorageError(f"{getattr(e, 'filename', None) or 'a file'}: {STORAGE_ERRNOS[code]}")


@contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a storage failure while `path` is written into a `StorageError` naming it (see `storage_error`)."""
    try:
        yield
    except Exception as e:
        if (err := storage_error(e, path)) is None:
            raise
        raise err from e


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise the toolkit's errors, a missing file and a storage failure as click errors: one line, exit
    status 1."""
    try:
        yield
    except (GlmggufError, *USER_OS_ERRORS) as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:
        if (err := storage_error(e)) is None:
            raise
        raise click.ClickException(str(err)) from None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise SystemExit(128 + signum)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the body runs, SIGTERM (sent by `timeout`, schedulers, `docker stop`) unwinds the stack like Ctrl-C,
    so every output's `finally` removes its `X.partial`; the exit status is 143. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CliWarnings(logging.Handler):
    """Print the toolkit's log records on the command line (stderr, written at emit time so progress bars and
    captured output see them): progress notes (INFO) as they are, warnings as `warning: ...` lines. Library code
    only calls `logging`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        tqdm.write(text, file=click.get_text_stream("stderr"))


def install_cli_warnings() -> None:
    """Route the `glmgguf` loggers' progress notes and warnings to the command line (once per process)."""
    logger = logging.getLogger("glmgguf")
    if not any(isinstance(h, CliWarnings) for h in logger.handlers):
        logger.addHandler(CliWarnings())
        logger.setLevel(logging.INFO)
        logger.propagate = False
