#!/usr/bin/env python3
"""Peak memory and speed of `reap observe` in-memory vs --streaming, and what that means for GLM-5.2.

    python bench/reap_memory.py [--seqs 8] [--seq-len 256] [--dtype bf16]

On the `small` testbed (random init, built under `<cache>/bench/` like the convert benchmark) each mode runs in a
fresh subprocess that reports its peak RSS (ru_maxrss) and tokens/s; a bare subprocess that only imports the
same libraries gives the floor every Python process pays. Both modes' statistics are compared. Then the same
arithmetic, with GLM-5.2's real shapes (REFERENCE.md section 1), extrapolates time, GPU memory, host memory and
disk for 1024 x 2048-token samples on one H100 and on eight. Writes bench/results/reap_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glmgguf.pipeline.fsdp_estimate import param_counts

RESULTS = Path(__file__).resolve().parent / "results" / "reap_memory.json"
MiB, GB = 2**20, 1e9


# ---------------------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------------------

def child(mode: str, model: str, calib: str, dtype: str, out: str, work: str) -> None:
    import torch

    import glmgguf.reap.observe as obs
    from glmgguf.runner import chunk_sequences

    seqs = torch.load(calib)
    chunks = chunk_sequences(seqs, 4)
    t0 = time.perf_counter()
    result: dict = {"mode": mode}
    if mode != "floor":
        spill = {"streaming": 1 << 40, "streaming-spill": 0}.get(mode, 0)
        stats = obs.observe(model, chunks, streaming=mode.startswith("streaming"), dtype=getattr(torch, dtype),
                            work_dir=Path(work), spill_bytes=spill)
        stats.save(out, force=True)
        wall = time.perf_counter() - t0
        result.update(wall_s=round(wall, 3), tokens=int(seqs.numel()), tokens_per_s=round(seqs.numel() / wall, 1),
                      spilled=bool(stats.meta.get("spilled", False)))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(mode: str, model: Path, calib: Path, dtype: str, out: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(model), "--calib", str(calib), "--dtype", dtype,
           "--stats-out", str(out), "--work", str(work)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return res


# ---------------------------------------------------------------------------------------------------------------
# Layer arithmetic (shared by the measured model and the GLM-5.2 extrapolation)
# ---------------------------------------------------------------------------------------------------------------

def glm52_layout():
    """GLM-5.2's layout, from the config the example plan uses (examples/glm52_config.json)."""
    from glmgguf.layout import GlmLayout

    return GlmLayout.from_config(json.loads((Path(__file__).resolve().parent.parent / "examples"
                                            / "glm52_config.json").read_text()))


# Assumptions of the extrapolation (stated in the results file; change them here).
ASSUME = {
    "h100_bf16_dense_tflops": 989.0,  # H100 SXM bf16 dense peak
    "mfu": 0.35,  # achieved fraction: per-expert GEMMs of ~500-2000 rows, attention through SDPA with a mask
    "nvme_read_gbs": 5.0,  # one local NVMe, sequential
    "nvme_write_gbs": 3.0,
    "pcie_gbs": 25.0,  # host <-> GPU, pinned-ish copies
    "chunk_seqs": 4,  # --batch-size
}


def extrapolate(n_samples: int = 1024, seq_len: int = 2048) -> dict:
    lay = glm52_layout()
    pp = param_counts(lay)
    tokens = n_samples * seq_len
    bf16 = 2
    h, heads = lay.hidden_size, lay.n_heads
    qk = lay.qk_nope_head_dim + lay.qk_rope_head_dim
    largest_layer = max(v["params"] for v in pp["layers"].values()) * bf16
    # FLOPs: 2 per active weight per token, plus attention scores/values. transformers' SDPA path computes the full
    # causal S x S product with a mask (DSA selects, it does not skip work): ~S/2 keys per query on average, but
    # dense kernels do all S.
    attn_flops_tok = 2 * heads * seq_len * (qk + lay.v_head_dim) * lay.block_count
    n_full = sum(1 for x in lay.layers if x.indexer == "full")
    indexer_flops_tok = 2 * lay.index_n_heads * seq_len * lay.index_head_dim * n_full
    mtp_active = pp["layers"][lay.n_layers]["active_params"]
    flops = tokens * (2 * (pp["trunk_active_per_token"] + mtp_active) + attn_flops_tok + indexer_flops_tok)
    sustained = ASSUME["h100_bf16_dense_tflops"] * 1e12 * ASSUME["mfu"]
    compute_s = flops / sustained
    weights_bytes = pp["total"] * bf16
    weights_read_s = weights_bytes / (ASSUME["nvme_read_gbs"] * GB)
    hidden_bytes = tokens * h * bf16
    topk_bytes = tokens * min(lay.index_topk, seq_len) * 4
    blocks = lay.block_count
    n_full_trunk = n_full
    # per block: read hidden in, write hidden out; full layers also write a new top-k, shared ones read it
    act_disk_s = (blocks * hidden_bytes / (ASSUME["nvme_read_gbs"] * GB)
                  + blocks * hidden_bytes / (ASSUME["nvme_write_gbs"] * GB)
                  + n_full_trunk * topk_bytes / (ASSUME["nvme_write_gbs"] * GB)
                  + (lay.n_layers - n_full_trunk) * topk_bytes / (ASSUME["nvme_read_gbs"] * GB))
    act_ram_s = blocks * (2 * hidden_bytes + topk_bytes) / (ASSUME["pcie_gbs"] * GB)
    chunk_tokens = ASSUME["chunk_seqs"] * seq_len
    # working set of one chunk on the GPU: hidden in/out + q/k/v of all heads + SDPA mask + indexer scores (f32)
    chunk_act = (chunk_tokens * h * bf16 * 4
                 + chunk_tokens * heads * (2 * qk + lay.v_head_dim) * bf16
                 + ASSUME["chunk_seqs"] * seq_len * seq_len * 1
                 + chunk_tokens * lay.index_n_heads * seq_len * 4)
    one = {
        "gpu_memory_gb": round((largest_layer + chunk_act) / GB, 1),
        "host_rss_gb_activations_on_disk": round((lay.vocab_size * h * bf16 + 2 * GB) / GB, 1),
        "host_rss_gb_activations_in_ram": round((2 * hidden_bytes + 2 * topk_bytes + 2 * GB) / GB, 1),
        "disk_gb_activations": round((2 * hidden_bytes + 2 * topk_bytes) / GB, 1),
        "compute_min": round(compute_s / 60, 1),
        "weights_read_min": round(weights_read_s / 60, 1),
        "activations_nvme_min": round(act_disk_s / 60, 1),
        "activations_ram_min": round(act_ram_s / 60, 1),
    }
    one["total_min_activations_on_nvme"] = round(one["compute_min"] + one["weights_read_min"]
                                                 + one["activations_nvme_min"], 1)
    one["total_min_activations_in_ram"] = round(one["compute_min"] + one["weights_read_min"]
                                                + one["activations_ram_min"], 1)
    eight = {
        "in_memory_feasible": weights_bytes < 8 * 80 * GB,
        "why": f"BF16 weights are {weights_bytes / GB:.0f} GB > 8 x 80 GB: device_map='auto' would offload "
               "to CPU; run 8 streaming processes instead (one per GPU, --device cuda:i, 1/8 of the "
               "samples each) and `glmgguf reap merge` their statistics",
        "compute_min": round(compute_s / 8 / 60, 1),
        "weights_read_min_shared_page_cache": round(weights_read_s / 60, 1),
        "weights_read_min_no_page_cache": round(8 * weights_read_s / 60, 1),
        "activations_nvme_min_per_process": round(act_disk_s / 8 / 60, 1),
        "gpu_memory_gb_each": one["gpu_memory_gb"],
        "disk_gb_activations_total": one["disk_gb_activations"],
    }
    eight["total_min_best"] = round(eight["compute_min"] + eight["weights_read_min_shared_page_cache"]
                                    + eight["activations_nvme_min_per_process"], 1)
    eight["total_min_worst"] = round(eight["compute_min"] + eight["weights_read_min_no_page_cache"]
                                     + 8 * eight["activations_nvme_min_per_process"], 1)
    reference_observer_flops = tokens * 2 * sum(v["params"] for k, v in pp["layers"].items() if k < lay.n_layers)
    return {
        "model": "GLM-5.2", "samples": n_samples, "seq_len": seq_len, "tokens": tokens,
        "params_total": pp["total"], "params_active_per_token": pp["trunk_active_per_token"] + mtp_active,
        "largest_block_gb_bf16": round(largest_layer / GB, 2), "weights_gb_bf16": round(weights_bytes / GB, 1),
        "hidden_states_gb": round(hidden_bytes / GB, 1), "dsa_topk_gb": round(topk_bytes / GB, 1),
        "flops": flops, "assumptions": ASSUME,
        "one_h100_streaming": one, "eight_h100": eight,
        "all_experts_on_all_tokens_flops": reference_observer_flops,
        "routed_only_saving": round(reference_observer_flops / flops, 1),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------

def testbed_dir(size: str, seed: int = 0) -> Path:
    from glmgguf.cache import cache_root
    from glmgguf.testbed.build import build_testbed

    path = cache_root() / "bench" / f"testbed-{size}-seed{seed}"
    if not (path / "config.json").is_file():
        print(f"building the {size} testbed into {path} ...", flush=True)
        build_testbed(path, size=size, seed=seed, force=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--stats-out")
    ap.add_argument("--work")
    ap.add_argument("--size", default="small")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.calib, args.dtype, args.stats_out, args.work)
        return

    import torch
    from transformers import AutoTokenizer

    from glmgguf.layout import GlmLayout
    from glmgguf.reap.data import pack
    from glmgguf.reap.stats import ReapStats
    from glmgguf.testbed import stdlib_corpus

    model = testbed_dir(args.size)
    lay = GlmLayout.from_dir(model)
    tok = AutoTokenizer.from_pretrained(model)
    seqs = pack(stdlib_corpus("train"), tok, args.seq_len, num_samples=args.seqs, seed=0).sequences
    pp = param_counts(lay)
    el = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.pt"
        torch.save(seqs, calib)
        for p in sorted(model.iterdir()):  # warm the page cache so no mode pays for a cold read
            if p.is_file():
                p.read_bytes()
        for mode in ("floor", "in-memory", "streaming", "streaming-spill"):
            results[mode] = run_child(mode, model, calib, args.dtype, Path(tmp) / f"{mode}.safetensors",
                                      Path(tmp) / f"{mode}.work")
            r = results[mode]
            print(f"{mode:16s} peak RSS {r['peak_rss_bytes'] / MiB:8.1f} MiB"
                  + (f"   {r['tokens_per_s']:8.1f} tok/s ({r['wall_s']:.1f} s)" if "wall_s" in r else ""),
                  flush=True)
        a = ReapStats.load(Path(tmp) / "in-memory.safetensors")
        agreement = {}
        for mode in ("streaming", "streaming-spill"):
            b = ReapStats.load(Path(tmp) / f"{mode}.safetensors")
            worst = 0.0
            for L in a.layers:
                for k in ("reap_sum", "ean_sum", "count", "input_amax"):
                    x, y = a.layers[L][k].double(), b.layers[L][k].double()
                    worst = max(worst, float(((x - y).abs() / y.abs().clamp_min(1e-12)).max()))
            agreement[mode] = worst
    floor = results["floor"]["peak_rss_bytes"]
    largest = max(v["params"] for v in pp["layers"].values()) * el
    act = seqs.numel() * (lay.hidden_size * el + min(lay.index_topk, args.seq_len) * 4)
    measured = {
        "model": f"{args.size} testbed", "params": pp["total"], "weights_bytes": pp["total"] * el,
        "largest_block_bytes": largest, "activation_bytes": act, "dtype": args.dtype,
        "tokens": int(seqs.numel()), "seqs": args.seqs, "seq_len": args.seq_len,
        "modes": results,
        "above_floor_mib": {m: round((r["peak_rss_bytes"] - floor) / MiB, 1) for m, r in results.items()},
        "stats_max_rel_diff_vs_in_memory": agreement,
    }
    ext = extrapolate()
    out = {"measured": measured, "glm52_extrapolation": ext, "python": sys.version.split()[0],
           "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print()
    print(f"small testbed: weights {pp['total'] * el / MiB:.0f} MiB, largest block {largest / MiB:.0f} MiB, "
          f"activations {act / MiB:.1f} MiB; RSS above the import floor: {measured['above_floor_mib']}")
    print(f"stats agreement (max rel diff vs in-memory): {agreement}")
    print(json.dumps(ext, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
