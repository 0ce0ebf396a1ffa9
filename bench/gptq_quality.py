#!/usr/bin/env python3
"""Held-out KL to BF16 of INT4 GPTQ, INT4 round-to-nearest and NVFP4 on the trained tiny testbed.

    python bench/gptq_quality.py

Every export is dequantized and run in transformers (float32) on the held-out batch the tests use (16 x 128
positions), and on 4 x 512 held-out positions (`*_ctx512`: longer contexts than the 128-token calibration). Two
coverages: every linear GPTQ quantizes by default (attention, indexer wq_b, MLPs, experts), and the routed experts
only (everything else BF16), which is NVFP4's coverage. Bits per quantized weight: INT4 group 128 with BF16 scales
4.125, NVFP4 4.5. Calibration: 16 x 128 tokens of the training split (GPTQ's Hessians; NVFP4's input scales come
from REAP statistics of the same tokens). Then, in the pinned llama.cpp (CPU, f32 KV cache) against the F32 GGUF
of the BF16 model, as bench/nvfp4_quality.py measures GGUFs: the `q4_protected` GGUF (routed gate/up Q4_K, down
Q6_K, everything else Q8_0) beside the GPTQ and round-to-nearest exports converted (dequantized) to F32 GGUFs,
on the same held-out batch (each row its own context). Writes bench/results/gptq_quality.json.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gptq_quality.json"
NOT_EXPERTS = ["*.self_attn.*", "*.shared_experts.*", "model.layers.0.mlp.*"]  # layer 0 is the dense layer


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glmgguf.gptq.dequantize import dequantize_export
    from glmgguf.gptq.export import export_gptq, plan_export
    from glmgguf.gptq.sequential import GptqSettings
    from glmgguf.nvfp4 import export as nv
    from glmgguf.nvfp4.dequantize import dequantize_export as nv_dequantize
    from glmgguf.parity import kl_stats
    from glmgguf.reap.data import pack
    from glmgguf.reap.observe import observe
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus, trained_testbed
    from glmgguf.testbed.train import heldout_batch

    torch.set_num_threads(1)
    src = trained_testbed("tiny")
    tok = AutoTokenizer.from_pretrained(src)
    seqs = pack([d[:20000] for d in stdlib_corpus("train")[:40]], tok, 128, num_samples=16, seed=1).sequences
    chunks = chunk_sequences(seqs, 4)
    ids = heldout_batch(16, 128)[:, :-1]
    long_ids = heldout_batch(4, 512)[:, :-1]

    def logits(d, x=ids):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(x).logits.reshape(-1, model.config.vocab_size)

    ref, long_ref = logits(src), logits(src, long_ids)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for name, settings, exclude in (("gptq_all", GptqSettings(), ()), ("rtn_all", GptqSettings(rtn=True), ()),
                                        ("gptq_experts", GptqSettings(), NOT_EXPERTS),
                                        ("rtn_experts", GptqSettings(rtn=True), NOT_EXPERTS)):
            res = export_gptq(plan_export(src, exclude=exclude), t / name, chunks, settings, dtype=torch.float32)
            deq = dequantize_export(res.out, t / f"{name}-deq")
            s = kl_stats(ref, logits(deq))
            rows[name] = {"bits": 4.125, "modules": len(res.plan.targets), "mean_kl": s.mean, "max_kl": s.max,
                          "top1_agreement": s.top1_agreement}
            if name.endswith("_all"):
                ls = kl_stats(long_ref, logits(deq, long_ids))
                rows[f"{name}_ctx512"] = {"mean_kl": ls.mean, "max_kl": ls.max, "top1_agreement": ls.top1_agreement}
            print(name, rows[name], flush=True)
        stats = observe(src, chunks, streaming=False, dtype=torch.float32)
        stats.save(t / "stats.safetensors")
        res = nv.export_nvfp4(nv.plan_export(src, [t / "stats.safetensors"]), t / "nvfp4", threads=1)
        s = kl_stats(ref, logits(nv_dequantize(res.out, t / "nvfp4-deq")))
        rows["nvfp4_experts"] = {"bits": 4.5, "modules": len(res.plan.modules_nvfp4), "mean_kl": s.mean,
                                 "max_kl": s.max, "top1_agreement": s.top1_agreement}
        print("nvfp4_experts", rows["nvfp4_experts"])
        gguf = gguf_kls(src, {n: t / f"{n}-deq" for n in ("gptq_all", "rtn_all", "gptq_experts")}, t)
        print("llama.cpp", gguf)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": Path(src).name, "positions": s.n_positions, **rows, "llama_cpp": gguf},
                                  indent=1) + "\n")


def gguf_kls(src: Path, dequantized: dict[str, Path], tmp: Path) -> dict:
    """KL to the F32 GGUF of `src` in llama.cpp: q4_protected, and each dequantized export as an F32 GGUF."""
    from glmgguf.gguf.convert import convert, outtype_chooser
    from glmgguf.gguf.recipe import load_recipe
    from glmgguf.layout import GlmLayout
    from glmgguf.llama import ensure_toolchain
    from glmgguf.parity import kl_stats, llama_logits
    from glmgguf.testbed.train import heldout_batch

    tc = ensure_toolchain()
    rows = heldout_batch(16, 128)[:, :-1].tolist()

    def logits(path: Path) -> torch.Tensor:
        return torch.cat([llama_logits(tc, path, r, 1) for r in rows])

    def row(s) -> dict:
        return {"mean_kl": s.mean, "max_kl": s.max, "top1_agreement": s.top1_agreement, "positions": s.n_positions}

    f32 = outtype_chooser("f32")
    ref = logits(convert(src, tmp / "f32.gguf", f32, progress=False).path)
    q4 = convert(src, tmp / "q4.gguf", load_recipe("q4_protected").chooser(GlmLayout.from_dir(src).layers),
                 progress=False).path
    out = {"q4_protected": row(kl_stats(ref, logits(q4)))}
    for name, d in dequantized.items():
        out[name] = row(kl_stats(ref, logits(convert(d, tmp / f"{name}.gguf", f32, progress=False).path)))
    return out


if __name__ == "__main__":
    main()
