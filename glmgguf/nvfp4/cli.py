"""`glmgguf nvfp4`: export a checkpoint with NVFP4 routed experts for vLLM / SGLang; dequantize one back."""

from __future__ import annotations

from pathlib import Path

import click

from glmgguf.choices import NVFP4_FORMATS
from glmgguf.cli_options import DEVICE_PARAM, dequantize_command, parse_size_option


@click.group("nvfp4")
def nvfp4() -> None:
    """NVFP4 (4-bit float, per-16 e4m3 scales) checkpoints for vLLM / SGLang on Blackwell."""


@nvfp4.command("export")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--calib", "calib", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="REAP statistics for the input scales ('reap observe' output; several are merged)  "
                   "[default: SRC/reap_stats.safetensors, which 'reap prune' writes]")
@click.option("--device", default="cpu", show_default=True, type=DEVICE_PARAM,
              help="Where to quantize: cpu, cuda or cuda:N.")
@click.option("--exclude", multiple=True,
              help="Module name pattern (fnmatch) whose experts stay BF16, e.g. 'model.layers.78.*' for the MTP "
                   "block (repeatable; a whole MoE layer's experts or none).")
@click.option("--format", "fmt", type=click.Choice(NVFP4_FORMATS), default="modelopt",
              show_default=True, help="modelopt: NVIDIA ModelOpt's layout (--quantization modelopt_fp4); "
                                      "compressed-tensors: llm-compressor's nvfp4-pack-quantized.")
@click.option("--max-shard-size", "max_shard", default="5G", show_default=True, callback=parse_size_option,
              help="Largest output shard.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads  [default: $GLMGGUF_THREADS, else the cores other processes leave free]")
@click.option("--dry-run", is_flag=True, help="Print the plan and exit.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def export_cmd(src: Path, out: Path, calib: tuple[Path, ...], device: str, exclude: tuple[str, ...], fmt: str,
               max_shard: int, threads: int | None, dry_run: bool, force: bool) -> None:
    """Write SRC with its routed experts (every MoE layer, MTP included) in NVFP4 to OUT."""
    from tqdm import tqdm

    from glmgguf.io.atomic import check_output
    from glmgguf.nvfp4.export import export_nvfp4, plan_export, resolve_device

    plan = plan_export(src, list(calib), fmt=fmt, exclude=exclude)
    click.echo(plan.describe())
    if dry_run:
        return
    check_output(out, force, inputs=[src])
    dev = resolve_device(device)
    if threads is None and dev.type == "cpu":
        from glmgguf.threads import free_cores

        threads = free_cores()
    bar = tqdm(total=plan.bytes_in, unit="B", unit_scale=True, desc="nvfp4", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        res = export_nvfp4(plan, out, device=dev, force=force, max_shard_bytes=max_shard, threads=threads,
                           progress=progress)
    finally:
        bar.close()
    click.echo(f"wrote {res.out} ({fmt}): {res.n_tensors} tensors, {res.bytes_out / 2**20:.1f} MiB "
               f"(from {plan.bytes_in / 2**20:.1f} MiB) in {res.seconds:.1f} s; experts at "
               f"{res.expert_gbps:.3f} GB/s on {dev}; {plan.amax.n_fallback} expert(s) took their layer's max "
               "input scale (never routed in calibration)")


dequantize_command(nvfp4, "an NVFP4 export (experts dequantized)", "glmgguf.nvfp4.dequantize", "f32")
