#!/usr/bin/env python3
"""Throughput of `glmgguf gptq export` on the CPU, extrapolated to GLM-5.2 REAP-pruned to 168 experts.

    python bench/gptq_export.py [--threads 1] [--calib-tokens 262144]

1. End to end on the trained tiny testbed (16 x 128 calibration tokens): seconds and tokens/s.
2. The two costs that dominate at GLM-5.2's width, measured on its expert shapes (hidden 6144, moe_intermediate
   2048, BF16): GPTQ of one expert's weights (gate and up stacked [4096, 6144], down [6144, 2048]) and
   Hessian accumulation per routed token (x x^T for K = 6144 and 2048).
3. Extrapolation to the routed experts of GLM-5.2 at 168 experts (75 MoE layers + the MTP block, top-8 routing):
   per layer 168 x (gate/up + down) GPTQ and each calibration token's 8 routed Hessian updates. Attention,
   dense layers, shared experts and the model forward are left out (a few percent of the expert work).
Writes bench/results/gptq_export.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gptq_export.json"
MOE_LAYERS, EXPERTS, TOP_K, HIDDEN, INTER = 76, 168, 8, 6144, 2048


def testbed_export(tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from glmgguf.gptq.export import export_gptq, plan_export
    from glmgguf.reap.data import pack
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus, trained_testbed

    src = trained_testbed("tiny")
    tok = AutoTokenizer.from_pretrained(src)
    seqs = pack([d[:20000] for d in stdlib_corpus("train")[:40]], tok, 128, num_samples=16, seed=1).sequences
    res = export_gptq(plan_export(src), tmp / "out", chunk_sequences(seqs, 4), force=True)
    return {"seconds": round(res.seconds, 2), "tokens": res.tokens, "tokens_per_s": round(res.tokens / res.seconds),
            "modules": res.report.summary()}


def time_gptq(n: int, k: int, rows: int = 4096) -> dict:
    """Seconds of one GPTQ (Hessian given) and of the Hessian update per token, for a weight [n, k]."""
    from glmgguf.gptq import quant as gq

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    h = gq.Hessian(k)
    t0 = time.perf_counter()
    h.add(x)
    t_h = (time.perf_counter() - t0) / rows
    t0 = time.perf_counter()
    gq.gptq_one(w, h.value())
    return {"shape": [n, k], "gptq_s": round(time.perf_counter() - t0, 3), "hessian_s_per_token": t_h}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-tokens", type=int, default=128 * 2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        e2e = testbed_export(Path(d))
    print(f"testbed export: {e2e}", flush=True)
    gate, down = time_gptq(2 * INTER, HIDDEN), time_gptq(HIDDEN, INTER)
    print(f"GLM-5.2 expert shapes: {gate} {down}", flush=True)
    per_layer_gptq = EXPERTS * (gate["gptq_s"] + down["gptq_s"])
    per_layer_hessian = args.calib_tokens * TOP_K * (gate["hessian_s_per_token"] + down["hessian_s_per_token"])
    hours = MOE_LAYERS * (per_layer_gptq + per_layer_hessian) / 3600
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "testbed_export": e2e,
        "glm52_expert_gate_up": gate,
        "glm52_expert_down": down,
        "glm52_168_experts": {"calib_tokens": args.calib_tokens, "moe_layers": MOE_LAYERS,
                              "gptq_hours": round(MOE_LAYERS * per_layer_gptq / 3600, 1),
                              "hessian_hours": round(MOE_LAYERS * per_layer_hessian / 3600, 1),
                              "total_hours": round(hours, 1)},
    }
    print(f"GLM-5.2 at {EXPERTS} experts, {args.calib_tokens} calibration tokens, {args.threads} CPU thread(s): "
          f"~{hours:.0f} h of expert GPTQ + Hessians (forward passes and attention not included)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
