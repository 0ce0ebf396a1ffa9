"""Streaming GGUF output on top of gguf-py's GGUFWriter: tensor data arrives in chunks, never whole."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from glmgguf.gguf.encode import nbytes
from glmgguf.gguf.plan import PlannedTensor


def open_writer(path: Path, arch: str, plan: list[PlannedTensor], split_max_size: int = 0) -> gguf.GGUFWriter:
    """A GGUFWriter with every tensor's info registered (in plan order); KV pairs are added by the caller."""
    w = gguf.GGUFWriter(path, arch, split_max_size=split_max_size)
    for t in plan:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.ggml_type, t.n_elements),
                          raw_dtype=t.ggml_type)
    return w


def write_tensor_chunks(w: gguf.GGUFWriter, chunks: Iterable[np.ndarray]) -> int:
    """Write the next planned tensor's data from byte chunks (what GGUFWriter.write_tensor_data does whole)."""
    if w.state not in (WriterState.TI_DATA, WriterState.WEIGHTS) or w.fout is None:
        raise ValueError(f"GGUF writer is not ready for tensor data (state {w.state})")
    file_id = next(i for i, tensors in enumerate(w.tensors) if tensors)
    fout = w.fout[file_id]
    name = next(iter(w.tensors[file_id]))
    info = w.tensors[file_id].pop(name)
    w.write_padding(fout, fout.tell())
    written = 0
    for chunk in chunks:
        fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        written += chunk.nbytes
    if written != info.nbytes:
        raise ValueError(f"{name}: wrote {written} bytes, planned {info.nbytes}")
    w.write_padding(fout, written)
    w.state = WriterState.WEIGHTS
    return written
