"""Turn the toolkit's expected failures into one clear CLI error line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from glmgguf.eval.probes import EvalError
from glmgguf.io import CheckpointError
from glmgguf.io.atomic import OutputConflictError, OutputExistsError
from glmgguf.layout import LayoutError
from glmgguf.reap.errors import ReapError

USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, LayoutError, OutputExistsError, OutputConflictError,
                                            FileNotFoundError, ReapError, EvalError)


def _user_error_types() -> tuple[type[Exception], ...]:
    """USER_ERRORS, plus the layer runner's when it is loaded (it imports torch; unloaded, it raised nothing)."""
    runner = sys.modules.get("glmgguf.runner")
    return USER_ERRORS + ((runner.RunnerError,) if runner is not None else ())


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise known input errors as click errors (one line, exit status 1)."""
    try:
        yield
    except Exception as e:
        if isinstance(e, _user_error_types()):
            raise click.ClickException(str(e)) from None
        raise
