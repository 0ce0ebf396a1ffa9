"""NVFP4 quantization math (device-agnostic torch), bit-exact with nvidia-modelopt 0.47.0's `NVFP4QTensor`.

Per quantized Linear weight W [N, K] (K a multiple of 16):
  weight_scale_2  float32 scalar   = amax(W) / (6 * 448)
  weight_scale    e4m3 [N, K/16]   = clamp(block_amax / (6 * weight_scale_2), 2^-9, 448), an all-zero block -> 1.0
  weight          uint8 [N, K/2]   E2M1 codes of W / (fp32(weight_scale) * weight_scale_2): round to nearest, ties to
                                   even, saturating at 6; code = sign bit (3) | magnitude index into
                                   {0, .5, 1, 1.5, 2, 3, 4, 6}; element 2j in the low nibble, 2j+1 in the high one.
  dequant         E2M1[code] * (fp32(weight_scale) * weight_scale_2)

Every step is float32 arithmetic in the same order as ModelOpt's (`6 * s2` first, then the division; the product
`scale * s2` first, then the division), so the bytes are equal on any device with IEEE float32 division (CPU and
CUDA torch both are). One deliberate difference: ModelOpt turns an all-zero tensor (amax 0) into NaN scales and
codes of 6.0; here such a tensor gets weight_scale_2 = 1/(6*448) (as if amax were 1), so it dequantizes to zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmgguf.errors import GlmggufError
from glmgguf.io.fp8 import E4M3_MAX

BLOCK_SIZE = 16
E2M1_MAX = 6.0
SCALE_MIN = 2.0**-9  # smallest e4m3 subnormal: block scales are clamped to [SCALE_MIN, E4M3_MAX]
GLOBAL_DENOM = E2M1_MAX * E4M3_MAX  # 2688

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Rounding boundaries between consecutive E2M1 magnitudes. A value exactly on a boundary goes to the even code:
# down at 0.25, 1.25, 2.5, 5 (strict >), up at 0.75, 1.75, 3.5 (>=).
_BOUNDARIES = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

# Elements per row chunk: the math is row-local once weight_scale_2 is known, so chunking bounds memory and keeps
# the working set in cache without changing a single bit.
CHUNK_ELEMENTS = 1 << 16

_TABLES: dict[tuple[torch.device, str], torch.Tensor] = {}


class Nvfp4Error(GlmggufError, ValueError):
    """A tensor or a calibration value cannot be represented in NVFP4."""


@dataclass(frozen=True)
class Nvfp4Weight:
    """One NVFP4-quantized weight in ModelOpt's layout."""

    weight: torch.Tensor  # uint8 [N, K/2]
    weight_scale: torch.Tensor  # float8_e4m3fn [N, K/16]
    weight_scale_2: torch.Tensor  # float32 scalar (0-d)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.weight_scale_2, dtype)


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (device, name)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor({"e2m1": E2M1_VALUES}[name], dtype=torch.float32, device=device)
    return _TABLES[key]


def amax(w: torch.Tensor) -> torch.Tensor:
    """max |w| as a float32 scalar (exact: the max of stored values)."""
    if w.numel() == 0:
        raise Nvfp4Error("cannot take the amax of an empty tensor")
    return w.detach().abs().amax().float()


def global_scale(amax_value: torch.Tensor | float) -> torch.Tensor:
    """weight_scale_2 (or input_scale) = amax / (6 * 448) as a float32 scalar; amax 0 -> 1/(6*448).

    Raises on a negative or non-finite amax: that scale would make every block scale NaN or inf.
    """
    a = torch.as_tensor(amax_value, dtype=torch.float32).detach().reshape(())
    if not bool(torch.isfinite(a)) or float(a) < 0:
        raise Nvfp4Error(f"amax {float(a)} is not a finite non-negative number")
    if float(a) == 0.0:
        a = torch.ones((), dtype=torch.float32, device=a.device)
    s = a / GLOBAL_DENOM
    if float(s) == 0.0:  # amax below ~4e-42: the scale underflows
        raise Nvfp4Error(f"amax {float(a)} is too small for an NVFP4 global scale")
    return s


def block_scales(w: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """Per-16 e4m3 block scales of a [N, K] tensor (float32 arithmetic, ModelOpt's order of operations)."""
    n, k = w.shape
    block_amax = w.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE).abs().amax(-1).float()
    if not bool(torch.isfinite(block_amax).all()):  # amax propagates NaN, so this sees every non-finite element
        raise Nvfp4Error("weight contains inf or NaN")
    scale = block_amax / (E2M1_MAX * weight_scale_2)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(min=SCALE_MIN, max=E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8 0..15) of float32 values: nearest, ties to even, saturating at +-6."""
    a = x.abs()
    # The magnitude index is the number of boundaries below |x| (at or below for the round-up ties). Seven
    # comparisons on cache-sized chunks beat bucketize/searchsorted and float rounding tricks on the CPU.
    code = (a > _BOUNDARIES[0][0]).to(torch.uint8)
    for bound, tie_up in _BOUNDARIES[1:]:
        code += (a >= bound) if tie_up else (a > bound)
    code |= (x < 0).to(torch.uint8) << 3  # -0.0 keeps sign 0; a tiny negative that rounds to 0 gets code 8
    return code


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] bytes: element 2j in the low nibble, 2j+1 in the high nibble."""
    return (codes[:, 1::2] << 4) | codes[:, 0::2]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> [N, K] codes."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise Nvfp4Error(f"NVFP4 quantizes 2-D weights, got shape {list(w.shape)}")
    if w.shape[1] % BLOCK_SIZE:
        raise Nvfp4Error(f"input dimension {w.shape[1]} is not a multiple of {BLOCK_SIZE}")
    if not w.is_floating_point():
        raise Nvfp4Error(f"cannot quantize a {w.dtype} tensor")


def quantize(w: torch.Tensor, weight_scale_2: torch.Tensor | None = None,
             chunk_elements: int = CHUNK_ELEMENTS) -> Nvfp4Weight:
    """Quantize a [N, K] floating-point weight on its own device.

    `weight_scale_2` defaults to `global_scale(amax(w))`; pass a shared one for tensors a serving engine fuses
    (gate_proj and up_proj of one expert). Raises Nvfp4Error on a non-finite weight.
    """
    _check_weight(w)
    w = w.detach()
    if weight_scale_2 is None:
        weight_scale_2 = global_scale(amax(w))
    s2 = torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(()).to(w.device)
    n, k = w.shape
    packed = torch.empty((n, k // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((n, k // BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=w.device)
    rows = max(1, chunk_elements // max(k, 1))
    for r0 in range(0, n, rows):
        part = w[r0:r0 + rows]
        x = part.float()
        sc = block_scales(x, s2)
        scaled = x.view(x.shape[0], -1, BLOCK_SIZE) / (sc.float() * s2).unsqueeze(-1)
        packed[r0:r0 + rows] = pack_codes(e2m1_codes(scaled.view(x.shape)))
        scales[r0:r0 + rows] = sc
    return Nvfp4Weight(packed, scales, s2.clone())


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E2M1[code] * (fp32(weight_scale) * weight_scale_2), [N, K] in `dtype` (ModelOpt's dequantize)."""
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise Nvfp4Error(f"packed NVFP4 weight must be 2-D uint8, got {weight.dtype} {list(weight.shape)}")
    n, half = weight.shape
    if weight_scale.shape != (n, half * 2 // BLOCK_SIZE):
        raise Nvfp4Error(f"weight_scale shape {list(weight_scale.shape)} does not fit weight {list(weight.shape)}")
    s2 = torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(()).to(weight.device)
    values = _table("e2m1", weight.device)[unpack_codes(weight).long()]
    per_block = weight_scale.float() * s2
    out = values.view(n, -1, BLOCK_SIZE) * per_block.unsqueeze(-1)
    return out.reshape(n, half * 2).to(dtype)


def input_scale(amax_value: torch.Tensor | float) -> torch.Tensor:
    """ModelOpt's static activation scale: calibration amax / (6 * 448), a finite positive float32 scalar."""
    a = torch.as_tensor(amax_value, dtype=torch.float32).reshape(())
    if not bool(torch.isfinite(a)) or float(a) <= 0:
        raise Nvfp4Error(f"input amax {float(a)} is not a finite positive number")
    s = a / GLOBAL_DENOM
    if float(s) == 0.0:
        raise Nvfp4Error(f"input amax {float(a)} is too small for an NVFP4 input scale")
    return s


def error_bound(weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | float, source: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |dequant - source| for a [N, K] source (for checks).

    Inside the E2M1 range the error is at most half the local grid step (0.25 below 2, 0.5 below 4, 1 up to 6)
    times the block's scale; above 6 (saturation after a clamped or rounded-down block scale) it is the overshoot
    |x| - 6 in scaled units.
    """
    n, k = source.shape
    per_block = (weight_scale.float() * torch.as_tensor(weight_scale_2, dtype=torch.float32)).repeat_interleave(
        BLOCK_SIZE, dim=1)
    scaled = source.float().abs() / per_block
    half_step = torch.where(scaled < 2, 0.25, torch.where(scaled < 4, 0.5, 1.0))
    overshoot = (scaled - E2M1_MAX).clamp_min(0)
    # plus float32 rounding slack (relative to |x|: the overshoot is a difference of two nearby numbers)
    return torch.where(scaled <= E2M1_MAX, half_step, overshoot) * per_block + source.float().abs() * 2.0**-20
