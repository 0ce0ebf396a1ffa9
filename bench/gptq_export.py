#!/usr/bin/env python3
"""Throughput of `glmgguf gptq export` on the CPU, extrapolated to GLM-5.2 REAP-pruned to 168 experts.

    python bench/gptq_export.py [--threads 1] [--calib-tokens 262144]

1. End to end on the trained tiny testbed (16 x 128 calibration tokens): seconds and tokens/s.
2. The two costs that dominate at GLM-5.2's width, measured on its expert shapes (hidden 6144, moe_intermediate
   2048, BF16): GPTQ of one expert's weights (gate and up stacked [4096, 6144], down [6144, 2048]) and
   Hessian accumulation per routed token (x x^T for K = 6144 and 2048).
3. Extrapolation to GLM-5.2 REAP-pruned to 168 experts (78 layers + the MTP block; top-8 routing) with a cost
   model: the experts' measured times as they are; any other weight [N, K] a*(N*K^2 + K^3) seconds (blockwise
   updates, factorization; a fitted to the two expert shapes), a Hessian update c*K^2 per token. Counted: routed
   experts (each token's 8 routed updates), shared experts, dense layers, attention and indexer projections (one
   Hessian per input: q_a, kv_a and wk share one, q_b and wq_b another, as the run does).
   Not counted: the calibration forward passes (attention twice per block) and I/O.
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
MOE_LAYERS, EXPERTS, TOP_K, HIDDEN, INTER = 76, 168, 8, 6144, 2048  # 75 MoE trunk layers + the MTP block
DENSE_LAYERS, FULL_INDEXERS, DENSE_INTER = 3, 22, 12288
ATTENTION = [(2048, 6144), (16384, 2048), (576, 6144), (28672, 512), (6144, 16384)]  # q_a, q_b, kv_a, kv_b, o
INDEXER = [(4096, 2048), (128, 6144)]  # wq_b, wk (full-indexer layers and the MTP block)
ATTENTION_INPUTS = [6144, 2048, 512, 16384]  # one Hessian per distinct input: hidden, q_resid, kv latent, heads


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


def cost_model(gate: dict, down: dict) -> dict:
    """a of t = a*(N*K^2 + K^3) (least squares over the two measured shapes); c of t = c*K^2 per token."""
    work = [n * k * k + k**3 for n, k in (gate["shape"], down["shape"])]
    secs = [gate["gptq_s"], down["gptq_s"]]
    a = sum(w * t for w, t in zip(work, secs, strict=True)) / sum(w * w for w in work)
    return {"a": a, "c": gate["hessian_s_per_token"] / gate["shape"][1] ** 2,
            "expert_s": gate["gptq_s"] + down["gptq_s"]}


def glm52_hours(m: dict, tokens: int) -> dict[str, float]:
    """Hours per part of the model (see the module docstring)."""
    def gptq(shapes: list[tuple[int, int]]) -> float:
        return sum(m["a"] * (n * k * k + k**3) for n, k in shapes)

    def hess(shapes: list[tuple[int, int]]) -> float:
        return tokens * m["c"] * sum(k * k for _, k in shapes)

    def hess_inputs(widths: list[int]) -> float:
        return tokens * m["c"] * sum(k * k for k in widths)

    expert = [(2 * INTER, HIDDEN), (HIDDEN, INTER)]
    dense = [(2 * DENSE_INTER, HIDDEN), (HIDDEN, DENSE_INTER)]
    blocks = DENSE_LAYERS + MOE_LAYERS
    parts = {
        "routed_experts_gptq": MOE_LAYERS * EXPERTS * m["expert_s"],
        "routed_experts_hessian": MOE_LAYERS * TOP_K * hess(expert),
        "attention_gptq": blocks * gptq(ATTENTION) + FULL_INDEXERS * gptq(INDEXER),
        "attention_hessian": blocks * hess_inputs(ATTENTION_INPUTS),
        "shared_and_dense": MOE_LAYERS * (m["expert_s"] + hess(expert)) + DENSE_LAYERS * (gptq(dense) + hess(dense)),
    }
    out = {k: round(v / 3600, 1) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / 3600, 1)
    return out


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
    model = cost_model(gate, down)
    parts = glm52_hours(model, args.calib_tokens)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "testbed_export": e2e,
        "glm52_expert_gate_up": gate,
        "glm52_expert_down": down,
        "cost_model": model,
        "glm52_168_experts_hours": {"calib_tokens": args.calib_tokens, **parts},
    }
    print(f"GLM-5.2 at {EXPERTS} experts, {args.calib_tokens} calibration tokens, {args.threads} CPU thread(s), "
          f"hours: {parts} (forward passes and I/O not included)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
