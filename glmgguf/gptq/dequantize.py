"""A GPTQ export read back: every INT4 module dequantized into a plain checkpoint transformers loads."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from glmgguf.gptq.errors import ExportError
from glmgguf.gptq.export import KEPT_FILES
from glmgguf.gptq.formats import FORMATS, GptqFormat
from glmgguf.io import CheckpointReader
from glmgguf.io.dequantized import natural_key, write_dequantized
from glmgguf.io.writer import PlanEntry


def detect_format(reader: CheckpointReader) -> GptqFormat:
    qc = reader.config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "compressed-tensors" and qc.get("format") == "pack-quantized":
        return FORMATS["compressed-tensors"]
    if method == "gptq":
        return FORMATS["gptq"]
    raise ExportError(f"{reader.root} is not a GPTQ export (quantization_config: {method or 'none'})")


def quantized_modules(reader: CheckpointReader, fmt: GptqFormat) -> list[str]:
    first = "." + fmt.suffixes[0]
    return sorted((n[: -len(first)] for n in reader.names() if n.endswith(first)), key=natural_key)


def _plan(reader: CheckpointReader, fmt: GptqFormat, modules: list[str], dtype: torch.dtype) -> list[PlanEntry]:
    quant = {f"{m}.{s}" for m in modules for s in fmt.suffixes}
    plan: list[PlanEntry] = [(n, reader.info(n).shape, reader.info(n).torch_dtype)
                             for n in sorted(reader.names(), key=natural_key) if n not in quant]
    plan += [(f"{m}.weight", fmt.shape(reader, m), dtype) for m in modules]
    return plan


def dequantize_export(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                      force: bool = False) -> Path:
    """Write a plain checkpoint from a GPTQ export: INT4 modules as `dtype` (code x scale, BF16 arithmetic),
    everything else copied, the quantization config removed."""
    reader = CheckpointReader(src)
    fmt = detect_format(reader)
    modules = quantized_modules(reader, fmt)
    plan = _plan(reader, fmt, modules, dtype)

    def weight(m: str) -> torch.Tensor:
        return fmt.read(reader.get, m).dequantize(dtype)

    return write_dequantized(reader, out, plan, {f"{m}.weight": partial(weight, m) for m in modules}, force,
                             skip_files=KEPT_FILES)
