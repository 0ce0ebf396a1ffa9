"""How close is a checkpoint to the teacher? KL(teacher || model) and top-1 agreement on a teacher cache.

Any checkpoint of the teacher's vocabulary and tokenizer can be measured (the teacher itself, a pruned model, a
distilled one): the cache holds the teacher's distributions, the model runs in memory. Reported per position,
averaged uniformly over all positions of all cached sequences:

- `kl`: `glmgguf.kd.loss.sparse_kl`, the KL over the cache's top-k plus the remaining-mass bucket. It is the exact
  full-vocabulary KL when the cache was made with top-k = vocabulary size, otherwise a lower bound of it (tight
  when the cache's `mean_rest_mass` is small);
- `top1`: share of positions where the model's most likely token is the teacher's;
- `mtp_kl` / `mtp_top1`: the same for the MTP head (position t predicts token t+2) against the teacher's
  distribution at t+1, when the checkpoint has an MTP block.

Use a cache made from held-out text (text never used for KD) to measure generalization.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glmgguf.kd.loss import sparse_kl, top1_agreement
from glmgguf.kd.student import Student
from glmgguf.kd.teacher import TeacherCache


@dataclass
class EvalResult:
    kl: float
    top1: float
    positions: int
    mtp_kl: float | None
    mtp_top1: float | None
    mtp_positions: int
    kl_per_sequence: list[float]
    seconds: float = 0.0
    model: str = ""
    cache: str = ""
    cache_top_k: int = 0
    cache_rest_mass: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        s = (f"KL(teacher || model) {self.kl:.6f} nats/token, top-1 agreement {self.top1:.4f} over "
             f"{self.positions} positions")
        if self.mtp_kl is not None:
            s += f"; MTP head: KL {self.mtp_kl:.6f}, top-1 {self.mtp_top1:.4f}"
        return s


@torch.no_grad()
def evaluate_student(student: Student, cache: TeacherCache, batch_size: int = 4) -> EvalResult:
    """Measure a loaded student on every sequence of `cache` (eval mode; restores nothing else)."""
    t0 = time.perf_counter()
    was_training = student.model.training
    student.train(False)
    kl_sum = top_sum = 0.0
    mkl_sum = mtop_sum = 0.0
    n_pos = n_mtp = 0
    per_seq: list[float] = []
    try:
        for i in range(0, len(cache), batch_size):
            b = cache.batch(range(i, min(i + batch_size, len(cache))))
            logits, mtp_logits = student.forward(b["input_ids"])
            dev = logits.device
            ids, lp, rest = (b[k].to(dev) for k in ("topk_ids", "topk_logprobs", "rest_logprob"))
            kl = sparse_kl(logits, ids, lp, rest).double()
            per_seq.extend(kl.mean(-1).tolist())
            kl_sum += float(kl.sum())
            top_sum += float(top1_agreement(logits, ids).sum())
            n_pos += kl.numel()
            if mtp_logits is not None:
                d = mtp_logits.device
                mkl = sparse_kl(mtp_logits, ids[:, 1:].to(d), lp[:, 1:].to(d), rest[:, 1:].to(d)).double()
                mkl_sum += float(mkl.sum())
                mtop_sum += float(top1_agreement(mtp_logits, ids[:, 1:].to(d)).sum())
                n_mtp += mkl.numel()
    finally:
        student.train(was_training)
    return EvalResult(
        kl=kl_sum / n_pos, top1=top_sum / n_pos, positions=n_pos,
        mtp_kl=mkl_sum / n_mtp if n_mtp else None, mtp_top1=mtop_sum / n_mtp if n_mtp else None,
        mtp_positions=n_mtp, kl_per_sequence=per_seq, seconds=time.perf_counter() - t0,
        model=student.path.resolve().name, cache=cache.path.resolve().name, cache_top_k=cache.top_k,
        cache_rest_mass=float(cache.manifest.get("mean_rest_mass", 0.0)),
    )


def evaluate(model_dir: str | os.PathLike, cache_dir: str | os.PathLike, *, batch_size: int = 4,
             dtype: torch.dtype = torch.float32, device_map: str | dict | None = None, mtp: bool = True,
             data: list[str | os.PathLike] | None = None, adapter: str | os.PathLike | None = None) -> EvalResult:
    """Load `model_dir` (with the PEFT adapter directory `adapter` of `kd lora` on top) and measure it against the
    teacher cache `cache_dir` (tokenizer / vocab / text checked)."""
    cache = TeacherCache(cache_dir)
    cache.check_tokenizer(model_dir)
    if data:
        cache.check_text(data)
    student = Student(Path(model_dir), dtype=dtype, device_map=device_map, mtp=mtp)
    if adapter is not None:
        from peft import PeftModel

        student.model = PeftModel.from_pretrained(student.model, str(adapter)).base_model.model
    result = evaluate_student(student, cache, batch_size)
    if adapter is not None:
        result.model += f" + {Path(adapter).resolve().name}"
    return result
