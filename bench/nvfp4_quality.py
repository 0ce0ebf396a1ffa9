#!/usr/bin/env python3
"""NVFP4 quality on the trained tiny testbed: KL to the unquantized model of the exported experts, dequantized, in
transformers (both checkpoint layouts), with the engines' NVFP4 expert inputs emulated, and as a GGUF in llama.cpp.

    python bench/nvfp4_quality.py

Input scales come from `reap observe` on 4 x 64 tokens of the testbed's training text; logits are compared in
float64 on 4 x 127 held-out positions (transformers, float32 compute) and on 160 held-out tokens (llama.cpp CPU,
f32 KV cache, against the F32 GGUF; `q4_protected` measured the same way for comparison). Writes
bench/results/nvfp4_quality.json.
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch
from upstream import portable

RESULTS = Path(__file__).resolve().parent / "results" / "nvfp4_quality.json"


def stats_file(model: Path, out: Path) -> Path:
    """REAP statistics (the export's input scales) from 4 x 64 training tokens."""
    from transformers import AutoTokenizer

    from glmgguf.reap.data import pack
    from glmgguf.reap.observe import observe
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(model)
    seqs = pack([d[:4000] for d in stdlib_corpus("train")[:20]], tok, 64, num_samples=4, seed=1).sequences
    observe(model, chunk_sequences(seqs, 4), streaming=False, dtype=torch.float32).save(out)
    return out


def kl(ref: torch.Tensor, cand: torch.Tensor) -> dict:
    from glmgguf.parity import kl_stats

    s = kl_stats(ref, cand)
    return {"mean_kl": s.mean, "max_kl": s.max, "top1_agreement": s.top1_agreement, "positions": s.n_positions}


def transformers_kls(model: Path, stats: Path, tmp: Path) -> dict:
    """Dequantized exports (ModelOpt and compressed-tensors layouts) and W4A4 emulation against the BF16 model."""
    from transformers import AutoModelForCausalLM

    from glmgguf.nvfp4.emulate import emulate_w4a4
    from glmgguf.nvfp4.export import dequantize_export, export_nvfp4, plan_export
    from glmgguf.testbed.train import heldout_batch

    ids = heldout_batch(4, 128)[:, :-1]

    def logits(m) -> torch.Tensor:
        with torch.no_grad():
            return m.eval()(ids).logits.reshape(-1, m.config.vocab_size)

    def load(d: Path):
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)

    ref = logits(load(model))
    out = {}
    for fmt in ("modelopt", "compressed-tensors"):
        export = export_nvfp4(plan_export(model, [stats], fmt=fmt), tmp / fmt, threads=1).out
        deq = dequantize_export(export, tmp / f"{fmt}-deq")
        out[f"dequantized_{fmt}"] = kl(ref, logits(load(deq)))
        if fmt == "modelopt":
            out["w4a4_emulated_modelopt"] = kl(ref, logits(emulate_w4a4(load(deq), export)))
    return out


def gguf_kls(model: Path, tmp: Path) -> dict:
    """nvfp4_experts and q4_protected GGUFs against the F32 GGUF in the pinned llama.cpp (CPU)."""
    from transformers import AutoTokenizer

    from glmgguf.gguf.convert import convert, outtype_chooser
    from glmgguf.gguf.recipe import load_recipe
    from glmgguf.layout import GlmLayout
    from glmgguf.llama import ensure_toolchain
    from glmgguf.parity import llama_logits
    from glmgguf.testbed import stdlib_corpus

    tc = ensure_toolchain()
    ids = AutoTokenizer.from_pretrained(model)("".join(stdlib_corpus("heldout"))[:20000])["input_ids"][:160]
    ref = llama_logits(tc, convert(model, tmp / "f32.gguf", outtype_chooser("f32"), progress=False).path, ids, 1)
    layers = GlmLayout.from_dir(model).layers
    out = {}
    for recipe in ("nvfp4_experts", "q4_protected"):
        g = convert(model, tmp / f"{recipe}.gguf", load_recipe(recipe).chooser(layers), progress=False)
        out[f"gguf_{recipe}_vs_f32_gguf"] = kl(ref, llama_logits(tc, g.path, ids, 1))
    return out


def main() -> None:
    from glmgguf.testbed import trained_testbed

    torch.set_num_threads(1)
    model = trained_testbed("tiny")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        stats = stats_file(model, tmp / "stats.safetensors")
        res = {"machine": {"python": platform.python_version(), "torch": torch.__version__},
               "model": model.name, **transformers_kls(model, stats, tmp), **gguf_kls(model, tmp)}
    for k, v in res.items():
        if isinstance(v, dict) and "mean_kl" in v:
            print(f"{k:40s} mean KL {v['mean_kl']:.2e}  top-1 {v['top1_agreement']:.3f}")
    RESULTS.write_text(json.dumps(portable(res), indent=1) + "\n")


if __name__ == "__main__":
    main()
