"""`glmgguf llama ...`: build and locate the pinned llama.cpp tools."""

from __future__ import annotations

from pathlib import Path

import click

from glmgguf.llama.build import TOOLS, Toolchain, ensure_toolchain, find_toolchain

_source = click.option("--source", type=click.Path(path_type=Path),
                       help="Your own llama.cpp tree (default: the pinned llama-cpp-python sdist).")
_patches = click.option("--patches", is_flag=True, help="Apply patches/llama.cpp/series to a copy first.")
_backend = click.option("--backend", type=click.Choice(["cpu", "cuda", "metal"]), default="cpu",
                        show_default=True)


def _show(tc: Toolchain) -> None:
    click.echo(f"bin dir:   {tc.bin_dir}")
    click.echo(f"lib dir:   {tc.lib_dir}")
    click.echo(f"source:    {tc.source_dir}")
    click.echo(f"binding:   {tc.python_package_dir or '-'}")
    click.echo(f"patches:   {', '.join(tc.patched) or '-'}")
    for name in TOOLS:
        path = tc.bin_dir / name
        click.echo(f"  {name:18s} {path if path.is_file() else '(not built)'}")


@click.group()
def llama() -> None:
    """Build and locate the pinned llama.cpp toolchain."""


@llama.command()
@_source
@_patches
@_backend
def build(source: Path | None, patches: bool, backend: str) -> None:
    """Fetch and build llama.cpp (cached: a finished build is reused)."""
    _show(ensure_toolchain(source, patches=patches, backend=backend))


@llama.command()
@_source
@_patches
@_backend
def where(source: Path | None, patches: bool, backend: str) -> None:
    """Print the paths of an existing build (never builds)."""
    tc = find_toolchain(source, patches=patches, backend=backend)
    if tc is None:
        raise click.ClickException("no llama.cpp build for these options yet; run `glmgguf llama build`")
    _show(tc)
