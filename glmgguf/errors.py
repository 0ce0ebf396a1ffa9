"""The toolkit's one error hierarchy: every expected failure is a `GlmggufError`.

Bad input, a missing or inconsistent file, an output that would overwrite an input, a tool that fails: each stage
raises a subclass of `GlmggufError` (most also subclass `ValueError` or `RuntimeError`, as before), and the
command line turns any of them into one `Error:` line with exit status 1 (`glmgguf.cli` catches them once, for
every command). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import click


class GlmggufError(Exception):
    """An expected failure, reported to the user as one line."""


# built-in errors that mean the user named something that is not there
USER_OS_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError,)


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise the toolkit's errors (and a missing file) as click errors: one line, exit status 1."""
    try:
        yield
    except (GlmggufError, *USER_OS_ERRORS) as e:
        raise click.ClickException(str(e)) from None


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
