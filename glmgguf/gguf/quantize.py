"""`glmgguf quantize`: a glm-dsa GGUF -> a mixed-quant GGUF by recipe, streaming, with ggml's own kernels.

The input is memory-mapped (gguf's GGUFReader); one tensor slab (whole experts, or row blocks of a big matrix)
is dequantized to F32, quantized and written at a time. All KV metadata is copied; general.file_type, the
quantization version, the imatrix keys llama-quantize writes and our `glmgguf.recipe*` keys are set.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import psutil
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from tqdm import tqdm

from glmgguf import __version__
from glmgguf.errors import GlmggufError
from glmgguf.gguf.encode import bf16_words_to_f32, default_kernels, encode
from glmgguf.gguf.imatrix import Imatrix, imatrix_for_plan, write_imatrix_keys
from glmgguf.gguf.keys import READER_PREFIX, SPLIT_PREFIX, Arch, Keys, Provenance, QuantizeImatrix, arch_key
from glmgguf.gguf.plan import PlannedTensor
from glmgguf.gguf.qtypes import FLOAT_TYPES, file_type_of, nbytes
from glmgguf.gguf.reader import read_gguf
from glmgguf.gguf.recipe import Recipe, Resolution
from glmgguf.gguf.writer import atomic_gguf, split_paths, write_tensor_chunks
from glmgguf.layout import GGUF_ARCH, LayerInfo, LayerKind, Transform, parse_gguf_name

log = logging.getLogger(__name__)

SLAB_ELEMENTS = 1 << 24  # rows dequantized and quantized at once (64 MiB of F32)
OUR_KEYS = (Provenance.VERSION, Provenance.RECIPE, Provenance.RECIPE_SHA256)
SKIPPED_KEYS = (READER_PREFIX, SPLIT_PREFIX, Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE,
                Keys.General.QUANTIZATION_VERSION, QuantizeImatrix.PREFIX, *OUR_KEYS)


class GgufInputError(GlmggufError, ValueError):
    """The input GGUF is not a glm-dsa model this tool can quantize."""


@dataclass
class GgufModel:
    """A (possibly split) glm-dsa GGUF opened for reading: KV fields, tensors, blocks, planned tensors."""

    paths: list[Path]
    readers: list[GGUFReader]
    fields: dict[str, gguf.ReaderField]
    tensors: dict[str, gguf.ReaderTensor]
    layers: tuple[LayerInfo, ...]
    plan: list[PlannedTensor]  # ggml_type = the input's type
    owners: dict[str, GGUFReader]  # the part each tensor lives in

    def value(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's memory map (as llama-quantize unmaps each weight)."""
        rt, reader = self.tensors[name], self.owners[name]
        mm = getattr(reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = rt.data_offset - rt.data_offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, rt.data_offset + rt.n_bytes - start)
        except (OSError, ValueError):
            pass


def _layers_from_kv(fields: dict[str, gguf.ReaderField], path: Path) -> tuple[LayerInfo, ...]:
    def val(template: str, default=None):
        f = fields.get(arch_key(template))
        return default if f is None else f.contents()

    n_blocks = val(Keys.LLM.BLOCK_COUNT)
    if n_blocks is None:
        raise GgufInputError(f"{path}: no {arch_key(Keys.LLM.BLOCK_COUNT)}")
    n_mtp = int(val(Keys.LLM.NEXTN_PREDICT_LAYERS, 0) or 0)
    n_dense = int(val(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0) or 0)
    n_expert = val(Keys.LLM.EXPERT_COUNT, 0) or 0  # one count, or one per block (per-layer expert counts)
    counts = [int(c) for c in n_expert] if isinstance(n_expert, list) else [int(n_expert)] * n_blocks
    if len(counts) != n_blocks:
        raise GgufInputError(f"{path}: {arch_key(Keys.LLM.EXPERT_COUNT)} has {len(counts)} entries for "
                             f"{n_blocks} blocks")
    types = val(Arch.INDEXER_TYPES) or []
    n_trunk = n_blocks - n_mtp
    layers = []
    last_full = 0
    for i in range(n_blocks):
        is_mtp = i >= n_trunk
        full = bool(types[i]) if i < len(types) else True
        if not is_mtp and full:
            last_full = i
        moe = is_mtp or i >= n_dense
        layers.append(LayerInfo(index=i, kind=LayerKind.MOE if moe else LayerKind.DENSE, is_mtp=is_mtp,
                                indexer=None if is_mtp else ("full" if full else "shared"),
                                indexer_source=None if is_mtp else last_full, n_experts=counts[i] if moe else 0))
    return tuple(layers)


def open_gguf(path: str | os.PathLike) -> GgufModel:
    """Open a glm-dsa GGUF (any part of a split one) and map its tensors onto the layout's roles."""
    path = Path(path)
    if not path.is_file():
        raise GgufInputError(f"{path} not found")
    paths = split_paths(path)
    readers = []
    for p in paths:
        if not p.is_file():
            raise GgufInputError(f"{p}: missing part of a split GGUF")
        readers.append(read_gguf(p))
    fields = readers[0].fields
    arch_field = fields.get(Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else None
    if arch != GGUF_ARCH:
        raise GgufInputError(f"{path}: architecture {arch!r} is not {GGUF_ARCH} (GLM-5.x); refusing to quantize it")
    layers = _layers_from_kv(fields, path)
    tensors: dict[str, gguf.ReaderTensor] = {}
    owners: dict[str, GGUFReader] = {}
    plan = []
    for r in readers:
        for rt in r.tensors:
            parsed = parse_gguf_name(rt.name)
            if parsed is None:
                raise GgufInputError(f"{path}: tensor {rt.name} is not part of the {GGUF_ARCH} layout")
            layer = None
            if parsed.layer is not None:
                if parsed.layer >= len(layers):
                    raise GgufInputError(f"{path}: tensor {rt.name} is beyond block_count {len(layers)}")
                layer = layers[parsed.layer]
            tensors[rt.name] = rt
            owners[rt.name] = r
            plan.append(PlannedTensor(name=rt.name, role=parsed.rule.role, layer=layer, sources=[rt.name],
                                      transform=Transform.COPY, shape=tuple(int(x) for x in reversed(rt.shape)),
                                      ggml_type=Q(rt.tensor_type)))
    return GgufModel(paths, readers, fields, tensors, layers, plan, owners)


def copy_kv(w: gguf.GGUFWriter, fields: dict[str, gguf.ReaderField], skip: tuple[str, ...] = SKIPPED_KEYS) -> None:
    """Copy KV pairs (with their exact GGUF value types) from a reader to a writer."""
    for key, f in fields.items():
        if key.startswith(skip):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype is GGUFValueType.ARRAY else None
        if vtype is GGUFValueType.ARRAY and len(f.types) > 2:
            raise GgufInputError(f"KV {key}: nested arrays are not supported")
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)


def _slabs(n_mat: int, rows_per_matrix: int, budget_rows: int) -> Iterator[tuple[int, int, int, int]]:
    """(first_row, end_row, first_matrix, end_matrix): whole matrices when they fit, else row blocks of one."""
    if rows_per_matrix <= budget_rows:
        k = budget_rows // rows_per_matrix
        for m in range(0, n_mat, k):
            e = min(n_mat, m + k)
            yield m * rows_per_matrix, e * rows_per_matrix, m, e
    else:
        for m in range(n_mat):
            for r in range(0, rows_per_matrix, budget_rows):
                yield m * rows_per_matrix + r, m * rows_per_matrix + min(rows_per_matrix, r + budget_rows), m, m + 1


def to_f32(rows: np.ndarray, src_type: Q) -> np.ndarray:
    """F32 values of input rows (exact for F32/F16/BF16; other types via gguf-py)."""
    if src_type is Q.F32:
        return np.asarray(rows, dtype=np.float32)
    if src_type is Q.F16:
        return np.ascontiguousarray(rows).view(np.float16).astype(np.float32)
    if src_type is Q.BF16:
        return bf16_words_to_f32(np.ascontiguousarray(rows).view(np.uint16))
    return np.asarray(gguf.quants.dequantize(rows, src_type), dtype=np.float32)


def tensor_chunks(rt: gguf.ReaderTensor, src_type: Q, t: PlannedTensor, imatrix: np.ndarray | None = None,
                  threads: int = 1) -> Iterator[np.ndarray]:
    """The bytes of tensor `t` (target `t.ggml_type`) from the input tensor `rt`, slab by slab."""
    if t.ggml_type is src_type:
        yield np.asarray(rt.data).reshape(-1).view(np.uint8)
        return
    n_per_row = t.shape[-1]
    rows_per_matrix = t.shape[-2] if len(t.shape) >= 2 else 1
    n_mat = math.prod(t.shape[:-2]) if len(t.shape) > 2 else 1
    data = np.asarray(rt.data)
    flat = data.reshape(n_mat * rows_per_matrix, -1)
    for r0, r1, m0, m1 in _slabs(n_mat, rows_per_matrix, max(1, SLAB_ELEMENTS // n_per_row)):
        im = None if imatrix is None else imatrix[m0:m1]
        if t.ggml_type not in FLOAT_TYPES and src_type in FLOAT_TYPES:
            # ggml widens 16-bit rows to F32 inside each quantization task: no F32 copy of the slab
            yield default_kernels().quantize(flat[r0:r1], t.ggml_type, imatrix=im, threads=threads,
                                             rows_per_matrix=(r1 - r0) // (m1 - m0), src_type=src_type)
            continue
        f32 = to_f32(flat[r0:r1], src_type).reshape(m1 - m0, -1, n_per_row)
        if t.ggml_type in FLOAT_TYPES:
            yield encode(f32, t.ggml_type)
        else:
            yield encode(f32, t.ggml_type, imatrix=im, threads=threads)


@dataclass
class QuantizeResult:
    paths: list[Path]
    n_tensors: int
    n_bytes: int
    seconds: float
    peak_rss: int
    resolution: Resolution
    warnings: list[str]

    @property
    def path(self) -> Path:
        return self.paths[0]


def plan_quantize(model: GgufModel, recipe: Recipe) -> tuple[list[PlannedTensor], Resolution]:
    """The output tensors (input order, recipe types) and the recipe's resolution; refuses requantizing."""
    resolution = recipe.resolve(model.plan, model.layers)
    out = []
    for src in model.plan:
        t = PlannedTensor(src.name, src.role, src.layer, src.sources, src.transform, src.shape,
                          resolution[src.name])
        if t.ggml_type is Q.NVFP4 and src.ggml_type is not Q.NVFP4:
            raise GgufInputError(f"{src.name}: NVFP4 needs a per-expert scale computed from the weights: write it "
                                 "with 'glmgguf convert --recipe' from the safetensors checkpoint")
        if src.ggml_type not in FLOAT_TYPES and t.ggml_type is not src.ggml_type:
            raise GgufInputError(f"{model.paths[0]}: {src.name} is already {src.ggml_type.name}; quantize from an "
                                 "F32/BF16/F16 GGUF (requantizing loses precision)")
        out.append(t)
    return out, resolution


def quantize_gguf(src: str | os.PathLike, out: str | os.PathLike, recipe: Recipe, imatrix: Imatrix | None = None,
                  threads: int = 1, split_max_size: int = 0, force: bool = False,
                  progress: bool = True) -> QuantizeResult:
    """Quantize the glm-dsa GGUF `src` into `out` by `recipe` (atomic; split parts with `split_max_size`)."""
    start = time.perf_counter()
    model = open_gguf(src)
    plan, resolution = plan_quantize(model, recipe)
    imatrix_data, imatrix_warnings = imatrix_for_plan(plan, imatrix)
    warnings = resolution.warnings + imatrix_warnings
    for w in warnings:
        log.warning("%s", w)
    src_types = {t.name: t.ggml_type for t in model.plan}
    total = sum(nbytes(t.ggml_type, t.n_elements) for t in plan)
    proc = psutil.Process()
    peak = proc.memory_info().rss
    with atomic_gguf(out, GGUF_ARCH, plan, split_max_size, force=force, inputs=split_paths(src)) as w:
        copy_kv(w, model.fields)
        w.add_file_type(file_type_of(plan)[1])
        if any(t.ggml_type not in FLOAT_TYPES for t in plan):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if imatrix is not None:
            write_imatrix_keys(w, imatrix)
        w.add_string(Provenance.VERSION, __version__)
        for key, value in recipe.provenance().items():
            w.add_string(key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar:
            for t in plan:
                chunks = tensor_chunks(model.tensors[t.name], src_types[t.name], t, imatrix_data[t.name], threads)
                bar.update(write_tensor_chunks(w, chunks))
                peak = max(peak, proc.memory_info().rss)
                model.release(t.name)
        paths = list(w.final_paths)
    return QuantizeResult(paths, len(plan), total, time.perf_counter() - start, peak, resolution, warnings)
