"""INT4 packing of the two on-disk layouts.

pack-quantized (compressed-tensors): codes + 8 (0..15), eight per int32 along the input axis, column 8j+i in bits
  4i..4i+3 of word j: weight_packed int32 [N, K/8].
gptq (AutoGPTQ, v1 zero points): qweight int32 [K/8, N] packs eight consecutive INPUT rows of W^T the same way;
  qzeros int32 [K/g, N/8] packs the stored zero point 7 (= 8 - 1) eight output columns per word.
"""

from __future__ import annotations

import torch

OFFSET = 8  # code + OFFSET is the unsigned nibble
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """int codes [-8, 7] [..., M, K] (K a multiple of 8) -> int32 [..., M, K/8], packed along the last axis."""
    if codes.shape[-1] % 8:
        raise ValueError(f"{codes.shape[-1]} values do not pack into whole int32 words")
    u = (codes.to(torch.int32) + OFFSET).unflatten(-1, (codes.shape[-1] // 8, 8))
    return (u << _SHIFTS.to(codes.device)).sum(-1, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., M, K/8] -> int8 codes [..., M, K] (inverse of `pack_rows`)."""
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (u.flatten(-2) - OFFSET).to(torch.int8)


def pack_unsigned_rows(values: torch.Tensor) -> torch.Tensor:
    """unsigned nibbles [..., M, K] -> int32 [..., M, K/8] (no offset)."""
    return pack_rows(values.to(torch.int32) - OFFSET)


def unpack_unsigned_rows(packed: torch.Tensor) -> torch.Tensor:
    return unpack_rows(packed).to(torch.int32) + OFFSET
