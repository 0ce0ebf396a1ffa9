#!/usr/bin/env python3
"""Throughput of `glmgguf nvfp4 export` on GLM-5.2-shaped experts, extrapolated to GLM-5.2's expert weights.

    python bench/nvfp4_export.py [--experts 4] [--threads 1 --threads 2] [--device cpu --device cuda]

Builds (or reuses) a synthetic checkpoint under `<cache>/bench/` whose routed experts have GLM-5.2's shapes
(hidden 6144, moe_intermediate 2048: gate/up [2048, 6144], down [6144, 2048], BF16) in one MoE layer plus the MTP
block, everything else tiny, with synthetic REAP statistics. Then, per device and thread count: the end-to-end
export (read, quantize, write, in `--format modelopt`) and the bare quantization kernel on one expert. Rates are
BF16 expert bytes per second; the extrapolation is to 1.4 TB of GLM-5.2 expert weights (75 MoE layers + MTP x
256 experts x 3 x 2048 x 6144 x 2 bytes = 1.45e12). Results go to bench/results/nvfp4_export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "nvfp4_export.json"
GLM52_EXPERT_BYTES = 76 * 256 * 3 * 2048 * 6144 * 2
GB = 1e9


def synthetic_config(n_experts: int) -> dict:
    from glmgguf.testbed.configs import testbed_config_kwargs

    cfg = testbed_config_kwargs("tiny")
    cfg.update(hidden_size=6144, moe_intermediate_size=2048, intermediate_size=512, num_hidden_layers=2,
               first_k_dense_replace=1, n_routed_experts=n_experts, num_experts_per_tok=2, num_attention_heads=2,
               num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=64, index_n_heads=2,
               indexer_types=["full", "shared"])
    return {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa", **cfg}


def build_checkpoint(path: Path, n_experts: int) -> Path:
    from glmgguf.io import ShardedWriter
    from glmgguf.layout import GlmLayout

    if (path / "config.json").is_file():
        return path
    cfg = synthetic_config(n_experts)
    layout = GlmLayout.from_config(cfg)
    shapes = layout.expected_hf_tensors(mtp_indexer=False)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    plan = [(n, s, torch.bfloat16) for n, s in shapes.items()]
    print(f"building {path} ({sum(torch.Size(s).numel() for s in shapes.values()) * 2 / GB:.2f} GB) ...",
          flush=True)
    with ShardedWriter(tmp, plan, max_shard_bytes=2 * 1024**3) as w:
        for n, s, _ in plan:
            t = torch.randn(s, generator=gen) * 0.02 if len(s) == 2 else torch.ones(s)
            if len(s) == 2 and s[0] >= 2048:  # a few heavy outliers per row, like real expert weights
                t[:, :: 997] *= 30
            w.add(n, t.bfloat16())
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(path)
    return path


def synthetic_stats(layout, path: Path) -> Path:
    from glmgguf.reap.stats import ReapStats, empty_layer, model_fingerprint

    stats = ReapStats(model_fingerprint(layout), meta={"synthetic": True})
    gen = torch.Generator().manual_seed(1)
    for layer in layout.moe_layers:
        t = empty_layer(layer.n_experts)
        t["count"] = torch.randint(1, 1000, (layer.n_experts,), generator=gen)
        t["count"][0] = 0  # one expert never routed: exercises the fallback
        t["input_amax"] = torch.rand(layer.n_experts, generator=gen) * 20 + 1
        t["down_input_amax"] = torch.rand(layer.n_experts, generator=gen) * 50 + 1
        stats.layers[layer.index] = t
        stats.tokens[layer.index] = 1000
    stats.save(path, force=True)
    return path


def kernel_rate(device: torch.device, threads: int, repeat: int = 3) -> tuple[float, float]:
    """BF16 bytes per wall second and per CPU second of `quantize` alone on one GLM-5.2 gate_proj (no I/O)."""
    from glmgguf.nvfp4 import quant as nq

    torch.set_num_threads(threads)
    w = (torch.randn(2048, 6144) * 0.02).bfloat16().to(device)
    nq.quantize(w)  # warm-up
    best = best_cpu = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        q = nq.quantize(w)
        q.weight.cpu()
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return w.numel() * 2 / best, w.numel() * 2 / best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=4, help="experts per MoE layer of the synthetic checkpoint")
    ap.add_argument("--threads", type=int, action="append", help="CPU thread counts to measure  [default: 1, auto]")
    ap.add_argument("--device", action="append", help="devices  [default: cpu, and cuda when available]")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from glmgguf.cache import cache_root
    from glmgguf.layout import GlmLayout
    from glmgguf.nvfp4.export import export_nvfp4, plan_export
    from glmgguf.threads import free_cores

    work = cache_root() / "bench"
    src = build_checkpoint(work / f"nvfp4-synthetic-{args.experts}e", args.experts)
    stats = synthetic_stats(GlmLayout.from_dir(src), work / f"nvfp4-synthetic-{args.experts}e.stats.safetensors")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    auto = free_cores()
    threads = args.threads or sorted({1, auto})
    plan = plan_export(src, [stats])
    print(plan.describe(), flush=True)
    runs = []
    for dev in devices:
        for th in threads if dev == "cpu" else [auto]:
            best, best_cpu = None, float("inf")
            for _ in range(args.repeat):
                out = work / "nvfp4-bench-out"
                c = time.process_time()
                res = export_nvfp4(plan, out, device=dev, force=True, threads=th)
                best_cpu = min(best_cpu, time.process_time() - c)
                if best is None or res.seconds < best.seconds:
                    best = res
            shutil.rmtree(out, ignore_errors=True)
            prev = torch.get_num_threads()
            k, k_cpu = kernel_rate(torch.device(dev), th)
            torch.set_num_threads(prev)
            e2e = plan.expert_bytes_in / best.expert_seconds
            run = {
                "device": dev, "threads": th,
                "export_wall_s": round(best.seconds, 3),
                "export_cpu_s": round(best_cpu, 3),
                "expert_bytes": plan.expert_bytes_in,
                "expert_gb_per_s": round(e2e / GB, 4),
                # whole export (non-expert tensors included) per second of CPU time of this process: the rate one
                # uncontended core gives, which is what scales with cores on a dedicated machine
                "total_gb_per_cpu_s": round(plan.bytes_in / best_cpu / GB, 4),
                "kernel_gb_per_s": round(k / GB, 4),
                "kernel_gb_per_cpu_s": round(k_cpu / GB, 4),
                "glm52_expert_export_hours": round(GLM52_EXPERT_BYTES / e2e / 3600, 2),
                "glm52_kernel_only_hours": round(GLM52_EXPERT_BYTES / k / 3600, 2),
                "glm52_cpu_core_hours": round(GLM52_EXPERT_BYTES / (plan.bytes_in / best_cpu) / 3600, 2),
            }
            runs.append(run)
            print(f"{dev:5s} threads {th}: export {run['expert_gb_per_s']:.3f} GB/s of BF16 experts "
                  f"(kernel alone {run['kernel_gb_per_s']:.3f} GB/s; {run['total_gb_per_cpu_s']:.3f} GB per CPU "
                  f"second) -> GLM-5.2's {GLM52_EXPERT_BYTES / 1e12:.2f} TB of experts in "
                  f"{run['glm52_expert_export_hours']:.1f} h here, {run['glm52_cpu_core_hours']:.1f} core-hours",
                  flush=True)
    result = {
        "benchmark": "nvfp4_export",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "checkpoint": {"experts_per_layer": args.experts, "moe_layers": len(plan.quantized_layers),
                       "expert_shape": [2048, 6144], "expert_bytes": plan.expert_bytes_in},
        "glm52_expert_bytes": GLM52_EXPERT_BYTES,
        "runs": runs,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
