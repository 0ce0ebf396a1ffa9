"""`glmgguf convert`: a GLM-5.x safetensors checkpoint -> one GGUF for llama.cpp, in one streaming pass."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import psutil
from gguf import GGMLQuantizationType as Q
from tqdm import tqdm

from glmgguf.checkpoint import GlmCheckpoint, open_checkpoint
from glmgguf.gguf.encode import encode_words
from glmgguf.gguf.imatrix import Imatrix, imatrix_for_plan, write_imatrix_keys
from glmgguf.gguf.keys import Provenance
from glmgguf.gguf.metadata import write_hparams, write_provenance
from glmgguf.gguf.plan import OUTTYPES, IndexerMode, MtpMode, PlannedTensor, plan_tensors
from glmgguf.gguf.qtypes import FLOAT_TYPES, file_type_of, nbytes, row_fits
from glmgguf.gguf.recipe import TypeChooser
from glmgguf.gguf.vocab import write_vocab
from glmgguf.gguf.writer import atomic_gguf, write_tensor_chunks
from glmgguf.io import CheckpointError
from glmgguf.layout import GGUF_ARCH, Transform

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class OutTypeChooser:
    """Upstream's policy (`convert --outtype`): F32 for norms/1-D/router/indexer.proj, else `outtype` (F16 where
    its blocks do not divide a row)."""

    outtype: str

    def __call__(self, t: PlannedTensor) -> Q:
        if t.always_f32:
            return Q.F32
        base = OUTTYPES[self.outtype]
        return base if row_fits(base, t.row_size) else Q.F16

    def provenance(self) -> dict[str, str]:
        return {Provenance.OUTTYPE: self.outtype}

    def warnings(self) -> list[str]:
        return []


def outtype_chooser(outtype: str) -> TypeChooser:
    """The `--outtype` policy as a `TypeChooser` (`outtype` one of `OUTTYPES`)."""
    if outtype not in OUTTYPES:
        raise KeyError(outtype)
    return OutTypeChooser(outtype)


@dataclass
class ConvertResult:
    path: Path
    n_tensors: int
    n_bytes: int
    seconds: float
    peak_rss: int
    paths: list[Path] | None = None  # every part of a split output (else [path])
    warnings: list[str] | None = None
    requires_patches: list[str] | None = None  # llama.cpp patches the file needs (see glmgguf.llama.patches)


# stored float words -> (unsigned view, mask without the sign bit, bits of +Inf): |x| < Inf on the raw bits
_ABS_BITS = {"BF16": (np.uint16, 0x7FFF, 0x7F80), "F16": (np.uint16, 0x7FFF, 0x7C00),
             "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000)}
_WORD_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}  # stored dtypes read without torch


def count_nonfinite(words: np.ndarray, dtype: str) -> int:
    """NaN/Inf values among a tensor's stored float words (one pass over the raw bits)."""
    view, absmask, inf = _ABS_BITS[dtype]
    bits = words.reshape(-1).view(view)
    if bits.size == 0 or int(np.max(bits & view(absmask))) < inf:
        return 0
    return int(np.count_nonzero((bits & view(absmask)) >= inf))


ROW_CHUNK_BYTES = 256 * 2**20  # a source larger than this as float32 is read and encoded in row blocks


def _row_ranges(ckpt: GlmCheckpoint, name: str) -> list[tuple[int, int] | None]:
    """The row blocks a source is read in: [None] (whole) unless it is larger than `ROW_CHUNK_BYTES` as float32
    (GLM-5.2's 154,880 x 6144 embedding and head: 3.8 GB), in which case quantizing row blocks gives the same
    bytes (ggml quantizes rows independently) with one block in memory."""
    info = ckpt.reader.info(name)
    rows = info.shape[0] if info.shape else 0
    if len(info.shape) < 2 or math.prod(info.shape) * 4 <= ROW_CHUNK_BYTES:
        return [None]
    block = ckpt.reader.row_block(name)
    step = max(block, ROW_CHUNK_BYTES // (4 * math.prod(info.shape[1:])) // block * block)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _read_words(ckpt: GlmCheckpoint, name: str, allow_nonfinite: bool,
                rows: tuple[int, int] | None = None) -> tuple[np.ndarray, Q]:
    """A tensor's stored words (only `rows` [start, stop) when given) and their type, refusing NaN/Inf unless
    allowed. Block-FP8 weights come dequantized to F32 exactly as the upstream converter dequantizes them (no
    torch); other stored types are widened to F32 through torch."""
    reader = ckpt.reader
    info = reader.info(name)
    if rows is not None:
        words, dtype = reader.row_words(name, *rows), "F32" if reader.is_fp8(name) else info.dtype
    elif reader.is_fp8(name):
        words, dtype = reader.get_f32(name), "F32"
    elif info.dtype in _WORD_TYPES:
        words, dtype = reader.get_words(name), info.dtype
    else:
        words, dtype = reader.get(name).float().numpy(), "F32"
    bad = count_nonfinite(words, dtype)
    if bad:
        where = name if rows is None else f"{name} rows {rows[0]}-{rows[1]}"
        if not allow_nonfinite:
            raise CheckpointError(f"{where} has {bad} NaN/Inf values (use --allow-nonfinite to convert anyway)")
        log.warning("%s has %d NaN/Inf values", where, bad)
    return words, _WORD_TYPES[dtype]


def tensor_chunks(ckpt: GlmCheckpoint, t: PlannedTensor, allow_nonfinite: bool = False,
                  imatrix: np.ndarray | None = None, threads: int = 1) -> Iterator[np.ndarray]:
    """The encoded bytes of one planned tensor, one source tensor (one expert) or one row block at a time.

    Reads the stored words with numpy (no torch for F32/F16/BF16 checkpoints). `imatrix` ([n_matrices,
    n_per_row], e.g. one row per expert) goes to the quantizer, expert e getting row e.
    """
    lay = ckpt.layout
    match t.transform:
        case Transform.COPY | Transform.STACK_EXPERTS:
            for i, src in enumerate(t.sources):
                im = None if imatrix is None else imatrix[i]
                for rows in _row_ranges(ckpt, src):
                    words, src_type = _read_words(ckpt, src, allow_nonfinite, rows)
                    yield encode_words(words, src_type, t.ggml_type, imatrix=im, threads=threads)
        case Transform.SPLIT_K_B | Transform.SPLIT_V_B:
            words, src_type = _read_words(ckpt, t.sources[0], allow_nonfinite)
            kv_b = words.reshape(lay.n_heads, lay.qk_nope_head_dim + lay.v_head_dim, lay.kv_lora_rank)
            k_b, v_b = kv_b[:, :lay.qk_nope_head_dim], kv_b[:, lay.qk_nope_head_dim:]
            part = k_b.transpose(0, 2, 1) if t.transform is Transform.SPLIT_K_B else v_b
            yield encode_words(np.ascontiguousarray(part), src_type, t.ggml_type, imatrix=imatrix, threads=threads)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    choose: TypeChooser,
    mtp: MtpMode = MtpMode.KEEP,
    indexer: IndexerMode = IndexerMode.NATIVE,
    settings: dict[str, str] | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    imatrix: Imatrix | None = None,
    threads: int = 1,
    split_max_size: int = 0,
) -> ConvertResult:
    """Plan from headers, then stream every tensor through `choose`'s type into `out` (atomic).

    Quantized types use ggml's kernels with `threads` threads and the `imatrix` entries of each tensor;
    `split_max_size` (bytes) writes llama.cpp's split GGUF parts. `settings` (name -> value) are recorded as
    `glmgguf.<name>` keys, next to `choose`'s own provenance.
    """
    start = time.perf_counter()
    ckpt = open_checkpoint(src)
    plan = plan_tensors(ckpt, mtp, indexer)
    for t in plan:
        t.ggml_type = choose(t)
    warnings = choose.warnings()
    imatrix_data, imatrix_warnings = imatrix_for_plan(plan, imatrix)
    warnings += imatrix_warnings
    for w in warnings:
        log.warning("%s", w)
    nvfp4 = None
    if any(t.ggml_type == Q.NVFP4 for t in plan):  # + per-expert `.scale` tensors, ModelOpt-exact data
        from glmgguf.nvfp4.gguf import Nvfp4Encoder, with_scale_tensors

        plan, nvfp4 = with_scale_tensors(plan), Nvfp4Encoder()
    with_mtp = mtp is not MtpMode.DROP
    block_count = ckpt.layout.block_count if with_mtp else ckpt.layout.n_layers
    total = sum(nbytes(t.ggml_type, t.n_elements) for t in plan)
    proc = psutil.Process()
    peak = proc.memory_info().rss
    with atomic_gguf(out, GGUF_ARCH, plan, split_max_size, force=force, inputs=[src]) as w:
        w.add_name(Path(src).resolve().name)
        w.add_file_type(file_type_of(plan)[1])
        if any(t.ggml_type not in FLOAT_TYPES for t in plan):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        needs = write_hparams(w, ckpt.layout, block_count, with_mtp)
        write_vocab(w, ckpt.reader.root, ckpt.layout.vocab_size)
        if imatrix is not None:
            write_imatrix_keys(w, imatrix)
        extra = {Provenance.PREFIX + k: v for k, v in (settings or {}).items()}
        write_provenance(w, ckpt.layout, {Provenance.MTP: mtp.value, Provenance.INDEXER: indexer.value, **extra,
                                          **choose.provenance()})
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            for t in plan:
                if nvfp4 is not None and nvfp4.handles(t):
                    chunks = nvfp4.chunks(ckpt, t)
                else:
                    chunks = tensor_chunks(ckpt, t, allow_nonfinite, imatrix_data[t.name], threads)
                bar.update(write_tensor_chunks(w, chunks))
                peak = max(peak, proc.memory_info().rss)
        paths = list(w.final_paths)
    return ConvertResult(paths[0], len(plan), total, time.perf_counter() - start, peak, paths, warnings, needs)
