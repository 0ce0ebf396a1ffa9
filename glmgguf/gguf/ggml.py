"""ggml's own quantization kernels, called in-process through ctypes from the toolchain's libggml-base.

ctypes releases the GIL around foreign calls, so row blocks quantize in parallel on a thread pool, exactly as
llama-quantize splits them: rows are independent, and an imatrix applies per expert (a 3-D tensor's imatrix
holds one `n_per_row` vector per expert).
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from glmgguf.errors import GlmggufError

_LIB_NAMES = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
ROWS_PER_TASK = 32
MIN_TASK_ELEMENTS = 1 << 16  # short rows: more of them per task, to keep the per-task overhead small
# 16-bit input rows are widened to F32 inside each task, by ggml's own row converters (what llama-quantize uses)
_TO_F32_ROW = {GGMLQuantizationType.BF16: "ggml_bf16_to_fp32_row", GGMLQuantizationType.F16: "ggml_fp16_to_fp32_row"}


class GgmlError(GlmggufError, RuntimeError):
    """The ggml library is missing or refused a quantization."""


class GgmlKernels:
    """Typed access to `ggml_quantize_chunk` and friends in one libggml-base."""

    def __init__(self, lib_dir: str | os.PathLike):
        name = _LIB_NAMES.get(sys.platform, "libggml-base.so")
        path = Path(lib_dir) / name
        if not path.exists():
            raise GgmlError(f"{path} not found: build the toolchain first (glmgguf llama build)")
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        for fn in _TO_F32_ROW.values():
            getattr(lib, fn).restype = None
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self.lib = lib
        self.path = path

    def requires_imatrix(self, qtype: GGMLQuantizationType) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(int(qtype)))

    def row_size(self, qtype: GGMLQuantizationType, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(int(qtype), n_per_row))

    def quantize(self, rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None,
                 rows_per_matrix: int | None = None, threads: int = 1,
                 src_type: GGMLQuantizationType = GGMLQuantizationType.F32) -> np.ndarray:
        """Quantize `rows` [n_rows, n_per_row] to `qtype` bytes.

        `rows` are float32, or with `src_type` BF16/F16 their raw 16-bit words: each task then widens its own
        rows to F32 with ggml's converter just before quantizing them (no separate F32 copy of the input).
        `imatrix` is [n_matrices, n_per_row] (one importance vector per expert) or [n_per_row]; matrix m covers
        rows m*rows_per_matrix .. (m+1)*rows_per_matrix-1.
        """
        widen = None
        if src_type is GGMLQuantizationType.F32:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
        elif src_type in _TO_F32_ROW:
            rows = np.ascontiguousarray(rows)
            if rows.dtype.itemsize not in (1, 2):
                raise GgmlError(f"{src_type.name} rows must be 16-bit words or their bytes, not {rows.dtype}")
            rows = rows.view(np.uint16)
            widen = getattr(self.lib, _TO_F32_ROW[src_type])
        else:
            raise GgmlError(f"cannot quantize from {src_type.name}")
        n_rows, n_per_row = rows.shape
        src_item = rows.dtype.itemsize
        if imatrix is None and self.requires_imatrix(qtype):
            raise GgmlError(f"{qtype.name} needs an importance matrix (--imatrix)")
        rows_per_matrix = rows_per_matrix or n_rows
        imat = None
        if imatrix is not None:
            imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1, n_per_row)
            if imat.shape[0] * rows_per_matrix != n_rows:
                raise GgmlError(f"imatrix has {imat.shape[0]} vectors for {n_rows // rows_per_matrix} matrices")
        row_size = self.row_size(qtype, n_per_row)
        out = np.empty(n_rows * row_size, dtype=np.uint8)
        self.lib.ggml_quantize_init(int(qtype))
        src, dst = rows.ctypes.data, out.ctypes.data
        per_task = max(ROWS_PER_TASK, -(-MIN_TASK_ELEMENTS // n_per_row))

        def task(first: int) -> None:
            n = min(per_task, n_rows - first, rows_per_matrix - first % rows_per_matrix)
            im = None if imat is None else imat[first // rows_per_matrix].ctypes.data
            f32 = src + first * n_per_row * src_item
            if widen is not None:
                buf = np.empty(n * n_per_row, dtype=np.float32)
                widen(f32, buf.ctypes.data, n * n_per_row)
                f32 = buf.ctypes.data
            size = self.lib.ggml_quantize_chunk(int(qtype), f32, dst + first * row_size, 0, n, n_per_row, im)
            if not self.lib.ggml_validate_row_data(int(qtype), dst + first * row_size, size):
                raise GgmlError(f"ggml produced invalid {qtype.name} data")

        starts = []
        r = 0
        while r < n_rows:
            starts.append(r)
            r += min(per_task, rows_per_matrix - r % rows_per_matrix)
        if threads <= 1 or len(starts) == 1:
            for s in starts:
                task(s)
        else:
            list(_pool(threads).map(task, starts))
        return out


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count (tensors are quantized one after another, often per expert)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="ggml-quantize")


@cache
def kernels(lib_dir: str) -> GgmlKernels:
    """One loaded library per directory."""
    return GgmlKernels(lib_dir)
