"""Encode torch tensors as the bytes of a GGML tensor type (rows are the innermost axis)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_fits(qtype: GGMLQuantizationType, row: int) -> bool:
    """True when rows of `row` elements can be stored as `qtype` (whole blocks only)."""
    return row % block_size(qtype) == 0


def nbytes(qtype: GGMLQuantizationType, n_elements: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return n_elements // bs * ts


def encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """The GGML bytes of `t` (any float dtype) as `qtype`: float casts round to nearest even."""
    if qtype in FLOAT_TYPES:
        x = t.to(FLOAT_TYPES[qtype]).contiguous()
        return x.reshape(-1).view(torch.uint8).numpy()
    if qtype is GGMLQuantizationType.Q8_0:
        rows = t.to(torch.float32).reshape(-1, t.shape[-1]).numpy()
        return quants.quantize(rows, qtype).reshape(-1)
    raise ValueError(f"no encoder for {qtype.name}")
