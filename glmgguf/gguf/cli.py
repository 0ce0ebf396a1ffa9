"""Click commands of the GGUF stage: `convert`."""

from __future__ import annotations

from pathlib import Path

import click

from glmgguf.errors import user_errors
from glmgguf.gguf.convert import OUTTYPES, convert, outtype_chooser
from glmgguf.gguf.plan import IndexerMode, MtpMode


@click.command("convert")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--outtype", type=click.Choice(sorted(OUTTYPES)), default="bf16", show_default=True,
              help="Type of the weight matrices (norms, router and indexer.proj stay F32).")
@click.option("--mtp", type=click.Choice([m.value for m in MtpMode]), default="keep", show_default=True,
              help="Keep the MTP (NextN) block, drop it, or write only it (draft model).")
@click.option("--indexer", type=click.Choice([m.value for m in IndexerMode]), default="native", show_default=True,
              help="native: indexer tensors on full layers only; duplicate: also copy them into shared layers "
                   "for runtimes that predate shared indexers (newer runtimes ignore the copies).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--allow-nonfinite", is_flag=True, help="Warn instead of refusing weights with NaN/Inf.")
def convert_cmd(src: Path, out: Path, outtype: str, mtp: str, indexer: str, force: bool,
                allow_nonfinite: bool) -> None:
    """Convert the GLM-5.x checkpoint SRC into the GGUF file OUT."""
    with user_errors():
        result = convert(src, out, outtype_chooser(outtype), MtpMode(mtp), IndexerMode(indexer),
                         settings={"outtype": outtype}, force=force, allow_nonfinite=allow_nonfinite)
    click.echo(f"wrote {result.path}: {result.n_tensors} tensors, {result.n_bytes / 2**20:.1f} MiB "
               f"in {result.seconds:.1f} s (peak RSS {result.peak_rss / 2**20:.0f} MiB)")
