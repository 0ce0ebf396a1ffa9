"""The llama-quantize command line that writes the same tensor types as a plan (for comparisons with upstream)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from glmgguf.gguf.plan import PlannedTensor
from glmgguf.gguf.qtypes import FLOAT_TYPES, file_type_of
from glmgguf.gguf.recipe import RecipeError


def _group_pattern(names: list[str]) -> str:
    """One anchored regex for names that differ only in their block number (blk.N.)."""
    m = re.match(r"^blk\.\d+\.(.*)$", names[0])
    if m is None or len(names) == 1:
        return "|".join(f"^{re.escape(n)}$" for n in names)
    blocks = sorted({int(n.split(".")[1]) for n in names})
    return rf"^blk\.({'|'.join(map(str, blocks))})\.{re.escape(m.group(1))}$"


def llama_quantize_args(tensors: Sequence[PlannedTensor], src: str | Path, out: str | Path,
                        imatrix: str | Path | None = None, threads: int | None = None,
                        src_types: dict[str, Q] | None = None, binary: str = "llama-quantize") -> list[str]:
    """The llama-quantize command line that writes the same tensor types as `tensors[i].ggml_type`.

    Every quantizable tensor gets an exact, anchored `--tensor-type` pattern (grouped by block), so the
    overrides are disjoint and the order does not matter; token_embd/output go through
    `--token-embedding-type` / `--output-tensor-type`. Tensors llama-quantize never touches (norms, 1-D,
    ffn_gate_inp) need nothing. `src_types` (input GGUF types) lets F32-kept tensors that llama-quantize would
    quantize (indexer.proj) be pinned with `=f32`.
    """
    nominal, _ = file_type_of(tensors)
    if nominal in (t.name for t in FLOAT_TYPES):
        nominal = "Q8_0"  # overrides only apply on top of a quantized file type
    args = [binary]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    groups: dict[tuple[str, Q], list[str]] = {}
    for t in tensors:
        skipped_by_llama = len(t.shape) < 2 or "_norm.weight" in t.name or "ffn_gate_inp.weight" in t.name \
            or not t.name.endswith("weight")
        if skipped_by_llama:
            if src_types is not None and src_types.get(t.name, t.ggml_type) is not t.ggml_type:
                raise RecipeError(f"{t.name}: llama-quantize keeps it as it is, cannot express {t.ggml_type.name}")
            continue
        if t.name == "token_embd.weight":
            args += ["--token-embedding-type", t.ggml_type.name.lower()]
            continue
        if t.name == "output.weight":
            args += ["--output-tensor-type", t.ggml_type.name.lower()]
            continue
        key = re.sub(r"^blk\.\d+\.", "blk.N.", t.name)
        groups.setdefault((key, t.ggml_type), []).append(t.name)
    for (_, qtype), names in groups.items():
        args += ["--tensor-type", f"{_group_pattern(names)}={qtype.name.lower()}"]
    args += [str(src), str(out), nominal]
    if threads:
        args.append(str(threads))
    return args
