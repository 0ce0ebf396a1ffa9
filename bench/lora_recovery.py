#!/usr/bin/env python3
"""What does a LoRA adapter recover beyond Router-KD? Held-out KL against adapter rank and target modules, with
step time and memory, and the cost extrapolated to GLM-5.2 at 168 experts on 8 GPUs.

    python bench/lora_recovery.py [--keep 8] [--steps 100] [--ranks 2 8 32] [--no-run]

Teacher: the trained tiny testbed; student: it REAP-pruned to `--keep` of its 16 experts (8: half, where gates
alone recover least). Text, three disjoint sets of standard-library files: KD (a top-256 teacher cache of 256
sequences of 128 tokens), validation (32 sequences) and held-out (48 sequences, files the testbed never saw), the
last two over the full vocabulary so their KL is exact. Each training is one `glmgguf kd` process (one thread,
batch 8, cosine schedule, 5 warmup steps), timed, with its peak RSS as the OS reports it (ru_maxrss):

- Router-KD (gates only) `--steps` steps at each of `--kd-lrs`; the learning rate with the lowest validation KL
  is kept and also run twice as long (the equal-compute control for Router-KD + LoRA);
- LoRA-KD on that Router-KD checkpoint (the pipeline's order), `--steps` steps: rank 8 on attention + shared
  experts with the gates (at 3x the adapters' learning rate) at each of `--lora-lrs`, chosen on validation;
  then, at the chosen rate, the other ranks, the other target sets (o_proj + shared experts: what a llama.cpp
  adapter GGUF can carry; shared experts alone; attention + shared + dense MLPs) and rank 8 without the gates.

The table reports the held-out KL; no choice is made on it. The GLM-5.2 figures are arithmetic: the adapter's
parameters from the layout (`kd.lora.adapter_parameters`) with float32 AdamW state, and the time per step as
Router-KD's FSDP2 model (`pipeline.fsdp_estimate`, 8 GPUs, offloaded) times the measured LoRA / Router-KD
step-time ratio (Router-KD's two runs averaged; at least 1, since LoRA-KD does all of Router-KD's work).
Writes bench/results/lora_recovery.json and prints a markdown table.
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
COMMON = ["--batch-size", "8", "--save-every", "0", "--schedule", "cosine", "--warmup", "5", "--threads", "1"]


def configs(ranks: list[int]) -> list[dict]:
    """The LoRA runs after the learning-rate choice: rank sweep on attention + shared experts with the gates, then
    the other target sets at rank 8, then rank 8 without the gates."""
    out = [{"rank": r, "targets": "attn,shared", "gates": True} for r in ranks if r != 8]
    out += [{"rank": 8, "targets": t, "gates": True} for t in ("attn_out,shared", "shared", "attn,shared,dense")]
    return out + [{"rank": 8, "targets": "attn,shared", "gates": False}]


def prepare(tmp: Path, keep: int, seq_len: int = 128) -> dict[str, Path]:
    """Teacher caches of three disjoint sets of standard-library files (KD top-256 of 256 sequences, validation
    and held-out over the full vocabulary) and the teacher REAP-pruned to `keep` experts."""
    import torch
    from kd_recovery import write_jsonl
    from transformers import AutoTokenizer

    from glmgguf.kd.teacher import build_teacher_cache, file_hashes
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.data import pack
    from glmgguf.reap.observe import observe
    from glmgguf.reap.prune import plan_prune, prune_checkpoint
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus, trained_testbed

    teacher = trained_testbed("tiny")
    tok = AutoTokenizer.from_pretrained(teacher)
    train, held = [d for d in stdlib_corpus("train") if d.strip()], [d for d in stdlib_corpus("heldout") if d.strip()]
    docs = {"val": train[:60], "held": held}
    docs["kd"] = [d for d in train[60:] if d not in set(docs["val"]) | set(held)]
    paths = {}
    for name, n, k in (("kd", 256, 256), ("val", 32, 1 << 30), ("held", 48, 1 << 30)):
        seqs = pack(docs[name], tok, seq_len, num_samples=n, seed=0).sequences
        text = {"files": file_hashes([write_jsonl(tmp / f"{name}.jsonl", docs[name])])}
        paths[name] = build_teacher_cache(teacher, seqs, tmp / f"cache-{name}", top_k=k, dtype=torch.float32,
                                          batch_size=8, text=text).path
    cal = pack(docs["kd"], tok, seq_len, num_samples=32, seed=1).sequences
    stats = observe(teacher, chunk_sequences(cal, 8), streaming=False, dtype=torch.float32)
    prune_checkpoint(teacher, plan_prune(GlmLayout.from_dir(teacher), stats, keep=keep), tmp / "pruned")
    return {**paths, "pruned": tmp / "pruned"}


def kl(model: Path, cache: Path, adapter: Path | None = None) -> dict:
    from glmgguf.kd.evaluate import evaluate

    r = evaluate(model, cache, mtp=False, adapter=adapter)
    return {"kl": r.kl, "top1": r.top1, "positions": r.positions}


def train(io: dict[str, Path], name: str, args: list[str], env: dict) -> dict:
    """One `glmgguf kd ...` training process (OUT = WORK/NAME): wall time, peak RSS, its log's figures, and the
    validation and held-out KL of its result."""
    out = io["work"] / name
    stats = measure([sys.executable, "-m", "glmgguf", "kd", *args, "--teacher-cache", str(io["kd"]), "--out",
                     str(out), *COMMON], env=env, log=io["work"] / f"{name}.log")
    if stats["returncode"]:
        raise SystemExit(f"{name} failed: see {io['work'] / f'{name}.log'}")
    lora = args[0] == "lora"
    log = json.loads((out / ("lora_train_log.json" if lora else "kd_train_log.json")).read_text())
    model, adapter = (Path(args[1]), out) if lora else (out, None)
    return {"name": name, "wall_s": stats["wall_s"], "peak_rss_bytes": stats["peak_rss_bytes"],
            "seconds_per_step": log["seconds_per_step"], "trainable_parameters": log["trainable_parameters"],
            "val": kl(model, io["val"], adapter), "held": kl(model, io["held"], adapter), "out": str(out)}


def best(runs: list[dict]) -> dict:
    """The run with the lowest validation KL (the learning rate is chosen there, never on the held-out text)."""
    return min(runs, key=lambda r: r["val"]["kl"])


def router_kd(io: dict[str, Path], steps: int, lrs: list[float], env: dict) -> list[dict]:
    return [train(io, f"kd-{steps}-lr{lr:g}", ["train", str(io["pruned"]), "--steps", str(steps), "--lr", str(lr),
                                                "--no-mtp"], env) | {"lr": lr, "steps": steps} for lr in lrs]


def lora(io: dict[str, Path], base: Path, cfg: dict, steps: int, lr: float, env: dict) -> dict:
    name = f"lora-r{cfg['rank']}-{cfg['targets'].replace(',', '+')}{'' if cfg['gates'] else '-nogates'}-lr{lr:g}"
    gates = ["--train-gates", "--gate-lr", str(3 * lr)] if cfg["gates"] else []
    args = ["lora", str(base), "--steps", str(steps), "--lr", str(lr), "--rank", str(cfg["rank"]), "--target",
            cfg["targets"], *gates]
    return train(io, name, args, env) | cfg | {"lr": lr, "steps": steps}


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
                                "lora_bytes": e.per_gpu_bytes + 16 * params // g["world"],  # adapter state sharded
                                "router_kd_s_per_step": e.seconds_per_step,
                                "lora_s_per_step": e.seconds_per_step * step_ratio,
                                "lora_hours": e.hours(g["steps"]) * step_ratio} for e in est}}


def table(doc: dict) -> str:
    pruned, kd = doc["pruned"]["kl"], doc["router_kd"]["held"]["kl"]
    lines = ["| model | lr | trainable parameters | held-out KL | vs pruned | vs Router-KD | s/step | peak RSS |",
             "|---|---|---|---|---|---|---|---|", f"| pruned | - | - | {pruned:.5f} | - | - | - | - |"]
    rows = [("Router-KD", doc["router_kd"]), (f"Router-KD, {2 * doc['steps']} steps", doc["router_kd_2x"])]
    rows += [(f"+ LoRA r{r['rank']} {r['targets']}" + (" + gates" if r["gates"] else ""), r) for r in doc["lora"]]
    for what, r in rows:
        k = r["held"]["kl"]
        lines.append(f"| {what} | {r['lr']:g} | {r['trainable_parameters']:,} | {k:.5f} | "
                     f"{100 * (k / pruned - 1):+.1f}% | {100 * (k / kd - 1):+.1f}% | {r['seconds_per_step']:.3f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def measure_all(a: argparse.Namespace, env: dict) -> dict:
    """Router-KD at each learning rate (chosen on validation), twice as long at the chosen one, then LoRA-KD on the
    chosen Router-KD checkpoint: the default configuration at each learning rate, the others at the chosen one."""
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        io = {**prepare(Path(tmp), a.keep), "work": Path(tmp)}
        kd_runs = router_kd(io, a.steps, a.kd_lrs, env)
        kd = best(kd_runs)
        kd2 = router_kd(io, 2 * a.steps, [kd["lr"]], env)[0]
        default = {"rank": 8, "targets": "attn,shared", "gates": True}
        lr_runs = [lora(io, Path(kd["out"]), default, a.steps, lr, env) for lr in a.lora_lrs]
        chosen = best(lr_runs)
        others = [lora(io, Path(kd["out"]), c, a.steps, chosen["lr"], env) for c in configs(a.ranks)]
        return {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "keep": a.keep,
                "steps": a.steps, "pruned": kl(io["pruned"], io["held"]), "router_kd": kd, "router_kd_lrs": kd_runs,
                "router_kd_2x": kd2, "lora_lrs": lr_runs, "lora": [chosen, *others]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, default=8, help="experts kept of the testbed's 16")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--kd-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--lora-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--no-run", action="store_true", help="Only redo the GLM-5.2 arithmetic of the results file.")
    a = ap.parse_args()
    doc = json.loads(RESULTS.read_text()) if a.no_run else measure_all(a, {**os.environ, "OMP_NUM_THREADS": "1"})
    default = doc["lora"][0]
    kd_s = [r["seconds_per_step"] for r in (doc["router_kd"], doc["router_kd_2x"])]
    measured = default["seconds_per_step"] / (sum(kd_s) / len(kd_s))
    ratio = max(1.0, measured)  # LoRA-KD does Router-KD's work and more: a ratio below 1 is the machine's noise
    doc["glm52"] = {"assume": GLM52, "measured_step_ratio": measured, "step_ratio": ratio,
                    "rank8_attn_shared_gates": glm52_cost(8, "attn,shared", True, ratio)}
    doc["table"] = table(doc)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["table"])
    g = doc["glm52"]["rank8_attn_shared_gates"]
    print(f"GLM-5.2 at 168 experts, rank 8 on attention + shared experts + gates: {g['adapter_parameters']:,} "
          f"trainable parameters; LoRA / Router-KD step time {measured:.2f}x measured, {ratio:.2f}x used; "
          "8 x H100 offloaded: "
          f"{g['per_gpu']['H100']['lora_hours']:.1f} h for {GLM52['steps']} steps")


if __name__ == "__main__":
    main()
