"""llama.cpp importance matrices: read (GGUF and legacy .dat), check against a model, slice experts, write.

The pinned `llama-imatrix` writes a GGUF with, per weight, `<name>.in_sum2` (F32, [n_mat, ne0]: summed squared
activations per matrix) and `<name>.counts` (F32, [n_mat, 1] for expert tensors, [1, 1] otherwise; a 3-D
non-expert tensor such as attn_k_b has one count for all its matrices). llama-quantize's `load_imatrix` turns
them into `in_sum2 / round(count)` per matrix, and 1.0 where a count is 0 (an expert never routed); the legacy
format stores `sums` already scaled by `ncall`, divided by it on load. `Imatrix.values(name)` does the same.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from glmgguf.errors import GlmggufError
from glmgguf.gguf.keys import Keys, QuantizeImatrix
from glmgguf.gguf.qtypes import FLOAT_TYPES, needs_imatrix
from glmgguf.gguf.reader import read_gguf

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


class ImatrixError(GlmggufError, ValueError):
    """An importance matrix is unreadable or does not fit the model."""


@dataclass
class ImatrixEntry:
    """Raw statistics of one weight: `sums` [n_values] and `counts` [n_counts] (n_values % n_counts == 0)."""

    sums: np.ndarray
    counts: np.ndarray
    legacy: bool = False  # legacy .dat: one count (ncall); a zero count keeps the sums as they are

    def values(self) -> np.ndarray:
        """Normalized importance, flat, as llama-quantize computes it (float32 arithmetic)."""
        n = self.counts.size
        sums = self.sums.reshape(n, -1).astype(np.float32)
        counts = self.counts.astype(np.float32).reshape(n, 1)
        unseen = sums if self.legacy else np.ones_like(sums)
        out = np.where(counts > 0, sums / np.where(counts > 0, counts, np.float32(1)), unseen)
        return out.astype(np.float32).reshape(-1)


@dataclass
class Imatrix:
    """An importance matrix: entries by GGUF tensor name, plus the file's metadata."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: Path | None = None
    legacy: bool = False

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def values(self, name: str) -> np.ndarray | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.values()

    def for_tensor(self, name: str, shape: Sequence[int]) -> np.ndarray | None:
        """Importance for tensor `name` of numpy-order `shape`, as [n_matrices, n_per_row]; None if absent.

        Raises ImatrixError when the entry's size is not n_per_row * n_matrices (llama-quantize aborts there:
        e.g. an imatrix of the unpruned model used on a pruned one).
        """
        values = self.values(name)
        if values is None:
            return None
        n_per_row = shape[-1]
        n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if values.size != n_per_row * n_mat:
            hint = ""
            if len(shape) > 2 and values.size % n_per_row == 0:
                hint = (f" ({values.size // n_per_row} experts in the imatrix, {n_mat} in the model: slice it "
                        "with the prune keep-map)")
            raise ImatrixError(f"{self._where()}imatrix for {name} has {values.size} values, the model's tensor "
                               f"needs {n_per_row} x {n_mat} = {n_per_row * n_mat}{hint}")
        return values.reshape(n_mat, n_per_row)

    def _where(self) -> str:
        return f"{self.path}: " if self.path else ""

    def check(self, tensors: Iterable[tuple[str, Sequence[int]]], all_names: Iterable[str] | None = None) -> list[str]:
        """Refuse an imatrix that does not fit `tensors` (the ones to quantize: name, numpy shape).

        Returns warnings: entries naming no tensor of the model (`all_names`, default the names in `tensors`).
        """
        tensors = list(tensors)
        names = {n for n, _ in tensors}
        matched = [n for n in self.entries if n in names]
        if not matched:
            raise ImatrixError(f"{self._where()}no imatrix entry names a tensor of this model "
                               f"(e.g. {next(iter(self.entries), '-')}): an imatrix of another model?")
        for name, shape in tensors:
            self.for_tensor(name, shape)
        known = names if all_names is None else set(all_names) | names
        unknown = sorted(n for n in self.entries if n not in known)
        if unknown:
            return [f"{self._where()}{len(unknown)} imatrix entries name no tensor of this model "
                    f"(e.g. {unknown[0]})"]
        return []

    def slice_experts(self, keep_map: dict[int, Sequence[int]],
                      source_experts: dict[int, int] | None = None) -> Imatrix:
        """The imatrix of a pruned model: expert tensors of layer L keep experts `keep_map[L]`, in that order.

        A legacy .dat entry has one count for all experts; its rows are split by `source_experts[L]` (the
        layer's expert count before pruning, recorded in the keep-map)."""
        entries = dict(self.entries)
        for layer, keep in keep_map.items():
            for suffix in EXPERT_TENSORS:
                name = f"blk.{layer}.{suffix}"
                if name in entries:
                    entries[name] = self._slice_entry(name, entries[name], list(keep),
                                                      (source_experts or {}).get(layer))
        return Imatrix(entries, list(self.datasets), self.chunk_count, self.chunk_size, self.path, self.legacy)

    def _slice_entry(self, name: str, entry: ImatrixEntry, keep: list[int], n_source: int | None) -> ImatrixEntry:
        n = entry.counts.size
        rows = n_source if n == 1 and entry.legacy and n_source else n
        if rows == 1 or entry.sums.size % rows:
            raise ImatrixError(f"{self._where()}{name} has one count for all experts; cannot slice it")
        if keep and (min(keep) < 0 or max(keep) >= rows):
            raise ImatrixError(f"{self._where()}{name}: keep-map names expert {max(keep)} of {rows}")
        sums = np.ascontiguousarray(entry.sums.reshape(rows, -1)[keep].reshape(-1))
        return ImatrixEntry(sums, entry.counts[keep].copy() if n == rows else entry.counts.copy(), entry.legacy)

    def save(self, path: str | os.PathLike) -> None:
        """Write in the pinned llama-imatrix's GGUF format (readable by llama-quantize)."""
        w = gguf.GGUFWriter(path, arch="")
        w.kv_data[0].clear()  # llama-imatrix writes general.type, not general.architecture
        w.add_type("imatrix")
        w.add_array(Keys.IMatrix.DATASETS, self.datasets or [""])
        w.add_uint32(Keys.IMatrix.CHUNK_COUNT, self.chunk_count)
        w.add_uint32(Keys.IMatrix.CHUNK_SIZE, self.chunk_size)
        for name, e in sorted(self.entries.items()):
            sums, counts = (e.values(), np.ones(1)) if e.legacy else (e.sums, e.counts)  # legacy: values / 1
            w.add_tensor(name + SUM_SUFFIX, sums.astype(np.float32).reshape(counts.size, -1))
            w.add_tensor(name + COUNT_SUFFIX, counts.astype(np.float32).reshape(counts.size, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _load_gguf(path: Path) -> Imatrix:
    r = read_gguf(path, "imatrix GGUF")

    def field_value(key: str, default):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.tensor_type is not gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: {t.name} is {t.tensor_type.name}, imatrix tensors must be F32")
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name[: -len(SUM_SUFFIX)]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name[: -len(COUNT_SUFFIX)]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise ImatrixError(f"{path}: no imatrix data (no *{SUM_SUFFIX} tensors)")
    if sums.keys() != counts.keys():
        bad = sorted(sums.keys() ^ counts.keys())[0]
        raise ImatrixError(f"{path}: mismatched sums and counts for {bad}")
    if Keys.IMatrix.DATASETS not in r.fields or Keys.IMatrix.CHUNK_COUNT not in r.fields:
        raise ImatrixError(f"{path}: missing imatrix metadata ({Keys.IMatrix.DATASETS}, {Keys.IMatrix.CHUNK_COUNT})")
    entries = {}
    for name, s in sums.items():
        c = np.rint(counts[name]).astype(np.int64)  # llama.cpp: std::lround
        if c.size == 0 or s.size % c.size:
            raise ImatrixError(f"{path}: {name} has {s.size} sums for {c.size} counts")
        entries[name] = ImatrixEntry(s, c)
    datasets = field_value(Keys.IMatrix.DATASETS, [])
    return Imatrix(entries, list(datasets) if isinstance(datasets, list) else [datasets],
                   int(field_value(Keys.IMatrix.CHUNK_COUNT, 0)), int(field_value(Keys.IMatrix.CHUNK_SIZE, 0)), path)


def _load_legacy(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ImatrixError(f"{path}: truncated legacy imatrix")
        vals = struct.unpack_from(fmt, raw, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ImatrixError(f"{path}: not an imatrix (GGUF or legacy .dat)")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length <= 0 or length > 4096:
            raise ImatrixError(f"{path}: not an imatrix (GGUF or legacy .dat)")
        name = raw[pos:pos + length].decode(errors="replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{path}: bad value count for {name}")
        sums = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # legacy sums are (raw/count)*ncall; llama-quantize divides by ncall: one "count" of ncall
        entries[name] = ImatrixEntry(sums, np.array([ncall], dtype=np.int64), legacy=True)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if length > 0:
                datasets = [raw[pos:pos + length].decode(errors="replace")]
    return Imatrix(entries, datasets, chunk_count, 0, path, legacy=True)


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix written by llama-imatrix (GGUF, the default, or the legacy .dat format)."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"imatrix file {path} not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)


def slice_experts(imatrix: Imatrix, keep_map: dict[int, Sequence[int]],
                  source_experts: dict[int, int] | None = None) -> Imatrix:
    """`imatrix.slice_experts(...)`: expert axis of layer L restricted to `keep_map[L]` (a prune's keep-map)."""
    return imatrix.slice_experts(keep_map, source_experts)


def slice_file(imatrix: str | os.PathLike, keep_map: str | os.PathLike, out: str | os.PathLike,
               force: bool = False) -> Imatrix:
    """`glmgguf imatrix slice`: the imatrix of the unpruned model (GGUF or .dat) sliced by the keep-map of a
    pruned checkpoint (its directory or `reap_keep_map.json`), written in the GGUF format, atomically."""
    from glmgguf.io.atomic import atomic_file
    from glmgguf.reap.keepmap import read_keep_map

    km = read_keep_map(keep_map)
    sliced = load_imatrix(imatrix).slice_experts(km.keep, km.source_experts)
    with atomic_file(out, force=force, inputs=[imatrix, keep_map]) as tmp:
        sliced.save(tmp)
    return sliced


def imatrix_for_plan(tensors: Iterable, imatrix: Imatrix | None) -> tuple[dict[str, np.ndarray | None], list[str]]:
    """Per tensor (PlannedTensor with `ggml_type` set) the importance data its quantization uses.

    Refuses, before any data is written: a type that needs an imatrix without one (or without an entry for
    that tensor), an imatrix whose sizes do not fit the model, an imatrix that names none of its tensors.
    Returns the data by name (None: quantized without) and warnings.
    """
    tensors = list(tensors)
    quantized = [t for t in tensors if t.ggml_type not in FLOAT_TYPES]
    warnings: list[str] = []
    if imatrix is not None and quantized:
        warnings = imatrix.check([(t.name, t.shape) for t in quantized], [t.name for t in tensors])
    out: dict[str, np.ndarray | None] = {t.name: None for t in tensors}
    for t in quantized:
        data = imatrix.for_tensor(t.name, t.shape) if imatrix is not None else None
        if data is None and needs_imatrix(t.name, t.ggml_type):
            if imatrix is None:
                raise ImatrixError(f"{t.name}: {t.ggml_type.name} needs an importance matrix (--imatrix FILE)")
            raise ImatrixError(f"{imatrix._where()}{t.name}: {t.ggml_type.name} needs importance data, "
                               "and this imatrix has no entry for it")
        out[t.name] = data
    return out, warnings


def write_imatrix_keys(w: gguf.GGUFWriter, imatrix: Imatrix) -> None:
    """The `quantize.imatrix.*` keys llama-quantize writes for the imatrix it used."""
    w.add_string(QuantizeImatrix.FILE, str(imatrix.path or "")[:127])
    if imatrix.datasets:
        w.add_string(QuantizeImatrix.DATASET, imatrix.datasets[0][:127])
    w.add_uint32(QuantizeImatrix.N_ENTRIES, len(imatrix.entries))
    if imatrix.chunk_count > 0:
        w.add_uint32(QuantizeImatrix.N_CHUNKS, imatrix.chunk_count)
