"""`glmgguf gptq`: export a checkpoint as GPTQ INT4 (W4A16) for vLLM / SGLang; dequantize one back."""

from __future__ import annotations

from pathlib import Path

import click

from glmgguf.choices import DTYPES, GPTQ_FORMATS
from glmgguf.cli_options import DEVICE_PARAM, dequantize_command, parse_size_option, text_options
from glmgguf.gptq import quant as gq


@click.group("gptq")
def gptq() -> None:
    """GPTQ INT4 weights (group 128, symmetric, BF16 activations) for vLLM / SGLang (Marlin kernels)."""


@gptq.command("export")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@text_options("Calibration text", flag="--calib")
@click.option("--format", "fmt", type=click.Choice(GPTQ_FORMATS), default="compressed-tensors", show_default=True,
              help="compressed-tensors: llm-compressor's pack-quantized W4A16; gptq: AutoGPTQ's qweight/qzeros/"
                   "scales/g_idx (vLLM gptq_marlin).")
@click.option("--exclude", multiple=True,
              help="Module name pattern (fnmatch) kept BF16, e.g. 'model.layers.78.*' (repeatable).")
@click.option("--device", default="cpu", show_default=True, type=DEVICE_PARAM,
              help="Where to calibrate and quantize: cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True,
              help="Compute dtype of the calibration forward.")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="rtn: round to nearest (the baseline), same format.")
@click.option("--min-expert-tokens", "min_tokens", default=64, show_default=True, type=click.IntRange(min=0),
              help="A routed expert with fewer calibration tokens is rounded to nearest.")
@click.option("--dampening", "damp", default=gq.DAMPENING_FRAC, show_default=True, type=click.FloatRange(min=0),
              help="Fraction of the Hessian's mean diagonal added to its diagonal.")
@click.option("--no-actorder", is_flag=True, help="Quantize columns left to right (default: by decreasing H_jj).")
@click.option("--max-shard-size", "max_shard", default="5G", show_default=True, callback=parse_size_option,
              help="Largest output shard.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads  [default: $GLMGGUF_THREADS, else the cores other processes leave free]")
@click.option("--dry-run", is_flag=True, help="Print the plan and exit.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def export_cmd(src: Path, out: Path, data: tuple[Path, ...], seq_len: int, max_tokens: int | None,
               num_samples: int | None, seed: int, text_field: str, batch_size: int, fmt: str,
               exclude: tuple[str, ...], device: str, dtype: str, method: str, min_tokens: int, damp: float,
               no_actorder: bool, max_shard: int, threads: int | None, dry_run: bool, force: bool) -> None:
    """Write SRC with its linear weights (attention, indexer wq_b, MLPs, shared and routed experts, MTP block) as
    GPTQ INT4 to OUT, calibrated layer by layer on the --calib text."""
    import torch
    from tqdm import tqdm

    from glmgguf.gptq.export import export_gptq, plan_export, resolve_device
    from glmgguf.gptq.sequential import GptqSettings
    from glmgguf.io.atomic import check_output
    from glmgguf.reap.data import load_calibration, load_tokenizer
    from glmgguf.runner import chunk_sequences

    plan = plan_export(src, fmt=fmt, exclude=exclude)
    click.echo(plan.describe())
    if dry_run:
        return
    check_output(out, force, inputs=[src])
    dev = resolve_device(device)
    if threads is None and dev.type == "cpu":
        from glmgguf.threads import free_cores

        threads = free_cores()
    text = load_calibration(data, load_tokenizer(src), seq_len, max_tokens=max_tokens, num_samples=num_samples,
                            seed=seed, text_field=text_field)
    click.echo(f"calibration: {text.sequences.shape[0]} x {text.sequences.shape[1]} tokens from "
               f"{text.documents_used} of {text.documents_total} documents on {dev}")
    settings = GptqSettings(damp=damp, actorder=not no_actorder, min_tokens=min_tokens, rtn=method == "rtn")
    bar = tqdm(total=len(plan.targets), unit="module", desc="gptq", dynamic_ncols=True)
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        res = export_gptq(plan, out, chunk_sequences(text.sequences, batch_size), settings, dev,
                          getattr(torch, DTYPES[dtype]), force, max_shard,
                          calib={"data": [p.name for p in data], "seed": seed, **text.describe()},
                          progress=lambda done, total: bar.update(done - bar.n))
    finally:
        bar.close()
        torch.set_num_threads(prev)
    s = res.report.summary()
    click.echo(f"wrote {res.out} ({fmt}): {res.bytes_out / 2**20:.1f} MiB (from {plan.bytes_in / 2**20:.1f} MiB) "
               f"in {res.seconds:.1f} s, {res.tokens / max(res.seconds, 1e-9):.0f} tok/s; {s['gptq']} modules GPTQ, "
               f"{s['rtn']} rounded to nearest (--method rtn), {s['rtn_few_tokens']} rounded to nearest for fewer "
               f"than {min_tokens} tokens, {s['rtn_no_input']} without calibration input, {s['rtn_cholesky']} "
               "after a failed Cholesky")


dequantize_command(gptq, "a GPTQ export (INT4 modules dequantized)", "glmgguf.gptq.dequantize", "bf16")
