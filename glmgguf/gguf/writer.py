"""Streaming GGUF output on top of gguf-py's GGUFWriter: tensor data arrives in chunks, never whole."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from glmgguf.errors import storage_errors
from glmgguf.gguf.plan import PlannedTensor
from glmgguf.gguf.qtypes import nbytes
from glmgguf.io.atomic import check_output, output_lock


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


@contextmanager
def atomic_gguf(path: str | os.PathLike, arch: str, plan: list[PlannedTensor], split_max_size: int = 0,
                force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter for `plan` whose file(s) are written as `X.partial` and renamed only when all are complete.

    With `split_max_size` the output is llama.cpp's split layout (`OUT-00001-of-0000N.gguf`, `split.*` keys in
    every part, written by gguf-py); a model that fits stays one file named `path`. The caller writes the
    header, KV, tensor info and data; on any error every partial file is removed (a full disk, a size limit or a
    read-only place becomes one `StorageError`).
    """
    target = Path(path)
    w = open_writer(target, arch, plan, split_max_size)
    finals = w.format_shard_names(target)
    inputs = list(inputs)
    for f in finals:
        check_output(f, force, inputs)
    partials = [f.with_name(f.name + ".partial") for f in finals]
    w.final_paths = finals  # type: ignore[attr-defined]
    with storage_errors(target), output_lock(target):
        try:
            w.fout = []
            for p in partials:
                w.fout.append(open(p, "wb"))
            w.path = target
            w.state = WriterState.EMPTY
            yield w
            w.close()
            for p, f in zip(partials, finals, strict=True):
                os.replace(p, f)
        except BaseException:
            _discard(w, partials)
            raise


def _discard(w: gguf.GGUFWriter, partials: list[Path]) -> None:
    """Close every part without raising (closing flushes, which fails again on a full disk), then remove them."""
    for fout in w.fout or []:
        with suppress(OSError):
            fout.close()
    w.fout = None
    for p in partials:
        p.unlink(missing_ok=True)


def split_paths(path: str | os.PathLike) -> list[Path]:
    """All parts of a (possibly split) GGUF given any one of them: [path] for a single file."""
    p = Path(path)
    m = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", p.name)
    if m is None:
        return [p]
    n = int(m.group(3))
    return [p.with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
