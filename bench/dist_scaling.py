#!/usr/bin/env python3
"""torchrun scaling on this machine (1 vs 2 CPU ranks) and the per-GPU memory model of FSDP Router-KD for GLM-5.2.

    python bench/dist_scaling.py [--ranks 2] [--no-run]

Measured (trained tiny testbed, float32, one thread per rank, each run a fresh process): `reap observe
--streaming` tokens/s and `kd train` steps/s (`--fsdp` under torchrun) as one process and as N gloo ranks. On a
2-core machine shared with other work the ratio is a floor, not a forecast for GPUs. `--no-run` redoes only the
arithmetic.

Modelled (arithmetic from GLM-5.2's layout pruned to `keep` experts; assumptions in ASSUME): per-GPU memory of
`kd train --fsdp` on 8 x H100 / H200 / B200, with and without `--cpu-offload`: the parameter shard, the largest
FSDP unit gathered twice (the running one and the prefetched next), the root unit (embeddings, LM head, MTP
projections), the float32 gates with gradient and AdamW state (sharded), activations under checkpointing
(layer-boundary hidden states, one layer's working set, float32 logits); and the time per step as the larger of
compute (all GPUs busy) and parameter traffic (three gathers per step: forward, recomputation, backward; NVLink
or, offloaded, PCIe from host memory). Writes bench/results/dist_scaling.json.
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

from glmgguf.pipeline.fsdp_estimate import GPUS, FsdpAssumptions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dist_scaling.json"
GB = 10**9
ASSUME = {  # the run the bench models; the GPUs and the model's constants are glmgguf.pipeline.fsdp_estimate's
    "n_gpus": 8, "keep": 168, "batch": 8, "seq_len": 2048, "steps": 1000,
    **{k: v for k, v in vars(FsdpAssumptions()).items()},
    "gpus": {name: vars(g) for name, g in GPUS.items()},
}


def glmgguf(*args: str) -> list[str]:
    return [sys.executable, "-m", "glmgguf", *args]


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", "29533",
            "-m", "glmgguf", *args]


def _run(cmd: list[str], log: Path) -> dict:
    r = measure(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, log=log)
    if r["returncode"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return r


def measured(ranks: int, tmp: Path) -> dict:
    """tokens/s of streaming observe and steps/s of Router-KD, one process vs `ranks` gloo ranks."""
    from glmgguf.testbed import stdlib_corpus, trained_testbed

    model = trained_testbed("tiny")
    text = tmp / "text.jsonl"
    text.write_text("".join(json.dumps({"text": d[:6000]}) + "\n" for d in stdlib_corpus("train")[:60]))
    tx = ["--data", str(text), "--seq-len", "128", "--num-samples", "16", "--batch-size", "2", "--dtype", "f32"]
    out: dict = {"observe": {}, "kd": {}}
    for n in (1, ranks):
        args = ["reap", "observe", str(model), *tx, "--streaming", "--out", str(tmp / f"stats{n}.safetensors")]
        r = _run(glmgguf(*args) if n == 1 else torchrun(n, *args), tmp / "observe.log")
        secs = json.loads((tmp / f"stats{n}.json").read_text())["meta"]["seconds"]
        out["observe"][n] = {"tokens_per_s": 16 * 128 / secs, "process_wall_s": r["wall_s"]}
    _run(glmgguf("reap", "prune", str(model), "--stats", str(tmp / "stats1.safetensors"), "--keep", "8", "--out",
                 str(tmp / "pruned")), tmp / "prune.log")
    _run(glmgguf("kd", "teacher", str(model), *tx, "--out", str(tmp / "cache"), "--top-k", "64"), tmp / "t.log")
    for n in (1, ranks):
        args = ["kd", "train", str(tmp / "pruned"), "--teacher-cache", str(tmp / "cache"), "--out",
                str(tmp / f"kd{n}"), "--steps", "8", "--batch-size", "4", "--save-every", "0"]
        r = _run(glmgguf(*args) if n == 1 else torchrun(n, *args, "--fsdp"), tmp / "kd.log")
        sps = json.loads((tmp / f"kd{n}" / "kd_train_log.json").read_text())["seconds_per_step"]
        out["kd"][n] = {"steps_per_s": 1 / sps, "process_wall_s": r["wall_s"]}
    for what, key in (("observe", "tokens_per_s"), ("kd", "steps_per_s")):
        out[what]["speedup"] = out[what][ranks][key] / out[what][1][key]
        print(f"{what}: {out[what][1][key]:.2f} -> {out[what][ranks][key]:.2f} {key.replace('_per_s', '/s')} with "
              f"{ranks} ranks (x{out[what]['speedup']:.2f})", flush=True)
    return out


def glm52_memory() -> dict:
    """Per-GPU memory and time per step of FSDP Router-KD of GLM-5.2 pruned to ASSUME['keep'] experts: the model of
    `glmgguf.pipeline.fsdp_estimate`, which `pipeline --dry-run` prints for a plan with [launch]."""
    from glmgguf.pipeline.estimate import pruned_layout, tensor_bytes
    from glmgguf.pipeline.fsdp_estimate import GPUS, fsdp_kd_estimate, fsdp_kd_parts

    a = ASSUME
    lay = pruned_layout(glm52_layout(), a["keep"], None)
    n, batch, seq = a["n_gpus"], a["batch"], a["seq_len"]
    parts = fsdp_kd_parts(lay, n, batch, seq)
    weights = tensor_bytes(lay)[0]
    out = {"student_bf16_gb": weights / GB, "largest_unit_gb": parts["gathered_units"] / 2 / GB,
           "root_unit_gb": parts["root_unit"] / GB, "activations_gb": parts["activations"] / GB,
           "gates_with_adamw_gb_per_gpu": parts["gates_adamw"] / GB, "gpus": {}}
    offloaded = {e.gpu: e for e in fsdp_kd_estimate(lay, n, batch, seq, cpu_offload=True)}
    for e in fsdp_kd_estimate(lay, n, batch, seq, cpu_offload=False):
        o = offloaded[e.gpu]
        out["gpus"][e.gpu] = {
            "memory_gb": GPUS[e.gpu].memory_gb, "per_gpu_gb": e.per_gpu_bytes / GB,
            "per_gpu_gb_cpu_offload": o.per_gpu_bytes / GB, "host_gb_per_node_cpu_offload": weights / GB,
            "fits": e.fits, "fits_cpu_offload": o.fits, "compute_s_per_step": e.compute_seconds,
            "s_per_step": e.seconds_per_step,
            "s_per_step_cpu_offload": o.seconds_per_step,
            "hours": e.hours(a["steps"]) if e.fits else None, "hours_cpu_offload": o.hours(a["steps"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="only the GLM-5.2 arithmetic")
    args = ap.parse_args()
    res = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "assume": ASSUME,
           "glm52_fsdp_kd": glm52_memory()}
    if args.no_run and RESULTS.is_file():
        res["measured"] = json.loads(RESULTS.read_text()).get("measured")
    elif not args.no_run:
        with tempfile.TemporaryDirectory(prefix="dist-scaling-") as tmp:
            res["measured"] = measured(args.ranks, Path(tmp))
    for gpu, g in res["glm52_fsdp_kd"]["gpus"].items():
        print(f"GLM-5.2 keep {ASSUME['keep']}, 8 x {gpu}: {g['per_gpu_gb']:.0f} GB per GPU "
              f"({'fits' if g['fits'] else 'does not fit'} {g['memory_gb']} GB), {g['s_per_step']:.1f} s/step; "
              f"--cpu-offload {g['per_gpu_gb_cpu_offload']:.0f} GB per GPU, {g['s_per_step_cpu_offload']:.1f} s/step")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
