"""Logit parity between the transformers reference and a GGUF running in the toolkit's llama.cpp."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from glmgguf.llama import Toolchain, llama_cpp_module


@dataclass(frozen=True)
class KlStats:
    """KL(reference || candidate) per position, summarized."""

    mean: float
    max: float
    top1_agreement: float
    n_positions: int

    def __str__(self) -> str:
        return (f"mean KL {self.mean:.3e}, max {self.max:.3e}, top-1 agreement {self.top1_agreement:.3f} "
                f"over {self.n_positions} positions")


def kl_stats(reference: torch.Tensor, candidate: torch.Tensor) -> KlStats:
    """Compare two [positions, vocab] logit tensors in float64."""
    p = torch.log_softmax(reference.double(), -1)
    q = torch.log_softmax(candidate.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    agree = (reference.argmax(-1) == candidate.argmax(-1)).double().mean()
    return KlStats(float(kl.mean()), float(kl.max()), float(agree), int(kl.numel()))


def transformers_logits(model_dir: str | os.PathLike, ids: list[int]) -> torch.Tensor:
    """Reference logits [len(ids), vocab] from transformers in float32 (a block-FP8 checkpoint dequantized)."""
    from glmgguf.reap.observe import load_in_memory_model

    model = load_in_memory_model(model_dir, torch.float32, None)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def llama_logits(toolchain: Toolchain, gguf_path: str | os.PathLike, ids: list[int],
                 threads: int = 2, lora: str | os.PathLike | None = None) -> torch.Tensor:
    """Logits [len(ids), vocab] from llama.cpp (one batch, f32 KV cache so near-ties are not flipped), with the
    LoRA adapter GGUF `lora` applied (scale 1) when given."""
    llama_cpp = llama_cpp_module(toolchain)
    n = len(ids)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=max(n, 64), n_batch=n, n_ubatch=n, logits_all=True,
                          type_k=0, type_v=0, n_threads=threads, verbose=False,
                          lora_path=None if lora is None else str(lora))
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))
    finally:
        llm.close()


def masked_transformers_logits(model_dir: str | os.PathLike, ids: list[int],
                               keep: dict[int, list[int]] | None = None) -> torch.Tensor:
    """transformers logits (float32) of an UNPRUNED model whose experts outside `keep[layer]` are never routed.

    The router takes the top-k of sigmoid(logits) + e_score_correction_bias and weights the chosen experts by
    their unbiased scores, normalized over the chosen k: a bias of -inf only removes an expert from the choice,
    so this computes the function of the model pruned to `keep` (the reference for per-layer expert counts,
    which transformers cannot load). Blocks beyond the trunk (MTP) are not run by transformers.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for layer, kept in (keep or {}).items():
            if layer >= len(model.model.layers):
                continue
            bias = model.model.layers[layer].mlp.gate.e_score_correction_bias
            removed = torch.ones(bias.numel(), dtype=torch.bool)
            removed[kept] = False
            bias[removed] = float("-inf")
        return model(torch.tensor([ids])).logits[0]


_CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from glmgguf.llama import Toolchain, llama_cpp_module
a = json.loads(sys.argv[1])
tc = Toolchain(Path(a["bin"]), Path(a["src"]), Path(a["lib"]), Path(a["pkg"]))
n = len(a["ids"])
llm = llama_cpp_module(tc).Llama(a["gguf"], n_ctx=max(n, 64), n_batch=n, n_ubatch=n, logits_all=True,
                                 verbose=False, **a["kwargs"])
llm.eval(a["ids"])
np.save(a["out"], np.array(llm.scores[:n], dtype=np.float32))
llm.close()
"""


def llama_logits_isolated(toolchain: Toolchain, gguf_path: str | os.PathLike, ids: list[int], threads: int = 2,
                          env: dict[str, str] | None = None, **llama_kwargs) -> torch.Tensor:
    """`llama_logits` in a child process, so that one process can compare several builds (one libllama each).

    `llama_kwargs` go to `llama_cpp.Llama` (default f32 KV cache: type_k=type_v=0; e.g. kv_overrides), `env` to
    the child's environment (e.g. LLAMA_DSA_INDEXER_CACHE_TYPE).
    """
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="glmgguf-logits-") as tmp:
        out = os.path.join(tmp, "logits.npy")
        args = {"bin": str(toolchain.bin_dir), "src": str(toolchain.source_dir), "lib": str(toolchain.lib_dir),
                "pkg": str(toolchain.python_package_dir), "gguf": str(gguf_path), "ids": ids, "out": out,
                "kwargs": {"type_k": 0, "type_v": 0, "n_threads": threads, **llama_kwargs}}
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp logits failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return torch.from_numpy(np.load(out))
