"""The NVFP4 checkpoint formats as objects: per format, the names and conventions of a quantized projection's
tensors, the modules its config leaves unquantized, and the config files that announce it.

Per expert projection `model.layers.L.mlp.experts.E.{gate,up,down}_proj`:
  modelopt            weight u8 [N, K/2], weight_scale e4m3 [N, K/16], weight_scale_2 f32 [], input_scale f32 []
                      (+ hf_quant_config.json and config.json quantization_config with quant_method "modelopt")
  compressed-tensors  weight_packed u8 [N, K/2], weight_scale e4m3 [N, K/16], weight_global_scale f32 [1],
                      input_global_scale f32 [1], global scales reciprocal (6*448/amax, llm-compressor's formula)
                      (config.json quantization_config with format "nvfp4-pack-quantized")
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch

from glmgguf.choices import NVFP4_FORMATS
from glmgguf.nvfp4 import quant as nq
from glmgguf.nvfp4.errors import ExportError

HF_QUANT_CONFIG = "hf_quant_config.json"
MODELOPT_VERSION = "0.47.0"  # the ModelOpt release whose format (and quantizer) this export reproduces


def summarize_exclude(unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """ModelOpt's exclude-list summary: each unquantized module is covered by the shortest dot-boundary prefix
    wildcard `P*` that no quantized module name starts with, else `P.*` (when only names like `P0...` are
    quantized), else its own name."""
    q = sorted(set(quantized))
    qset = set(q)

    def some_start_with(prefix: str) -> bool:
        i = bisect.bisect_left(q, prefix)
        return i < len(q) and q[i].startswith(prefix)

    out: set[str] = set()
    for m in sorted(set(unquantized)):
        for i, ch in enumerate(m):
            if ch != ".":
                continue
            p = m[:i]
            if not some_start_with(p):
                out.add(p + "*")
                break
            if p not in qset and not some_start_with(p + "."):
                out.add(p + ".*")  # ModelOpt 0.47 writes only `P.*` of the pair `P`, `P.*`
                break
        else:
            out.add(m)
    return sorted(out)


class Nvfp4Format:
    """One on-disk NVFP4 layout. The four tensors of a quantized projection are, in `suffixes` order: packed E2M1
    weight [N, K/2], per-16 e4m3 block scales [N, K/16], the weight's global scale and the input's global scale
    (each of shape `scalar_shape`)."""

    name: str
    suffixes: ClassVar[tuple[str, str, str, str]]
    scalar_shape: ClassVar[tuple[int, ...]]

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Nvfp4Format({self.name!r})"

    def global_scales(self, q: nq.Nvfp4Weight, w_amax: torch.Tensor, in_amax: torch.Tensor,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight global, input global) as stored, for weight `q` quantized with weight amax `w_amax`."""
        raise NotImplementedError

    def multiplier(self, stored: torch.Tensor | float) -> torch.Tensor | float:
        """The scale a stored global scale stands for (what multiplies the block-scaled values)."""
        return stored

    def ignore_list(self, unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
        """The config's list of modules left unquantized."""
        return sorted(set(unquantized))

    def quantization_config(self, ignore: list[str]) -> dict:
        """config.json `quantization_config`."""
        raise NotImplementedError

    def config_files(self, ignore: list[str]) -> dict[str, dict]:
        """Files besides config.json that announce the quantization (name -> JSON)."""
        return {}

    def matches(self, quantization_config: dict) -> bool:
        """Whether a config.json `quantization_config` announces this format."""
        raise NotImplementedError


class ModelOptFormat(Nvfp4Format):
    """NVIDIA ModelOpt's NVFP4 checkpoint (vLLM / SGLang `--quantization modelopt_fp4`)."""

    suffixes = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    scalar_shape = ()

    def global_scales(self, q, w_amax, in_amax, device):
        return q.weight_scale_2, nq.input_scale(in_amax)

    def ignore_list(self, unquantized, quantized):
        return summarize_exclude(unquantized, quantized)

    def quantization_config(self, ignore):
        """ModelOpt's conversion of hf_quant_config.json (compressed-tensors-like groups, `ignore`,
        `quant_method: modelopt`) plus `group_size` and `exclude_modules`, which vLLM's and SGLang's config.json
        readers look up directly."""
        gs = nq.BLOCK_SIZE
        return {
            "config_groups": {"group_0": {
                "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
                "targets": ["Linear"],
            }},
            "ignore": list(ignore),
            "quant_algo": "NVFP4",
            "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
            "quant_method": "modelopt",
            "group_size": gs,
            "kv_cache_quant_algo": None,
            "exclude_modules": list(ignore),
        }

    def config_files(self, ignore):
        """hf_quant_config.json as ModelOpt writes it for NVFP4 (no KV-cache quantization)."""
        return {HF_QUANT_CONFIG: {
            "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": nq.BLOCK_SIZE,
                             "exclude_modules": list(ignore)},
        }}

    def matches(self, quantization_config):
        return quantization_config.get("quant_method") == "modelopt"


class CompressedTensorsFormat(Nvfp4Format):
    """llm-compressor's NVFP4 (W4A4) scheme, `nvfp4-pack-quantized`: reciprocal global scales."""

    suffixes = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    scalar_shape = (1,)

    def global_scales(self, q, w_amax, in_amax, device):
        """Reciprocal global scales, computed as llm-compressor does: (6 * 448) / amax."""
        a = w_amax.float() if float(w_amax) > 0 else torch.ones((), device=device)
        return (nq.GLOBAL_DENOM / a).reshape(1), (nq.GLOBAL_DENOM / in_amax.float()).reshape(1)

    def multiplier(self, stored):
        return 1.0 / stored

    def quantization_config(self, ignore):
        args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": nq.BLOCK_SIZE,
                "strategy": "tensor_group", "block_structure": None, "actorder": None, "observer": "minmax",
                "observer_kwargs": {}}
        return {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {**args, "dynamic": False},
                "input_activations": {**args, "dynamic": "local"},
                "output_activations": None,
                "format": "nvfp4-pack-quantized",
            }},
            "ignore": list(ignore),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }

    def matches(self, quantization_config):
        return (quantization_config.get("quant_method") == "compressed-tensors"
                and quantization_config.get("format") == "nvfp4-pack-quantized")


# the formats by name, in `glmgguf.choices.NVFP4_FORMATS` order (the names the options accept)
FORMATS: dict[str, Nvfp4Format] = {name: cls(name) for name, cls in
                                   zip(NVFP4_FORMATS, (ModelOptFormat, CompressedTensorsFormat), strict=True)}


def get_format(name: str) -> Nvfp4Format:
    """The format called `name`; ExportError names the known ones otherwise."""
    if name not in FORMATS:
        raise ExportError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(path: str | os.PathLike) -> Nvfp4Format:
    """The format of an NVFP4 export directory (from its config.json)."""
    cfg = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    for fmt in FORMATS.values():
        if fmt.matches(cfg):
            return fmt
    raise ExportError(f"{path} is not an NVFP4 export (quantization_config quant_method {cfg.get('quant_method')!r})")
