"""`glmgguf pipeline PLAN.toml`: the whole build from one file; `--dry-run` prints the stages with estimates."""

from __future__ import annotations

from pathlib import Path

import click

from glmgguf.pipeline.plan import Plan, parse_plan
from glmgguf.pipeline.run import plan_stages, run_plan, stage_status
from glmgguf.units import format_size


def dry_run_lines(plan: Plan, model_config: Path | None) -> list[str]:
    """The stage table: status, output, disk, peak memory, and each stage's command."""
    from glmgguf.gguf.recipe import load_recipe
    from glmgguf.pipeline.estimate import estimate_stages, is_block_fp8, tensor_bytes
    from glmgguf.pipeline.inputs import recipe_ref

    layout, stages = plan_stages(plan, model_config)
    est = estimate_stages(plan, layout, {g.name: load_recipe(recipe_ref(plan, g.recipe)) for g in plan.gguf})
    fp8 = is_block_fp8(layout)
    src = tensor_bytes(layout, fp8=fp8)[0]
    lines = [f"plan {plan.path}: model {plan.model} ({layout.n_layers} layers + {layout.n_mtp} MTP, "
             f"{len(layout.moe_layers)} MoE layers of {layout.moe_layers[0].n_experts if layout.moe_layers else 0} "
             f"experts, {format_size(src)} of {'block-FP8' if fp8 else 'BF16'} weights); workdir {plan.workdir}", "",
             "| stage | status | writes | disk | peak memory | note |", "|---|---|---|---:|---:|---|"]
    upstream: dict[str, str | None] = {}
    total = 0
    for s in stages:
        state = None if model_config else stage_status(s, plan.workdir, upstream)
        status = state.status if state else "to run"
        upstream[s.name] = state.output_fingerprint if state else None
        e = est[s.name]
        total += e.disk
        lines.append(f"| {s.name} | {status} | {s.output.relative_to(plan.workdir)} | {format_size(e.disk)} | "
                     f"{format_size(e.memory)} | {e.note} |")
    lines += ["", f"disk for all stages: {format_size(total)} (plus the source model, {format_size(src)})", ""]
    if plan.kd is not None and plan.launch is not None:
        lines += [*fsdp_lines(plan, layout), ""]
    lines += ["commands:"]
    lines += [f"  [{s.name}] {'torchrun ' + ' '.join(s.launcher) + ' -m ' if s.launcher else ''}glmgguf "
              f"{' '.join(s.args)}" for s in stages]
    return lines


def fsdp_lines(plan: Plan, layout) -> list[str]:
    """Per-GPU memory and time of the plan's `kd train --fsdp` on H100 / H200 / B200 (`fsdp_estimate`)."""
    from glmgguf.pipeline.estimate import DTYPE_BYTES, pruned_layout
    from glmgguf.pipeline.fsdp_estimate import fsdp_kd_lines

    k, la = plan.kd, plan.launch
    assert k is not None and la is not None
    final = pruned_layout(layout, plan.reap.keep, plan.reap.ratio) if plan.reap is not None else layout
    return fsdp_kd_lines(final, la.world, k.batch_size, plan.data.seq_len, k.steps, k.cpu_offload,
                         DTYPE_BYTES[k.dtype])


@click.command("pipeline")
@click.argument("plan_path", metavar="PLAN")
@click.option("--dry-run", is_flag=True, help="Print the stages with their status, disk and memory estimates.")
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path),
              help="Dry run only: estimate with this config.json instead of the plan's model (files unchecked).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Override the plan's workdir.")
@click.option("--only", multiple=True, help="Run this stage (and what it needs) only; repeatable.")
@click.option("--quiet", is_flag=True, help="Stage output only to STAGE/log.txt.")
def pipeline(plan_path: str, dry_run: bool, model_config: Path | None, workdir: Path | None,
             only: tuple[str, ...], quiet: bool) -> None:
    """Run the build described by PLAN (a .toml file or a shipped plan name, e.g. 'testbed').

    Each stage writes into its own directory under the workdir with a manifest; a re-run skips finished stages
    whose inputs and settings are unchanged and redoes the rest.
    """
    if model_config is not None and not dry_run:
        raise click.UsageError("--model-config is for --dry-run only")
    plan = parse_plan(plan_path, workdir)
    if dry_run:
        click.echo("\n".join(dry_run_lines(plan, model_config)))
        return
    results = run_plan(plan, quiet=quiet, echo=click.echo, only=list(only) or None)
    ran = [r for r in results if r.status == "ran"]
    click.echo(f"pipeline done: {len(ran)} stage(s) ran, {len(results) - len(ran)} skipped; outputs in "
               f"{plan.workdir}")

