"""The GPTQ checkpoint formats: per quantized Linear `M` (weight [N, K]), the tensors stored and the config.

pack-quantized  (compressed-tensors, what llm-compressor writes for W4A16; vLLM/SGLang `compressed-tensors`):
                M.weight_packed int32 [N, K/8], M.weight_scale bf16 [N, K/128], M.weight_shape int64 [2] = (N, K);
                config.json quantization_config: quant_method "compressed-tensors", format "pack-quantized", one
                config group (targets Linear, int4 symmetric group 128, actorder static) and `ignore`.
gptq            (AutoGPTQ's layout, vLLM `gptq_marlin`): M.qweight int32 [K/8, N], M.qzeros int32 [K/128, N/8]
                (zero point 8 stored as 7, AutoGPTQ's v1 convention), M.scales fp16 [K/128, N], M.g_idx int32 [K];
                quantization_config quant_method "gptq" (+ quantize_config.json), modules kept in BF16 listed as
                vLLM `dynamic` exclusions ("-:" + a regex of the module name).
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch

from glmgguf.gptq import pack
from glmgguf.gptq import quant as gq
from glmgguf.gptq.errors import ExportError
from glmgguf.io.writer import PlanEntry

COMPRESSED_TENSORS_VERSION = "0.19.0"  # the release whose format (and llm-compressor 0.14's GPTQ) this follows


class GptqFormat:
    """One on-disk INT4 layout (see the module docstring)."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]

    def entries(self, module: str, shape: tuple[int, int]) -> list[PlanEntry]:
        raise NotImplementedError

    def tensors(self, q: gq.Int4Weight) -> list[torch.Tensor]:
        """The stored tensors of one quantized weight, in `suffixes` order (CPU)."""
        raise NotImplementedError

    def shape(self, reader, module: str) -> tuple[int, int]:
        """The weight shape [N, K] of a stored module."""
        raise NotImplementedError

    def read(self, get, module: str) -> gq.Int4Weight:
        """The quantized weight back from its stored tensors (`get(name)` reads one)."""
        raise NotImplementedError

    def quantization_config(self, ignore: list[str]) -> dict:
        raise NotImplementedError

    def config_files(self, ignore: list[str]) -> dict[str, dict]:
        return {}


class PackQuantized(GptqFormat):
    name = "compressed-tensors"
    suffixes = ("weight_packed", "weight_scale", "weight_shape")

    def entries(self, module: str, shape: tuple[int, int]) -> list[PlanEntry]:
        n, k = shape
        return [(f"{module}.weight_packed", (n, k // 8), torch.int32),
                (f"{module}.weight_scale", (n, k // gq.GROUP_SIZE), torch.bfloat16),
                (f"{module}.weight_shape", (2,), torch.int64)]

    def tensors(self, q: gq.Int4Weight) -> list[torch.Tensor]:
        return [pack.pack_rows(q.codes).cpu(), q.scale.to(torch.bfloat16).cpu(),
                torch.tensor(list(q.codes.shape), dtype=torch.int64)]

    def shape(self, reader, module: str) -> tuple[int, int]:
        n, k = (int(v) for v in reader.get(f"{module}.weight_shape"))
        return n, k

    def read(self, get, module: str) -> gq.Int4Weight:
        codes = pack.unpack_rows(get(f"{module}.weight_packed"))
        n, k = (int(v) for v in get(f"{module}.weight_shape"))
        return gq.Int4Weight(codes[:n, :k], get(f"{module}.weight_scale"))

    def quantization_config(self, ignore: list[str]) -> dict:
        weights = {"num_bits": gq.BITS, "type": "int", "symmetric": True, "group_size": gq.GROUP_SIZE,
                   "strategy": "group", "block_structure": None, "dynamic": False, "actorder": "static",
                   "scale_dtype": None, "zp_dtype": None, "observer": "memoryless_minmax", "observer_kwargs": {}}
        return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "quant_method": "compressed-tensors", "kv_cache_scheme": None, "format": "pack-quantized",
                "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignore,
                "sparsity_config": {}, "transform_config": {}, "version": COMPRESSED_TENSORS_VERSION}


class AutoGptq(GptqFormat):
    name = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    ZERO = pack.OFFSET - 1  # v1 checkpoints store zero point - 1

    def entries(self, module: str, shape: tuple[int, int]) -> list[PlanEntry]:
        n, k = shape
        if n % 8:
            raise ExportError(f"{module}: {n} output rows do not pack into the gptq format's qzeros (8 per word); "
                              "--exclude it or use --format compressed-tensors")
        groups = k // gq.GROUP_SIZE
        return [(f"{module}.qweight", (k // 8, n), torch.int32), (f"{module}.qzeros", (groups, n // 8), torch.int32),
                (f"{module}.scales", (groups, n), torch.float16), (f"{module}.g_idx", (k,), torch.int32)]

    def tensors(self, q: gq.Int4Weight) -> list[torch.Tensor]:
        n, k = q.codes.shape
        groups = k // gq.GROUP_SIZE
        qweight = pack.pack_rows(q.codes.cpu()).t().contiguous()  # word j of column n: rows 8j..8j+7
        zeros = torch.full((groups, n), self.ZERO, dtype=torch.int32)
        scales = q.scale.cpu().t().contiguous()
        if not torch.isfinite(scales.to(torch.float16)).all():
            raise ExportError("a scale does not fit float16 (the gptq format's scale type)")
        return [qweight, pack.pack_unsigned_rows(zeros), scales.to(torch.float16),
                (torch.arange(k, dtype=torch.int32) // gq.GROUP_SIZE)]

    def shape(self, reader, module: str) -> tuple[int, int]:
        return reader.info(f"{module}.qweight").shape[1], reader.info(f"{module}.g_idx").shape[0]

    def read(self, get, module: str) -> gq.Int4Weight:
        codes = pack.unpack_rows(get(f"{module}.qweight").t())
        zeros = pack.unpack_unsigned_rows(get(f"{module}.qzeros"))
        if not bool((zeros == self.ZERO).all()):
            raise ExportError(f"{module}: asymmetric zero points are not supported")
        g_idx = get(f"{module}.g_idx")
        if not torch.equal(g_idx, torch.arange(codes.shape[1], dtype=g_idx.dtype) // gq.GROUP_SIZE):
            raise ExportError(f"{module}: a permuted g_idx (desc_act) is not supported")
        return gq.Int4Weight(codes, get(f"{module}.scales").t().contiguous().to(torch.bfloat16))

    def _settings(self) -> dict:
        return {"bits": gq.BITS, "group_size": gq.GROUP_SIZE, "desc_act": False, "sym": True,
                "damp_percent": gq.DAMPENING_FRAC, "true_sequential": True, "static_groups": False,
                "checkpoint_format": "gptq", "quant_method": "gptq"}

    def quantization_config(self, ignore: list[str]) -> dict:
        return {**self._settings(), "dynamic": {f"-:{re.escape(m)}$": {} for m in ignore}, "lm_head": False}

    def config_files(self, ignore: list[str]) -> dict[str, dict]:
        return {"quantize_config.json": self._settings()}


FORMATS: dict[str, GptqFormat] = {f.name: f for f in (PackQuantized(), AutoGptq())}


def get_format(name: str) -> GptqFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})") from None
