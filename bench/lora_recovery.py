#!/usr/bin/env python3
"""What does a LoRA adapter recover beyond Router-KD? Held-out KL against adapter rank and target modules, with
step time and memory, and the cost extrapolated to GLM-5.2 at 168 experts on 8 GPUs.

    python bench/lora_recovery.py [--steps 100] [--ranks 2 8 32] [--no-run]

Inputs are the shipped testbed plan's (`glmgguf pipeline testbed`, stages observe, prune, teacher and
teacher-heldout): the trained tiny testbed REAP-pruned to 11 of 16 experts, a top-256 teacher cache of 256 KD
sequences (128 tokens) and a full-vocabulary teacher cache of 32 held-out sequences (standard-library files the
testbed never saw), so the held-out KL is exact. Each training is one `glmgguf kd` process (one thread), timed
with its peak RSS as the OS reports it:

- Router-KD: the plan's settings (gates only, lr 3e-3, cosine, 5 warmup steps, batch 8), for `--steps` and, as
  the equal-compute control, for twice as many;
- LoRA-KD after it (the pipeline's order: `kd lora` on the Router-KD checkpoint, the gates trained on, lr 1e-3,
  gates 3e-3), `--steps` steps: every rank of `--ranks` on attention + shared experts, then at rank 8 the other
  target sets (o_proj + shared experts: what a llama.cpp adapter GGUF can carry; shared experts alone; attention
  + shared + dense MLPs) and without the gates.

No learning rate was tuned on the held-out text: the LoRA rates are the command's defaults and Router-KD's the
plan's. The GLM-5.2 figures are arithmetic: the adapter's parameters from the layout (`kd.lora.adapter_parameters`)
with float32 AdamW state, and the time per step as Router-KD's FSDP2 model (`pipeline.fsdp_estimate`) times the
measured LoRA / Router-KD step-time ratio. Writes bench/results/lora_recovery.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reap_memory import glm52_layout  # noqa: E402
from upstream import measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lora_recovery.json"
GLM52 = {"keep": 168, "world": 8, "batch": 8, "seq_len": 2048, "steps": 1000, "cpu_offload": True}
KD = ["--lr", "3e-3", "--schedule", "cosine", "--warmup", "5", "--batch-size", "8", "--save-every", "0"]
LORA = ["--lr", "1e-3", "--batch-size", "8", "--save-every", "0"]


def configs(ranks: list[int]) -> list[dict]:
    """The LoRA runs: rank sweep on attention + shared experts, then the target sets at rank 8."""
    out = [{"rank": r, "targets": "attn,shared", "gates": True} for r in ranks]
    out += [{"rank": 8, "targets": t, "gates": True} for t in ("attn_out,shared", "shared", "attn,shared,dense")]
    out.append({"rank": 8, "targets": "attn,shared", "gates": False})
    return out


def prepare(work: Path) -> Path:
    """The testbed plan's observe, prune, teacher and teacher-heldout stages in `work`."""
    from glmgguf.pipeline.plan import parse_plan
    from glmgguf.pipeline.run import run_plan

    plan = parse_plan("testbed", workdir=work)
    run_plan(plan, quiet=True, only=["prune", "teacher", "teacher-heldout"])
    return work


def glmgguf(*args: str) -> list[str]:
    return [sys.executable, "-m", "glmgguf", *args, "--threads", "1"]


def held_out_kl(model: Path, cache: Path, adapter: Path | None = None) -> dict:
    from glmgguf.kd.evaluate import evaluate

    r = evaluate(model, cache, mtp=False, adapter=adapter)
    return {"kl": r.kl, "top1": r.top1, "positions": r.positions}


def run_kd(work: Path, steps: int, env: dict) -> dict:
    out = work / f"kd-{steps}"
    stats = measure(glmgguf("kd", "train", str(work / "prune" / "model"), "--teacher-cache",
                            str(work / "teacher" / "cache"), "--out", str(out), "--steps", str(steps), *KD),
                    env=env, log=work / f"kd-{steps}.log")
    log = json.loads((out / "kd_train_log.json").read_text())
    return {"steps": steps, "wall_s": stats["wall_s"], "peak_rss_bytes": stats["peak_rss_bytes"],
            "seconds_per_step": log.get("seconds_per_step"), "trainable_parameters": log["trainable_parameters"],
            **held_out_kl(out, work / "teacher-heldout" / "cache"), "model": out}


def run_lora(work: Path, base: Path, cfg: dict, steps: int, env: dict) -> dict:
    name = f"lora-r{cfg['rank']}-{cfg['targets'].replace(',', '+')}" + ("" if cfg["gates"] else "-nogates")
    out = work / name
    gates = ["--train-gates", "--gate-lr", "3e-3"] if cfg["gates"] else []
    stats = measure(glmgguf("kd", "lora", str(base), "--teacher-cache", str(work / "teacher" / "cache"), "--out",
                            str(out), "--rank", str(cfg["rank"]), "--target", cfg["targets"], "--steps", str(steps),
                            *gates, *LORA), env=env, log=work / f"{name}.log")
    log = json.loads((out / "lora_train_log.json").read_text())
    return {**cfg, "steps": steps, "wall_s": stats["wall_s"], "peak_rss_bytes": stats["peak_rss_bytes"],
            "seconds_per_step": log["seconds_per_step"], "trainable_parameters": log["trainable_parameters"],
            **held_out_kl(base, work / "teacher-heldout" / "cache", out)}


def glm52_cost(rank: int, targets: str, gates: bool, step_ratio: float) -> dict:
    """GLM-5.2 pruned to 168 experts: adapter size and AdamW state, Router-KD's FSDP2 estimate scaled by the
    measured LoRA / Router-KD step-time ratio."""
    from glmgguf.kd.lora import adapter_parameters
    from glmgguf.pipeline.estimate import pruned_layout
    from glmgguf.pipeline.fsdp_estimate import fsdp_kd_estimate

    g = GLM52
    layout = pruned_layout(glm52_layout(), g["keep"], None)
    params = adapter_parameters(layout, tuple(targets.split(",")), rank, gates)
    est = fsdp_kd_estimate(layout, g["world"], g["batch"], g["seq_len"], g["cpu_offload"])
    return {"adapter_parameters": params, "adapter_bf16_bytes": 2 * params,
            "train_state_bytes": 16 * params,  # float32 weight, gradient and AdamW's two moments
            "per_gpu": {e.gpu: {"router_kd_bytes": e.per_gpu_bytes, "fits": e.fits,
                                "router_kd_s_per_step": e.seconds_per_step,
                                "lora_s_per_step": e.seconds_per_step * step_ratio,
                                "lora_hours": e.hours(g["steps"]) * step_ratio} for e in est}}


def table(doc: dict) -> str:
    base = doc["pruned"]["kl"]
    kd = doc["router_kd"]["kl"]
    lines = ["| model | trainable parameters | held-out KL | vs pruned | vs Router-KD | s/step | peak RSS |",
             "|---|---|---|---|---|---|---|", f"| pruned | - | {base:.5f} | - | - | - | - |"]
    for r in (doc["router_kd"], doc["router_kd_2x"]):
        lines.append(f"| Router-KD, {r['steps']} steps | {r['trainable_parameters']:,} | {r['kl']:.5f} | "
                     f"{100 * (r['kl'] / base - 1):+.1f}% | {100 * (r['kl'] / kd - 1):+.1f}% | "
                     f"{r['seconds_per_step']:.3f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    for r in doc["lora"]:
        what = f"+ LoRA r{r['rank']} {r['targets']}" + (" + gates" if r["gates"] else "")
        lines.append(f"| {what} | {r['trainable_parameters']:,} | {r['kl']:.5f} | {100 * (r['kl'] / base - 1):+.1f}% "
                     f"| {100 * (r['kl'] / kd - 1):+.1f}% | {r['seconds_per_step']:.3f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--no-run", action="store_true", help="Only redo the GLM-5.2 arithmetic of the results file.")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if a.no_run:
        doc = json.loads(RESULTS.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
            work = prepare(Path(tmp))
            pruned = held_out_kl(work / "prune" / "model", work / "teacher-heldout" / "cache")
            kd, kd2 = run_kd(work, a.steps, env), run_kd(work, 2 * a.steps, env)
            base, _ = kd.pop("model"), kd2.pop("model")
            lora = [run_lora(work, base, c, a.steps, env) for c in configs(a.ranks)]
            doc = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "steps": a.steps, "pruned": pruned, "router_kd": kd, "router_kd_2x": kd2, "lora": lora}
    default = next(r for r in doc["lora"] if r["rank"] == 8 and r["targets"] == "attn,shared" and r["gates"])
    ratio = default["seconds_per_step"] / doc["router_kd"]["seconds_per_step"]
    doc["glm52"] = {"assume": GLM52, "step_ratio": ratio,
                    "rank8_attn_shared_gates": glm52_cost(8, "attn,shared", True, ratio)}
    doc["table"] = table(doc)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["table"])
    g = doc["glm52"]["rank8_attn_shared_gates"]
    print(f"GLM-5.2 at 168 experts, rank 8 on attention + shared experts + gates: {g['adapter_parameters']:,} "
          f"trainable parameters; LoRA / Router-KD step time {ratio:.2f}x; 8 x H100 offloaded: "
          f"{g['per_gpu']['H100']['lora_hours']:.1f} h for {GLM52['steps']} steps")


if __name__ == "__main__":
    main()
