"""GPTQ math for INT4 weights (W4A16): symmetric, per-128-column groups, second-order error feedback.

Conventions (those of llm-compressor 0.14's `GPTQModifier` with the `W4A16` preset and compressed-tensors 0.19,
checked against it bit for bit, see tests/test_gptq.py):
  scale   [N, K/128] in the weight's dtype = amax(|group|) / 7.5 (amax of the ORIGINAL weight, computed before
          GPTQ changes it; a zero scale becomes the dtype's eps); codes are round(clamp(w / scale, -8, 7)),
          half to even; dequantized value = code * scale in the scale's dtype.
  Hessian H = 2/n * sum x x^T over the n calibration rows (float32); dampening adds 0.01 * mean(diag H) to the
          diagonal; a column never activated (H_jj = 0) gets H_jj = 1 and weight 0.
  order   columns by decreasing H_jj ("static"/"weight" activation order: the groups stay contiguous in the
          original order, so no g_idx is stored), blocks of 128 columns, the upper Cholesky factor of H^-1.
  failure a Hessian that Cholesky rejects even dampened: round-to-nearest with the same scales (flagged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glmgguf.errors import GlmggufError

BITS = 4
QMIN, QMAX = -(1 << (BITS - 1)), (1 << (BITS - 1)) - 1  # -8, 7
GROUP_SIZE = 128
BLOCK_SIZE = 128
DAMPENING_FRAC = 0.01


class GptqError(GlmggufError, ValueError):
    """A weight or Hessian that GPTQ cannot take."""


class Hessian:
    """Running H = 2/n * sum x x^T of one module's inputs (float32 [K, K]); `n` counts the rows added."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros((columns, columns), dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add input rows x [..., K] (any float dtype)."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32) * math.sqrt(2)
        self.sum += x.t().matmul(x)
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        """H normalized by the row count (zeros when nothing was added)."""
        if self.rows == 0:
            return self.sum.clone()
        return self.sum / torch.tensor(float(self.rows), device=self.sum.device)


@dataclass(frozen=True)
class Int4Weight:
    """A quantized weight: int8 codes in [-8, 7] [N, K] and per-group scales [N, K/128] (the weight's dtype)."""

    codes: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scale, dtype)


def group_scales(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Symmetric INT4 scales of w [..., N, K] per `group_size` columns, in w's dtype: amax / 7.5."""
    if w.shape[-1] % group_size:
        raise GptqError(f"{w.shape[-1]} columns are not a multiple of the group size {group_size}")
    g = w.unflatten(-1, (w.shape[-1] // group_size, group_size))
    amax = torch.maximum(g.amin(-1).clamp(max=0).abs(), g.amax(-1).clamp(min=0))
    scale = amax / torch.tensor((QMAX - QMIN) / 2, dtype=w.dtype, device=w.device)
    return torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype, device=w.device), scale)


def to_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(clamp(w / scale, -8, 7)) (float), scale broadcast over w."""
    return torch.round(torch.clamp(w / scale, QMIN, QMAX))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes [..., N, K] x per-group scale [..., N, K/g] in the scale's dtype (then `dtype`)."""
    g = codes.shape[-1] // scale.shape[-1]
    out = codes.to(scale.dtype) * scale.repeat_interleave(g, dim=-1)
    return out if dtype is None else out.to(dtype)


def round_to_nearest(w: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Weight:
    """Plain round-to-nearest INT4 (the baseline GPTQ improves on), same scales as GPTQ's."""
    scale = group_scales(w, group_size)
    codes = to_codes(w.float(), scale.repeat_interleave(group_size, dim=-1))
    return Int4Weight(codes.to(torch.int8), scale)


def _inverse_factor(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, bool]:
    """In place: dead columns zeroed; returns the upper Cholesky factor of (H + damp)^-1, or (identity, True)."""
    diag = torch.diagonal(h)
    dead = diag == 0
    if dead.any():
        diag.masked_fill_(dead, 1.0)
        w.masked_fill_(dead.unsqueeze(0), 0)
    diag.add_(damp * torch.mean(torch.diag(h)))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return torch.eye(h.shape[0], dtype=h.dtype, device=h.device), True
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True), False


def _quantize_block(w1: torch.Tensor, hinv1: torch.Tensor, scale_cols: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of columns, column by column: (dequantized Q1, codes, scaled errors Err1); w1 is worked on."""
    q1, codes, err1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)
    for i in range(w1.shape[1]):
        w = w1[:, i]
        s = scale_cols[:, i]
        c = to_codes(w, s)
        q = c.to(s.dtype) * s
        q1[:, i], codes[:, i] = q, c
        err = (w - q) / hinv1[i, i]
        err1[:, i] = err
        w1[:, i:] -= err.unsqueeze(-1) * hinv1[i, i:].unsqueeze(0)
    return q1, codes, err1


def gptq_one(w: torch.Tensor, h: torch.Tensor, group_size: int = GROUP_SIZE, block_size: int = BLOCK_SIZE,
             damp: float = DAMPENING_FRAC, actorder: bool = True) -> tuple[Int4Weight, bool, float]:
    """GPTQ of one weight w [N, K] (its dtype sets the scales' dtype) with its normalized Hessian h [K, K]."""
    n_rows, n_cols = w.shape
    if h.shape != (n_cols, n_cols):
        raise GptqError(f"Hessian {list(h.shape)} does not fit a weight with {n_cols} columns")
    scale = group_scales(w, group_size)
    W = w.to(torch.float32).clone()
    H = h.to(device=w.device, dtype=torch.float32).clone()
    perm = torch.argsort(torch.diagonal(H), descending=True) if actorder else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    cols = torch.arange(n_cols, device=w.device) if perm is None else perm
    col_scale = scale[:, cols // group_size]  # [N, K] in working order
    hinv, fallback = _inverse_factor(W, H, damp)
    codes = torch.empty_like(W)
    loss = torch.zeros(n_rows, device=w.device)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        q1, c1, err1 = _quantize_block(W[:, i1:i2].clone(), hinv[i1:i2, i1:i2], col_scale[:, i1:i2])
        W[:, i1:i2], codes[:, i1:i2] = q1, c1
        loss += torch.sum(err1.square(), 1) / 2
        W[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return Int4Weight(codes.to(torch.int8), scale), fallback, float(loss.sum())

