"""MTP speculative decoding in llama-server: the settings, their server arguments, and the GGUF check.

The pinned llama-server drafts with the GGUF's own MTP (NextN) block when started with `--spec-type draft-mtp`:
each step the MTP head proposes up to `--spec-draft-n-max` tokens (default 3), chained on its own hidden state,
stopping early at a top-1 probability below `--spec-draft-p-min` (default 0); the target model verifies them in
one batch and keeps the longest prefix its own sampler agrees with. Every response's `timings` then carry
`draft_n` (tokens drafted) and `draft_n_accepted`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from glmgguf.eval.probes import EvalError

DRAFT_TYPE = "draft-mtp"
DEFAULT_N_MAX = 3  # llama-server's default --spec-draft-n-max
DEFAULT_P_MIN = 0.0  # llama-server's default --spec-draft-p-min


def draft_settings(n_max: int = DEFAULT_N_MAX, p_min: float = DEFAULT_P_MIN) -> dict[str, Any]:
    """A checked MTP drafting setting, as recorded in a run's spec."""
    if n_max < 1:
        raise EvalError(f"draft max {n_max}: draft at least 1 token per step")
    if not 0.0 <= p_min <= 1.0:
        raise EvalError(f"draft p-min {p_min}: a probability, 0 <= p <= 1")
    return {"type": DRAFT_TYPE, "n_max": int(n_max), "p_min": float(p_min)}


def draft_args(draft: dict[str, Any]) -> list[str]:
    """llama-server arguments of a drafting setting."""
    return ["--spec-type", draft["type"], "--spec-draft-n-max", str(draft["n_max"]),
            "--spec-draft-p-min", repr(float(draft["p_min"]))]


def gguf_mtp_layers(path: str | os.PathLike[str]) -> int:
    """`<arch>.nextn_predict_layers` of a GGUF (the first file of a split one); 0 when absent."""
    from glmgguf.gguf.keys import Keys, arch_key
    from glmgguf.gguf.reader import read_gguf

    r = read_gguf(path)
    arch_field = r.fields.get(Keys.General.ARCHITECTURE)
    if arch_field is None:
        return 0
    n = r.fields.get(arch_key(Keys.LLM.NEXTN_PREDICT_LAYERS, arch_field.contents()))
    return int(n.contents()) if n is not None else 0


def check_mtp_gguf(path: str | os.PathLike[str]) -> None:
    """Refuse MTP drafting on a GGUF without an MTP block (converted with `--mtp drop`)."""
    if gguf_mtp_layers(path) < 1:
        raise EvalError(f"{path} has no MTP block (nextn_predict_layers is 0 or missing): MTP drafting needs a "
                        "GGUF converted with --mtp keep")


def reference_drafts(model_dir: str | os.PathLike[str], prompt: list[int], generated: list[int],
                     n_predict: int | None = None) -> dict[str, int]:
    """Drafted and accepted tokens that one-token MTP drafting (`--spec-draft-n-max 1`) must report for this greedy
    continuation, computed with transformers: the independent check of the GGUF's MTP block in llama.cpp.

    After sampling token g_i (drafting stops once fewer than 2 of `n_predict` tokens remain), the MTP head sees
    the trunk's hidden state before g_i and g_i's embedding and proposes g_{i+1}; a match is accepted and the
    verification also yields g_{i+2}, so the next draft follows g_{i+2}, else g_{i+1}.
    """
    import torch

    from glmgguf.kd.student import Student

    student = Student(Path(model_dir), dtype=torch.float32, mtp=True)
    with torch.no_grad():
        _, mtp = student.forward(torch.tensor([prompt + generated]))
    if mtp is None:
        raise EvalError(f"{model_dir} has no MTP layer")
    pred = mtp[0].argmax(-1).tolist()  # pred[t]: the MTP's guess for the token at t + 2
    limit = n_predict if n_predict is not None else len(generated)
    drafted = accepted = i = 0
    while i + 1 < len(generated) and limit - (i + 1) >= 2:
        drafted += 1
        if pred[len(prompt) + i - 1] == generated[i + 1]:
            accepted += 1
            i += 2
        else:
            i += 1
    return {"drafted": drafted, "accepted": accepted}
