"""Turn the toolkit's expected failures into one clear CLI error line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from glmgguf.eval.probes import EvalError
from glmgguf.io import CheckpointError
from glmgguf.io.atomic import OutputExistsError
from glmgguf.layout import LayoutError
from glmgguf.reap.errors import ReapError
from glmgguf.runner import RunnerError

USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, LayoutError, OutputExistsError, FileNotFoundError,
                                            ReapError, RunnerError, EvalError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise known input errors as click errors (one line, exit status 1)."""
    try:
        yield
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
