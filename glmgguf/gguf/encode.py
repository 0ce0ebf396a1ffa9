"""Encode tensors as the bytes of a GGML tensor type (rows are the innermost axis).

Float types (F32/F16/BF16) are cast in torch (round to nearest even, as ggml does; numpy F32/F16 without it).
Every quantized type goes through ggml's own `ggml_quantize_chunk` (`glmgguf.gguf.ggml`), so the bytes are
llama-quantize's. torch is imported only for torch inputs and BF16 casts: GGUF -> GGUF work runs without it.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType

from glmgguf.gguf.ggml import GgmlKernels, kernels
from glmgguf.gguf.qtypes import FLOAT_TYPES

if TYPE_CHECKING:
    import torch

_TORCH_FLOATS = {  # ggml float type -> torch dtype name
    GGMLQuantizationType.F32: "float32",
    GGMLQuantizationType.F16: "float16",
    GGMLQuantizationType.BF16: "bfloat16",
}
_NUMPY_FLOATS = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
_WIDENED_BY_GGML = {"bfloat16": GGMLQuantizationType.BF16, "float16": GGMLQuantizationType.F16}


def _is_torch(t: object) -> bool:
    torch_mod = sys.modules.get("torch")  # a torch tensor implies torch is loaded
    return torch_mod is not None and isinstance(t, torch_mod.Tensor)


@cache
def default_kernels() -> GgmlKernels:
    """ggml's kernels from the pinned llama.cpp toolchain (built on first use)."""
    from glmgguf.llama import ensure_toolchain

    return kernels(str(ensure_toolchain().lib_dir))


def encode(t: torch.Tensor | np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None,
           threads: int = 1, ggml: GgmlKernels | None = None) -> np.ndarray:
    """The GGML bytes of `t` (any float dtype; numpy or torch) as `qtype`.

    For quantized types, `imatrix` is [n_matrices, n_per_row] with n_matrices = prod(t.shape[:-2]) (one
    vector per expert / head matrix), or [n_per_row] for a 2-D tensor; `threads` quantize row blocks in
    parallel (the GIL is released inside ggml).
    """
    if qtype in FLOAT_TYPES:
        if not _is_torch(t) and qtype in _NUMPY_FLOATS:
            return np.ascontiguousarray(t, dtype=_NUMPY_FLOATS[qtype]).reshape(-1).view(np.uint8)
        import torch

        x = t if _is_torch(t) else torch.from_numpy(t if t.flags.writeable else t.copy())
        return x.to(getattr(torch, _TORCH_FLOATS[qtype])).contiguous().reshape(-1).view(torch.uint8).numpy()
    src_type = GGMLQuantizationType.F32
    if _is_torch(t):
        import torch

        dtype_name = str(t.dtype).removeprefix("torch.")
        if dtype_name in _WIDENED_BY_GGML:
            # ggml widens the raw 16-bit words to F32 inside each quantization task (no torch conversion pass,
            # whose OpenMP threads would also compete with ggml's for the cores)
            src_type = _WIDENED_BY_GGML[dtype_name]
            rows = t.detach().contiguous().view(torch.int16).numpy()
        else:
            rows = t.detach().to(torch.float32).contiguous().numpy()
    else:
        rows = np.asarray(t, dtype=np.float32)
    return _quantize(rows, qtype, src_type, imatrix, threads, ggml)


def _quantize(rows: np.ndarray, qtype: GGMLQuantizationType, src_type: GGMLQuantizationType,
              imatrix: np.ndarray | None, threads: int, ggml: GgmlKernels | None) -> np.ndarray:
    shape = rows.shape
    rows = rows.reshape(-1, shape[-1])
    rows_per_matrix = None
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=np.float32).reshape(-1, shape[-1])
        n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if imatrix.shape[0] != n_mat:
            raise ValueError(f"imatrix has {imatrix.shape[0]} vectors for {n_mat} matrices of shape {shape}")
        rows_per_matrix = rows.shape[0] // n_mat
    return (ggml or default_kernels()).quantize(rows, qtype, imatrix=imatrix, rows_per_matrix=rows_per_matrix,
                                                threads=threads, src_type=src_type)


def bf16_words_to_f32(words: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32, exactly."""
    return (words.astype(np.uint32) << 16).view(np.float32)


def encode_words(words: np.ndarray, src: GGMLQuantizationType, qtype: GGMLQuantizationType,
                 imatrix: np.ndarray | None = None, threads: int = 1, ggml: GgmlKernels | None = None) -> np.ndarray:
    """`encode` for a tensor's stored words as numpy reads them (F32: float32, F16: float16, BF16: uint16 bits).

    Same bytes as `encode` of the equivalent torch tensor, without torch: quantized types take the 16-bit words
    as they are (ggml widens them per task), float targets are exact widenings or numpy's round-to-nearest-even
    F32 -> F16; only a narrowing to BF16 goes through torch.
    """
    if qtype not in FLOAT_TYPES:
        rows = words if src is not GGMLQuantizationType.F32 else np.asarray(words, dtype=np.float32)
        return _quantize(rows, qtype, src, imatrix, threads, ggml)
    if qtype is src:
        return np.ascontiguousarray(words).reshape(-1).view(np.uint8)
    f32 = bf16_words_to_f32(words) if src is GGMLQuantizationType.BF16 else np.asarray(words, dtype=np.float32)
    return encode(f32, qtype)
