"""Block-FP8 storage, as the GLM-5.x FP8 releases use it.

A quantized linear weight `W` [out, in] is stored as `float8_e4m3fn` beside a float32 `<name>_scale_inv`
[ceil(out/b0), ceil(in/b1)]; its value is `fp8 * scale` with each scale repeated over its b0 x b1 block and the
repeat cropped to the weight's shape (the pinned upstream converter's `dequant_simple`: one float32 multiply).
The checkpoint's config.json names the scheme in `quantization_config`:
`{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic", ...}`.
Dequantization here is numpy only (a 256-entry table for the FP8 codes), so a conversion needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from glmgguf.io.errors import CheckpointError

if TYPE_CHECKING:
    import torch

SCALE_SUFFIX = "_scale_inv"  # `<weight name>_scale_inv`, e.g. `...q_a_proj.weight_scale_inv`
FP8_DTYPE = "F8_E4M3"
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_BLOCK = (128, 128)


def _e4m3fn_table() -> np.ndarray:
    """float32 value of every float8_e4m3fn byte (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; the
    all-ones pattern S.1111.111 is NaN, there is no infinity)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7.0))
    value = np.where((exp == 0xF) & (man == 7), np.nan, value)
    return (sign * value).astype(np.float32)


E4M3_TO_F32 = _e4m3fn_table()


@dataclass(frozen=True)
class Fp8Scheme:
    """The block-FP8 scheme a checkpoint declares."""

    block: tuple[int, int] = DEFAULT_BLOCK

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, int]:
        if len(weight_shape) != 2:
            raise CheckpointError(f"block-FP8 weights are 2-D; got shape {list(weight_shape)}")
        return math.ceil(weight_shape[0] / self.block[0]), math.ceil(weight_shape[1] / self.block[1])


def quant_method(cfg: dict) -> str | None:
    """`quantization_config.quant_method` of a config.json (None: not quantized)."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else "?"


def check_readable(cfg: dict) -> None:
    """Refuse quantization schemes whose weights the stages cannot read (all but the block-FP8 release)."""
    method = quant_method(cfg)
    if method not in (None, "fp8"):
        raise CheckpointError(
            f"quantization_config.quant_method {method!r} is not supported: this toolkit reads BF16 checkpoints "
            "and the block-FP8 release (quant_method 'fp8'); dequantize the checkpoint first"
        )


def scheme_from_config(cfg: dict) -> Fp8Scheme | None:
    """The block-FP8 scheme of a config.json; None unless it declares quant_method 'fp8'."""
    if quant_method(cfg) != "fp8":
        return None
    qc = cfg["quantization_config"]
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"quantization_config.fmt {fmt!r} is not supported (the GLM-5.x release uses e4m3)")
    block = qc.get("weight_block_size")
    if block is None:
        raise CheckpointError("quantization_config has no weight_block_size: per-tensor FP8 is not supported")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive integers, got {block}")
    return Fp8Scheme((block[0], block[1]))


def check_scale(name: str, scale: np.ndarray) -> None:
    """Refuse NaN, Inf, zero or negative block scales (they make every weight of their block meaningless)."""
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        raise CheckpointError(
            f"{name}{SCALE_SUFFIX} has {int(bad.sum())} invalid block scale(s) (NaN, Inf, zero or negative), "
            f"e.g. {scale[bad].reshape(-1)[0]!r}"
        )


def expand_scale(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """The per-block scale repeated to every element of `shape`, cropped (upstream's `repeat_interleave`)."""
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)
    return full[: shape[0], : shape[1]]


def dequantize(codes: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 weight from FP8 codes (uint8 [out, in]) and block scales (float32), exactly as upstream does.

    When both dimensions are whole blocks (every GLM-5.2 FP8 weight but the 576-row kv_a_proj) the scales are
    broadcast over a blocked view instead of being repeated to full size: the same products, ~10x faster."""
    values = E4M3_TO_F32[codes]
    scale = scale.astype(np.float32, copy=False)
    (rows, cols), (br, bc) = codes.shape, block
    if rows % br == 0 and cols % bc == 0:
        blocked = values.reshape(rows // br, br, cols // bc, bc)
        blocked *= scale[:, None, :, None]
    else:
        values *= expand_scale(scale, codes.shape, block)
    return values


def quantize(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-FP8 of a 2-D weight as the release stores it: (float8_e4m3fn weight, float32 scale_inv).

    Each block's scale is amax/448 (1.0 for an all-zero block), the codes round-to-nearest of weight/scale.
    """
    import torch

    w = weight.detach().float()
    out, inp = w.shape
    rows, cols = math.ceil(out / block[0]), math.ceil(inp / block[1])
    padded = torch.zeros(rows * block[0], cols * block[1])
    padded[:out, :inp] = w
    blocks = padded.reshape(rows, block[0], cols, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :inp]
    codes = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale.float()
