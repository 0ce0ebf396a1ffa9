"""An NVFP4 export read back: every quantized projection dequantized into a plain Hugging Face checkpoint."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from glmgguf.io import CheckpointReader
from glmgguf.io.dequantized import natural_key, write_dequantized
from glmgguf.io.writer import PlanEntry
from glmgguf.nvfp4 import quant as nq
from glmgguf.nvfp4.export import KEPT_FILES
from glmgguf.nvfp4.formats import Nvfp4Format, detect_format


def quantized_modules(reader: CheckpointReader, fmt: Nvfp4Format) -> list[str]:
    """The modules of an export stored as NVFP4 (a packed uint8 weight)."""
    packed = fmt.suffixes[0]
    return sorted({n[: -len(packed) - 1] for n in reader.names()
                   if n.endswith("." + packed) and reader.info(n).dtype == "U8"})


def _dequantized_plan(reader: CheckpointReader, fmt: Nvfp4Format, modules: list[str],
                      dtype: torch.dtype) -> list[PlanEntry]:
    """Every tensor that is not part of a quantized projection, then one `dtype` weight per quantized module."""
    quant_names = {f"{m}.{s}" for m in modules for s in fmt.suffixes}
    plan: list[PlanEntry] = []
    for name in sorted(reader.names(), key=natural_key):
        if name not in quant_names:
            info = reader.info(name)
            plan.append((name, info.shape, info.torch_dtype))
    for m in modules:
        n, half = reader.info(f"{m}.{fmt.suffixes[0]}").shape
        plan.append((f"{m}.weight", (n, half * 2), dtype))
    return plan


def dequantize_export(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      force: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint from an NVFP4 export: every quantized projection dequantized to
    `dtype` (`E2M1 * weight_scale * weight_scale_2`), everything else copied, the quantization config removed."""
    fmt = detect_format(src)
    sfx = fmt.suffixes
    reader = CheckpointReader(src)
    modules = quantized_modules(reader, fmt)
    plan = _dequantized_plan(reader, fmt, modules, dtype)

    def weight(m: str) -> torch.Tensor:
        s2 = fmt.multiplier(reader.get(f"{m}.{sfx[2]}").float())
        return nq.dequantize(reader.get(f"{m}.{sfx[0]}"), reader.get(f"{m}.{sfx[1]}"), s2, dtype)

    return write_dequantized(reader, out, plan, {f"{m}.weight": partial(weight, m) for m in modules}, force,
                             skip_files=KEPT_FILES)
