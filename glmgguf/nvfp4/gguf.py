"""NVFP4 inside GGUF: routed experts as ggml's NVFP4 type (40) plus the per-expert `.scale` tensor.

ggml's block_nvfp4 holds 64 elements: 4 UE4M3 sub-block scales (one per 16 elements), then 32 bytes of E2M1 codes,
each 16-element sub-block's byte j holding element j (low nibble) and j + 8 (high nibble). It has no per-tensor
scale: the pinned llama.cpp multiplies the `mul_mat_id` output by `blk.N.ffn_{gate,up,down}_exps.scale` (F32,
one value per expert, loaded with TENSOR_NOT_REQUIRED by its generic scale pass), which is how its own converter
stores ModelOpt's weight_scale_2 (`conversion/base.py`, `_nvfp4_pack`). So the data here is ModelOpt's NVFP4
(`glmgguf.nvfp4.quant`, bit-exact with nvidia-modelopt) repacked into ggml's block order, with each expert's
weight_scale_2 in the `.scale` tensor.

MTP block experts cannot be NVFP4 here: the pinned llama.cpp creates MTP tensors with TENSOR_SKIP unless it
drafts, and then never creates their `.scale` tensors either, so the file fails to load ("wrong number of
tensors"; its own converter's NVFP4 output of a model with MTP fails the same way).

Why not ggml's own NVFP4 quantizer (`quantize_row_nvfp4_ref`): with no global scale its UE4M3 block scales are
block_amax / 6 directly; for expert weights of magnitude ~0.01-0.1 those sit in e4m3's subnormal range (below
2^-6), where a scale has 1-3 significant bits.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from glmgguf.checkpoint import GlmCheckpoint
from glmgguf.gguf.plan import PlannedTensor
from glmgguf.gguf.recipe import RecipeError
from glmgguf.layout import Role, Transform
from glmgguf.nvfp4 import quant as nq

SCALE_OF = "nvfp4_scale_of"  # PlannedTensor.attrs key of a `.scale` tensor: the NVFP4 tensor it belongs to
EXPERT_ROLES = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)
SUB_BLOCKS = 4  # 16-element sub-blocks per ggml NVFP4 block


class Nvfp4GgufError(RecipeError):
    """A plan asks for NVFP4 where this GGUF writer (or the pinned llama.cpp) cannot use it."""


def ggml_nvfp4_bytes(q: nq.Nvfp4Weight) -> np.ndarray:
    """ModelOpt-layout NVFP4 ([N, K/2] codes, [N, K/16] e4m3 scales) -> ggml block_nvfp4 rows [N, K/64 * 36]."""
    n, half = q.weight.shape
    k = half * 2
    if k % (SUB_BLOCKS * nq.BLOCK_SIZE):
        raise Nvfp4GgufError(f"rows of {k} elements are not whole NVFP4 blocks of 64")
    codes = nq.unpack_codes(q.weight.cpu()).reshape(n, k // 16, 16)
    qs = (codes[..., :8] | (codes[..., 8:] << 4)).reshape(n, k // 64, 32)
    d = (q.weight_scale.cpu().view(torch.uint8) & 0x7F).reshape(n, k // 64, SUB_BLOCKS)  # UE4M3: e4m3 bits, no sign
    return torch.cat((d, qs), dim=-1).reshape(n, -1).numpy()


def ggml_nvfp4_dequantize(raw: np.ndarray, k: int) -> torch.Tensor:
    """ggml's dequantize_row_nvfp4 in torch (without the `.scale` factor): rows [N, k] float32."""
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(-1, k // 64, 36)
    d = blocks[..., :SUB_BLOCKS].to(torch.int32)
    qs = blocks[..., SUB_BLOCKS:].reshape(blocks.shape[0], k // 64, SUB_BLOCKS, 8)
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # [N, k/64, 4, 16]
    exp, man = (d >> 3) & 0xF, d & 0x7
    scale = torch.where(exp == 0, man.float() * 2.0**-9, (1 + man.float() / 8) * torch.exp2(exp.float() - 7))
    scale = torch.where((d == 0) | (d == 0x7F), torch.zeros_like(scale), scale)
    values = torch.tensor(nq.E2M1_VALUES)[codes.long()]
    return (values * scale.unsqueeze(-1)).reshape(-1, k)


def with_scale_tensors(plan: list[PlannedTensor]) -> list[PlannedTensor]:
    """`plan` with an F32 `<name>.scale` [n_experts] tensor after every NVFP4 tensor (routed experts only)."""
    out: list[PlannedTensor] = []
    for t in plan:
        out.append(t)
        if t.ggml_type != Q.NVFP4:
            continue
        if t.role not in EXPERT_ROLES or t.transform is not Transform.STACK_EXPERTS:
            raise Nvfp4GgufError(f"{t.name}: NVFP4 is written for routed experts only (ffn_*_exps), whose "
                                 "per-expert scale the pinned llama.cpp applies")
        if t.layer is not None and t.layer.is_mtp:
            raise Nvfp4GgufError(f"{t.name}: NVFP4 in the MTP block cannot be loaded by the pinned llama.cpp (it "
                                 "skips MTP tensors unless drafting, but still expects their `.scale` tensors: "
                                 "'wrong number of tensors'); give MTP experts another type (layers = \"trunk\")")
        if t.row_size % (SUB_BLOCKS * nq.BLOCK_SIZE):
            raise Nvfp4GgufError(f"{t.name}: rows of {t.row_size} elements are not whole NVFP4 blocks of 64")
        out.append(PlannedTensor(t.name.removesuffix(".weight") + ".scale", t.role, t.layer, list(t.sources),
                                 Transform.COPY, (len(t.sources),), Q.F32, note="NVFP4 per-expert scale",
                                 attrs={SCALE_OF: t.name}))
    return out


class Nvfp4Encoder:
    """Encodes the NVFP4 tensors of one conversion, remembering each expert's weight_scale_2 for `.scale`."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._scales: dict[str, list[float]] = {}

    def handles(self, t: PlannedTensor) -> bool:
        return t.ggml_type == Q.NVFP4 or SCALE_OF in t.attrs

    def chunks(self, ckpt: GlmCheckpoint, t: PlannedTensor) -> Iterator[np.ndarray]:
        """The bytes of an NVFP4 expert tensor (one expert at a time) or of its `.scale` tensor."""
        if SCALE_OF in t.attrs:
            scales = self._scales.pop(t.attrs[SCALE_OF], None)
            if scales is None or len(scales) != t.shape[0]:
                raise Nvfp4GgufError(f"{t.name}: written before its NVFP4 tensor {t.attrs[SCALE_OF]}")
            yield np.asarray(scales, dtype=np.float32)
            return
        scales = self._scales.setdefault(t.name, [])
        for src in t.sources:
            try:
                q = nq.quantize(ckpt.reader.get(src).to(self.device))
            except nq.Nvfp4Error as e:
                raise Nvfp4GgufError(f"{src}: {e}") from None
            scales.append(float(q.weight_scale_2))
            yield ggml_nvfp4_bytes(q)
