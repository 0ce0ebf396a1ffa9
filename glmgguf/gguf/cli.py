"""Click commands of the GGUF stage: `convert`, `quantize`, `inspect`, `recipes`, `imatrix slice`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

from glmgguf.gguf.plan import OUTTYPES, IndexerMode, MtpMode

DEFAULT_THREADS = os.cpu_count() or 1


def _split_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int:
    from glmgguf.units import parse_split_size

    if value is None:
        return 0
    try:
        return parse_split_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


_recipe_opt = click.option("--recipe", metavar="NAME|FILE",
                           help="Mixed-quant recipe: a shipped name (see `glmgguf recipes`) or a .toml file.")
_imatrix_opt = click.option("--imatrix", type=click.Path(dir_okay=False, path_type=Path),
                            help="Importance matrix from llama-imatrix (GGUF or legacy .dat).")
_threads_opt = click.option("--threads", "-t", type=click.IntRange(min=1), default=DEFAULT_THREADS,
                            show_default=True, help="Quantization threads.")
_split_opt = click.option("--split-max-size", metavar="SIZE", callback=_split_size,
                          help="Write llama.cpp split GGUFs of at most SIZE each (e.g. 50G; K/M/G/T = 1000^n).")
_force_opt = click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")


def _echo_written(paths: list[Path], n_tensors: int, n_bytes: int, seconds: float, peak: int) -> None:
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more parts)"
    click.echo(f"wrote {where}: {n_tensors} tensors, {n_bytes / 2**20:.1f} MiB in {seconds:.1f} s "
               f"(peak RSS {peak / 2**20:.0f} MiB)")


@click.command("convert")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--outtype", type=click.Choice(sorted(OUTTYPES)), default=None,
              help="Type of the weight matrices (norms, router and indexer.proj stay F32)  [default: bf16]")
@_recipe_opt
@click.option("--mtp", type=click.Choice([m.value for m in MtpMode]), default="keep", show_default=True,
              help="Keep the MTP (NextN) block, drop it, or write only it (draft model).")
@click.option("--indexer", type=click.Choice([m.value for m in IndexerMode]), default="native", show_default=True,
              help="native: indexer tensors on full layers only; duplicate: also copy them into shared layers "
                   "for runtimes that predate shared indexers (newer runtimes ignore the copies).")
@_imatrix_opt
@_threads_opt
@_split_opt
@_force_opt
@click.option("--allow-nonfinite", is_flag=True, help="Warn instead of refusing weights with NaN/Inf.")
def convert_cmd(src: Path, out: Path, outtype: str | None, recipe: str | None, mtp: str, indexer: str,
                imatrix: Path | None, threads: int, split_max_size: int, force: bool, allow_nonfinite: bool) -> None:
    """Convert the GLM-5.x checkpoint SRC into the GGUF file OUT (one streaming pass, also for --recipe)."""
    if outtype and recipe:
        raise click.UsageError("--outtype and --recipe are mutually exclusive")
    from glmgguf.gguf.convert import convert, outtype_chooser

    if recipe:
        from glmgguf.checkpoint import open_checkpoint
        from glmgguf.gguf.recipe import load_recipe

        choose = load_recipe(recipe).chooser(open_checkpoint(src).layout.layers)
    else:
        choose = outtype_chooser(outtype or "bf16")
    imat = None
    if imatrix is not None:
        from glmgguf.gguf.imatrix import load_imatrix

        imat = load_imatrix(imatrix)
    result = convert(src, out, choose, MtpMode(mtp), IndexerMode(indexer), force=force,
                     allow_nonfinite=allow_nonfinite, imatrix=imat, threads=threads,
                     split_max_size=split_max_size)
    _echo_written(result.paths or [result.path], result.n_tensors, result.n_bytes, result.seconds, result.peak_rss)
    if result.requires_patches:
        click.echo(f"note: this GGUF needs llama.cpp with {', '.join(result.requires_patches)} (an unpatched "
                   "llama.cpp refuses it): `glmgguf llama build --patches`, or `glmgguf patch apply --llama-cpp DIR`")


@click.command("quantize")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--recipe", required=True, metavar="NAME|FILE",
              help="Mixed-quant recipe: a shipped name (see `glmgguf recipes`) or a .toml file.")
@_imatrix_opt
@_threads_opt
@_split_opt
@_force_opt
def quantize_cmd(src: Path, out: Path, recipe: str, imatrix: Path | None, threads: int, split_max_size: int,
                 force: bool) -> None:
    """Quantize the glm-dsa GGUF SRC (F32/BF16/F16) into OUT by a recipe, with ggml's own kernels."""
    from glmgguf.gguf.imatrix import load_imatrix
    from glmgguf.gguf.quantize import quantize_gguf
    from glmgguf.gguf.recipe import load_recipe

    rec = load_recipe(recipe)
    imat = load_imatrix(imatrix) if imatrix is not None else None
    result = quantize_gguf(src, out, rec, imatrix=imat, threads=threads, split_max_size=split_max_size,
                           force=force)
    _echo_written(result.paths, result.n_tensors, result.n_bytes, result.seconds, result.peak_rss)


@click.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--diff", "other", type=click.Path(dir_okay=False, path_type=Path),
              help="Compare with another GGUF: tensors whose type differs, KV differences.")
def inspect_cmd(path: Path, other: Path | None) -> None:
    """Per-role table of tensor types, sizes and bits per weight of a GGUF, with its recipe and provenance."""
    from glmgguf.gguf.inspect import diff_summaries, format_diff, format_summary, read_summary

    try:
        summary = read_summary(path)
        if other is None:
            click.echo(format_summary(summary))
        else:
            click.echo(format_diff(diff_summaries(summary, read_summary(other)), str(path), str(other)))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


@click.command("recipes")
@click.argument("name", required=False, metavar="[NAME|FILE]")
@click.option("--llama-quantize-args", "gguf_in", type=click.Path(dir_okay=False, path_type=Path),
              metavar="IN.gguf", help="Print the llama-quantize command line that writes the same tensor types "
                                      "as this recipe applied to IN.gguf.")
@click.option("--out", "gguf_out", default="OUT.gguf", show_default=True, help="Output name in that command.")
@click.option("--imatrix", type=click.Path(dir_okay=False, path_type=Path), help="Imatrix for that command.")
def recipes_cmd(name: str | None, gguf_in: Path | None, gguf_out: str, imatrix: Path | None) -> None:
    """List the shipped recipes; with NAME show it (and, with --llama-quantize-args, its llama-quantize twin)."""
    from glmgguf.gguf.quantize_args import llama_quantize_args
    from glmgguf.gguf.recipe import builtin_recipes, load_recipe

    if name is None:
        if gguf_in is not None:
            raise click.UsageError("--llama-quantize-args needs a recipe NAME")
        recipes = {n: load_recipe(n) for n in builtin_recipes()}
        width = max(map(len, recipes), default=0)
        for n, r in recipes.items():
            click.echo(f"{n.ljust(width)}  {r.description}")
        return
    rec = load_recipe(name)
    if gguf_in is None:
        click.echo(f"# {rec.name} ({rec.path}, sha256 {rec.sha256[:16]})")
        click.echo(rec.text.rstrip())
        return
    from glmgguf.gguf.quantize import open_gguf, plan_quantize

    model = open_gguf(gguf_in)
    plan, resolution = plan_quantize(model, rec)
    for w in resolution.warnings:
        click.echo(f"# warning: {w}", err=True)
    src_types = {t.name: t.ggml_type for t in model.plan}
    click.echo(shlex.join(llama_quantize_args(plan, gguf_in, gguf_out, imatrix=imatrix, src_types=src_types)))


@click.group("imatrix")
def imatrix_group() -> None:
    """Importance matrices written by llama-imatrix (GGUF or legacy .dat)."""


@imatrix_group.command("slice")
@click.argument("imatrix", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("keep_map", metavar="KEEPMAP", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_force_opt
def imatrix_slice_cmd(imatrix: Path, keep_map: Path, out: Path, force: bool) -> None:
    """Slice IMATRIX of the unpruned model to the experts a REAP-pruned model kept: KEEPMAP is the pruned
    checkpoint (or its reap_keep_map.json); OUT (GGUF format) is what `quantize`/`convert --imatrix` of the
    pruned model take."""
    from glmgguf.gguf.imatrix import EXPERT_TENSORS, slice_file

    sliced = slice_file(imatrix, keep_map, out, force=force)
    n = sum(name.endswith(EXPERT_TENSORS) for name in sliced.entries)
    click.echo(f"wrote {out}: {len(sliced.entries)} entries, {n} expert tensors sliced by the keep-map")
