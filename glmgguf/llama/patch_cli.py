"""`glmgguf patch apply|check|revert`: the llama.cpp patch series on a source tree (wraps patches/apply.py)."""

from __future__ import annotations

from pathlib import Path

import click

from glmgguf.llama.patches import SERIES, apply_module

_tree = click.option("--llama-cpp", "tree", required=True,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="The llama.cpp source tree (a git checkout or a plain source tree).")
_series = click.option("--series", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=SERIES,
                       show_default=True, help="Series file listing the patches in order.")
_dry_run = click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")


def _run(action: str, tree: Path, series: Path, dry_run: bool = False) -> None:
    rc = apply_module().run(action, tree.resolve(), series.resolve(), dry_run)
    if rc != 0:
        raise SystemExit(rc)


@click.group()
def patch() -> None:
    """Apply, check or revert the llama.cpp patch series (per-layer expert counts, GLM-DSA fixes).

    All patches or none: a tree that matches neither the expected upstream version nor an already patched
    state is refused and left untouched. Applying an applied series (or reverting a clean tree) is a no-op.
    """


@patch.command()
@_tree
@_series
@_dry_run
def apply(tree: Path, series: Path, dry_run: bool) -> None:
    """Apply the series to the tree (the patches not applied yet)."""
    _run("apply", tree, series, dry_run)


@patch.command()
@_tree
@_series
def check(tree: Path, series: Path) -> None:
    """Report which patches the tree holds; exit 1 if the series does not fit it."""
    _run("check", tree, series)


@patch.command()
@_tree
@_series
@_dry_run
def revert(tree: Path, series: Path, dry_run: bool) -> None:
    """Take the applied patches out of the tree again."""
    _run("revert", tree, series, dry_run)
