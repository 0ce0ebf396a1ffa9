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
    """Reference logits [len(ids), vocab] from transformers in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def llama_logits(toolchain: Toolchain, gguf_path: str | os.PathLike, ids: list[int],
                 threads: int = 2) -> torch.Tensor:
    """Logits [len(ids), vocab] from llama.cpp (one batch, f32 KV cache so near-ties are not flipped)."""
    llama_cpp = llama_cpp_module(toolchain)
    n = len(ids)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=max(n, 64), n_batch=n, n_ubatch=n, logits_all=True,
                          type_k=0, type_v=0, n_threads=threads, verbose=False)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))
    finally:
        llm.close()
