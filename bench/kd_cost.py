#!/usr/bin/env python3
"""Router-KD cost: step time and peak memory on the `small` testbed (CPU), and the extrapolation to GLM-5.2.

    python bench/kd_cost.py [--steps 8] [--threads 2]

The small testbed (8 layers, 64 experts, 716 MiB BF16; random weights are enough for timing) is REAP-pruned to
42 of 64 experts, a teacher cache of 16 x 256 tokens (top-64) is made, then `glmgguf kd train` runs in a fresh
process with and without gradient checkpointing; its seconds per step (from the training log) and peak RSS (of
the process) are reported. The GLM-5.2 part is arithmetic from the layout (assumptions in ASSUME): FLOPs of the
forward, the backward through the activations (no weight gradients except the routers') and the recomputation
under checkpointing; memory of the frozen BF16 student; and time on 8 GPUs with accelerate's device_map="auto",
which places consecutive layers on consecutive GPUs (one GPU busy at a time); no time is given where the student
does not fit the GPUs (host-RAM offload speed is not modelled). `--no-run` redoes only the arithmetic and keeps the
last small-testbed measurement. Writes bench/results/kd_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reap_memory import glm52_layout, testbed_dir  # noqa: E402
from upstream import measure  # noqa: E402

from glmgguf.pipeline.fsdp_estimate import param_counts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kd_cost.json"
GB = 10**9
ASSUME = {
    "gpu_bf16_dense_tflops": {"H100": 989.0, "H200": 989.0, "B200": 2250.0},
    "gpu_memory_gb": {"H100": 80, "H200": 141, "B200": 192},
    "mfu": 0.35,
    "keep": 168, "steps": 1000, "batch": 8, "seq_len": 2048,
}


def glmgguf(*args: str) -> list[str]:
    return [sys.executable, "-m", "glmgguf", *args]


def small_testbed_steps(steps: int, threads: int, tmp: Path) -> dict:
    model = testbed_dir("small")
    text = tmp / "kd.jsonl"
    from glmgguf.testbed import stdlib_corpus

    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_corpus("train")[:200] if d.strip()))
    common = ["--data", str(text), "--seq-len", "256", "--num-samples", "16", "--threads", str(threads)]
    for cmd in (glmgguf("reap", "observe", str(model), *common[:6], "--out", str(tmp / "stats.safetensors"),
                        "--dtype", "f32"),
                glmgguf("reap", "prune", str(model), "--stats", str(tmp / "stats.safetensors"), "--keep", "42",
                        "--out", str(tmp / "pruned")),
                glmgguf("kd", "teacher", str(model), *common, "--out", str(tmp / "cache"), "--top-k", "64",
                        "--dtype", "f32")):
        r = measure(cmd, log=tmp / "prep.log")
        if r["returncode"] != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{(tmp / 'prep.log').read_text()[-3000:]}")
    out = {}
    for label, extra in (("gradient checkpointing", []), ("no checkpointing", ["--no-gradient-checkpointing"])):
        dst = tmp / f"kd-{len(extra)}"
        r = measure(glmgguf("kd", "train", str(tmp / "pruned"), "--teacher-cache", str(tmp / "cache"), "--out",
                            str(dst), "--steps", str(steps), "--batch-size", "4", "--threads", str(threads),
                            "--save-every", "0", *extra), log=tmp / "train.log")
        if r["returncode"] != 0:
            raise SystemExit((tmp / "train.log").read_text()[-3000:])
        log = json.loads((dst / "kd_train_log.json").read_text())
        out[label] = {"seconds_per_step": log["seconds_per_step"], "peak_rss_mib": r["peak_rss_bytes"] / 2**20,
                      "other_cpu_s": r.get("other_cpu_s"), "trainable": log["trainable_parameters"],
                      "total": log["total_parameters"]}
        print(f"small testbed, {label}: {log['seconds_per_step']:.2f} s/step (batch 4 x 256 tokens, "
              f"{threads} threads), peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return out


def glm52_extrapolation() -> dict:
    """GLM-5.2 pruned to ASSUME['keep'] experts: FLOPs, memory and time of the KD run on 8 GPUs."""
    from glmgguf.pipeline.estimate import pruned_layout, tensor_bytes

    lay = pruned_layout(glm52_layout(), ASSUME["keep"], None)
    pp = param_counts(lay)
    tokens = ASSUME["steps"] * ASSUME["batch"] * ASSUME["seq_len"]
    active = pp["trunk_active_per_token"] + pp["layers"][lay.n_layers]["active_params"]
    flops = tokens * 2 * active * 3  # forward, backward through activations, recomputed forward
    weights = tensor_bytes(lay)[0]
    routers = sum(x.n_experts * lay.hidden_size for x in lay.moe_layers)
    out = {"tokens": tokens, "active_params_per_token": active, "flops": flops, "student_bf16_gb": weights / GB,
           "trainable_params": routers, "adamw_state_gb": routers * 4 * 3 / GB, "gpus": {}}
    for gpu, tflops in ASSUME["gpu_bf16_dense_tflops"].items():
        mem = ASSUME["gpu_memory_gb"][gpu] * 8
        sustained = tflops * 1e12 * ASSUME["mfu"]
        fits = weights / GB < 0.9 * mem  # a student that does not fit is offloaded to host RAM: not estimated
        out["gpus"][gpu] = {
            "fits_8_gpus": fits,
            "memory_8_gpus_gb": mem,
            "hours_device_map_auto": flops / sustained / 3600 if fits else None,  # one GPU busy at a time
            "hours_if_pipelined": flops / (8 * sustained) / 3600 if fits else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="only the GLM-5.2 arithmetic")
    args = ap.parse_args()
    res = {"machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
           "assume": ASSUME, "glm52": glm52_extrapolation()}
    if not args.no_run:
        with tempfile.TemporaryDirectory() as tmp:
            res["small_testbed"] = small_testbed_steps(args.steps, args.threads, Path(tmp))
    elif RESULTS.is_file():  # keep the last measurement
        res["small_testbed"] = json.loads(RESULTS.read_text()).get("small_testbed")
    g = res["glm52"]
    print(f"GLM-5.2 keep {ASSUME['keep']}: {g['tokens'] / 1e6:.1f} M tokens, {g['flops']:.2e} FLOPs, student "
          f"{g['student_bf16_gb']:.0f} GB BF16, {g['trainable_params']:,} trainable")
    for gpu, v in g["gpus"].items():
        hours = (f"device_map auto {v['hours_device_map_auto']:.1f} h, pipelined {v['hours_if_pipelined']:.1f} h"
                 if v["fits_8_gpus"] else "needs CPU offload: not estimated")
        print(f"  8 x {gpu}: fits {v['fits_8_gpus']} ({v['memory_8_gpus_gb']} GB), {hours}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
