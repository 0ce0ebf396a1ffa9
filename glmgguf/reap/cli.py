"""`glmgguf reap`: observe (calibration statistics), prune (streaming rewrite), report (heatmap + table), merge."""

from __future__ import annotations

import json
from pathlib import Path

import click

from glmgguf.choices import REAP_METRICS, REAP_PER_LAYER
from glmgguf.cli_options import streaming_options, text_options


@click.group("reap")
def reap() -> None:
    """REAP expert pruning: observe routing on calibration text, prune the least salient experts."""


@reap.command("observe")
@click.argument("model", type=click.Path(file_okay=False, path_type=Path))
@text_options("Calibration file(s)")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Statistics file to write (.safetensors; a .json summary is written beside it).")
@streaming_options("Compute dtype.")
@click.option("--no-mtp", is_flag=True, help="Do not observe the MTP block (it then cannot be pruned).")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def observe_cmd(model: Path, data: tuple[Path, ...], out: Path, seq_len: int, max_tokens: int | None,
                num_samples: int | None, seed: int, text_field: str, batch_size: int, streaming: bool, device: str,
                dtype: str, work_dir: Path | None, spill_threshold: int, no_mtp: bool, force: bool) -> None:
    """Run calibration text through MODEL and save per-expert REAP statistics.

    Under `torchrun --nproc-per-node N -m glmgguf reap observe ...` each rank observes its share of the text on
    its own device and rank 0 writes the combined statistics (the file one process would write)."""
    from glmgguf.dist import launch
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.observe import observe
    from glmgguf.textpass import TextPass

    with launch(device) as dist:
        tp = TextPass.prepare(model, out, force=force, data=data, seq_len=seq_len, max_tokens=max_tokens,
                              num_samples=num_samples, seed=seed, text_field=text_field, batch_size=batch_size,
                              streaming=streaming, device=device, dtype=dtype, work_dir=work_dir,
                              spill_threshold=spill_threshold, dist=dist)
        main = dist is None or dist.main
        layout = GlmLayout.from_dir(model)
        if main:
            click.echo(tp.describe("calibration"))
        with tp.progress(layout.n_layers + (0 if no_mtp else layout.n_mtp), "observe") as progress:
            stats = observe(model, tp.chunks, streaming=streaming, dtype=tp.dtype, device=tp.device,
                            device_map=tp.device, work_dir=tp.work_dir, spill_bytes=spill_threshold,
                            mtp=not no_mtp, progress=progress,
                            meta={"data": [p.name for p in data], "seed": seed, **tp.text.describe()})
        if dist is not None:
            stats = stats.all_reduce(dist)
        if main:
            stats.save(out, force=force)
        tp.finish()
    if main:
        secs, resumed = stats.meta["seconds"], stats.meta.get("layers_resumed")
        click.echo(f"wrote {out} ({len(stats.layers)} MoE layers, {stats.meta['tokens']} tokens in {secs:.1f} s, "
                   f"{stats.meta['tokens'] / max(secs, 1e-9):.0f} tok/s"
                   f"{f'; resumed after layers {resumed}' if resumed else ''})")


def _plan(model: Path, stats_paths: tuple[Path, ...], keep, ratio, per_layer, metric, seed):
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.prune import plan_prune
    from glmgguf.reap.stats import ReapStats

    stats = ReapStats.load_many(list(stats_paths))
    layout = GlmLayout.from_dir(model)
    return stats, plan_prune(layout, stats, keep=keep, ratio=ratio, per_layer=per_layer, metric=metric, seed=seed)


_keep_opt = click.option("--keep", type=click.IntRange(min=1), help="Experts to keep per MoE layer.")
_ratio_opt = click.option("--ratio", type=click.FloatRange(0.0, 1.0, max_open=True),
                          help="Fraction of experts to prune (0.25 keeps 75%).")
_metric_opt = click.option("--metric", type=click.Choice(REAP_METRICS), default="reap",
                           show_default=True, help="Saliency used to rank experts.")
_seed_opt = click.option("--seed", default=0, show_default=True, help="Seed of --metric random.")


@reap.command("prune")
@click.argument("model", type=click.Path(file_okay=False, path_type=Path))
@click.option("--stats", "stats_paths", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Statistics file(s); several are merged.")
@_keep_opt
@_ratio_opt
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output checkpoint directory.")
@click.option("--per-layer", type=click.Choice(REAP_PER_LAYER), default="uniform", show_default=True,
              help="uniform: the same count in every layer; global: per-layer counts from a global ranking "
                   "(num_routed_experts_per_layer; llama.cpp cannot load those).")
@_metric_opt
@_seed_opt
@click.option("--dequantize", type=click.Choice(["bf16"]), default=None,
              help="Write a block-FP8 source's weights as BF16 (default: they stay block-FP8 with their scales).")
@click.option("--dry-run", is_flag=True, help="Print the plan and exit.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def prune_cmd(model: Path, stats_paths: tuple[Path, ...], keep: int | None, ratio: float | None, out: Path,
              per_layer: str, metric: str, seed: int, dequantize: str | None, dry_run: bool, force: bool) -> None:
    """Write a copy of MODEL without its least salient experts."""
    import torch
    from tqdm import tqdm

    from glmgguf.reap.prune import prune_checkpoint

    stats, plan = _plan(model, stats_paths, keep, ratio, per_layer, metric, seed)
    click.echo(plan.describe())
    if dry_run:
        return
    bar = tqdm(unit="tensor", desc="prune", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        res = prune_checkpoint(model, plan, out, force=force, stats=stats, progress=progress,
                               dequantize=torch.bfloat16 if dequantize == "bf16" else None)
    finally:
        bar.close()
    click.echo(f"wrote {res.out}: {res.n_tensors} tensors, {res.bytes_out / 2**20:.1f} MiB "
               f"(from {res.bytes_in / 2**20:.1f} MiB) in {res.seconds:.1f} s")


@reap.command("report")
@click.argument("stats_path", metavar="STATS", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write  [default: STATS with suffix .png]; a .md table is written beside it.")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint the statistics belong to (with --keep/--ratio: mark what a prune would drop).")
@_keep_opt
@_ratio_opt
@click.option("--per-layer", type=click.Choice(REAP_PER_LAYER), default="uniform", show_default=True)
@_metric_opt
@_seed_opt
def report_cmd(stats_path: Path, out: Path | None, model: Path | None, keep: int | None, ratio: float | None,
               per_layer: str, metric: str, seed: int) -> None:
    """Heatmap (layers x experts) and per-layer table of STATS."""
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.prune import plan_prune
    from glmgguf.reap.report import heatmap, layer_table, markdown_table
    from glmgguf.reap.stats import ReapStats

    stats = ReapStats.load(stats_path)
    plan = None
    if keep is not None or ratio is not None:
        if model is None:
            raise click.UsageError("--keep/--ratio need --model (the plan is checked against it)")
        plan = plan_prune(GlmLayout.from_dir(model), stats, keep=keep, ratio=ratio, per_layer=per_layer,
                          metric=metric, seed=seed)
    out = out or stats_path.with_suffix(".png")
    heatmap(stats, out, plan, metric)
    table = markdown_table(layer_table(stats, plan, metric))
    out.with_suffix(".md").write_text(table)
    click.echo(table, nl=False)
    click.echo(f"wrote {out} and {out.with_suffix('.md')}")


@reap.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def merge_cmd(inputs: tuple[Path, ...], out: Path, force: bool) -> None:
    """Merge statistics of several observe runs over the same model."""
    from glmgguf.reap.stats import ReapStats

    stats = ReapStats.load_many(list(inputs))
    stats.save(out, force=force)
    click.echo(f"wrote {out} ({len(inputs)} runs, {json.dumps({str(k): v for k, v in stats.tokens.items()})} "
               f"tokens per layer)")
