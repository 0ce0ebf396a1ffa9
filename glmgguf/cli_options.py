"""Command-line options shared by the stages that run the model over text (REAP observe, the KD teacher)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from glmgguf.choices import DEVICE, DEVICE_MAP, DTYPES, device_problem

F = TypeVar("F", bound=Callable)


def parse_size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """click callback: '4G', '512M', '2048' -> bytes."""
    from glmgguf.units import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class DeviceParam(click.ParamType):
    """A device (or accelerate device_map) string, checked before any work."""

    name = "device"

    def __init__(self, pattern=DEVICE):
        self.pattern = pattern

    def convert(self, value, param, ctx):
        if (problem := device_problem(str(value), self.pattern)) is not None:
            self.fail(problem, param, ctx)
        return str(value)


DEVICE_PARAM = DeviceParam(DEVICE)
DEVICE_MAP_PARAM = DeviceParam(DEVICE_MAP)


def stack_options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying `decorators` in the order written (the first is the outermost)."""

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def text_options(what: str, flag: str = "--data") -> Callable[[F], F]:
    """--data (or `flag`), --seq-len, --max-tokens, --num-samples, --seed, --text-field, --batch-size."""
    return stack_options(
        click.option(flag, "data", multiple=True, required=True,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help=f"{what}: .txt, .jsonl or .parquet with 'text' or chat 'messages' (repeatable)."),
        click.option("--seq-len", default=2048, show_default=True, type=click.IntRange(min=2),
                     help="Tokens per packed sequence."),
        click.option("--max-tokens", type=click.IntRange(min=1),
                     help="Token budget (rounded down to whole sequences)."),
        click.option("--num-samples", type=click.IntRange(min=1),
                     help="Number of sequences (with --max-tokens: the min)."),
        click.option("--seed", default=0, show_default=True, help="Seed of the document order."),
        click.option("--text-field", default="text", show_default=True,
                     help="Field holding plain text in jsonl/parquet."),
        click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
                     help="Sequences per forward chunk."),
    )


def streaming_options(dtype_help: str) -> Callable[[F], F]:
    """--streaming, --device, --dtype, --work-dir, --spill-threshold."""
    return stack_options(
        click.option("--streaming", is_flag=True,
                     help="One decoder layer resident at a time, loaded from the shards (for models larger than "
                          "memory)."),
        click.option("--device", default="cpu", show_default=True, type=DEVICE_MAP_PARAM,
                     help="Streaming: device of the resident layer (cpu, cuda, cuda:1). In-memory: the device_map "
                          "('auto' spreads the model over all GPUs with accelerate)."),
        click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True,
                     help=dtype_help),
        click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Streaming: where hidden states spill and the resume manifest lives  [default: OUT.work]"),
        click.option("--spill-threshold", default="4G", show_default=True, callback=parse_size_option,
                     help="Streaming: hidden states larger than this go to --work-dir (and the run becomes "
                          "resumable)."),
    )


def dequantize_command(group: click.Group, what: str, module: str, default: str) -> None:
    """Add `GROUP dequantize SRC OUT` to `group`: a plain checkpoint from `what` (`module`'s `dequantize_export`),
    written in `--dtype` (`default`)."""

    @group.command("dequantize", help=f"Write a plain checkpoint from {what} for transformers or llama.cpp.")
    @click.argument("src", type=click.Path(file_okay=False, path_type=Path))
    @click.argument("out", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--dtype", type=click.Choice(["bf16", "f32"]), default=default, show_default=True)
    @click.option("--force", is_flag=True, help="Overwrite OUT.")
    def dequantize_cmd(src: Path, out: Path, dtype: str, force: bool) -> None:
        import importlib

        import torch

        export = importlib.import_module(module).dequantize_export
        export(src, out, dtype=getattr(torch, DTYPES[dtype]), force=force)
        click.echo(f"wrote {out}")
