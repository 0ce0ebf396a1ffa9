"""Emulate a serving engine's NVFP4 W4A4 experts in transformers, to measure an export's quality on CPU.

vLLM / SGLang on Blackwell quantize each routed expert's input activations to NVFP4 as well: per 16 values a
dynamic e4m3 scale, under the static global `input_scale` from the checkpoint. `emulate_w4a4` loads an export's
dequantized weights into a transformers model and fake-quantizes the inputs of every expert's gate/up and down
projections with ModelOpt's NVFP4 math (`glmgguf.nvfp4.quant`, one row per token), so the model's logits show
the combined weight and activation error, and a badly calibrated input_scale (saturating or flushing
activations) shows up as a larger KL.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import torch
import torch.nn as nn

from glmgguf.io import CheckpointReader
from glmgguf.nvfp4 import quant as nq
from glmgguf.nvfp4.formats import detect_format


def fake_quantize_activations(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x [tokens, K] through NVFP4 with global scale `input_scale` and dynamic per-16 block scales."""
    if x.shape[0] == 0:
        return x
    return nq.quantize(x.float(), input_scale).dequantize(x.dtype)


def input_scales(export_dir: str | os.PathLike) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer: (gate/up input scales [E], down input scales [E]) of an export (either layout)."""
    fmt = detect_format(export_dir)
    suffix = fmt.suffixes[3]
    reader = CheckpointReader(export_dir)
    found: dict[int, dict[int, dict[str, float]]] = {}
    for name in reader.names():
        parts = name.split(".")
        if name.endswith("." + suffix) and ".mlp.experts." in name:
            L, E, proj = int(parts[2]), int(parts[5]), parts[6]
            v = float(reader.get(name).reshape(-1)[0])
            found.setdefault(L, {}).setdefault(E, {})[proj] = fmt.multiplier(v)
    out = {}
    for L, experts in found.items():
        n = max(experts) + 1
        out[L] = (torch.tensor([experts[e]["gate_proj"] for e in range(n)]),
                  torch.tensor([experts[e]["down_proj"] for e in range(n)]))
    return out


def _w4a4_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """GlmMoeDsaExperts.forward with NVFP4 fake-quantized expert inputs (weights are already dequantized)."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        if e == self.num_experts:
            continue
        pos, tok = torch.where(mask[e])
        x = fake_quantize_activations(hidden_states[tok], self.nvfp4_input_scale[e])
        gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        h = fake_quantize_activations(self.act_fn(gate) * up, self.nvfp4_down_input_scale[e])
        h = nn.functional.linear(h, self.down_proj[e]) * top_k_weights[tok, pos, None]
        final.index_add_(0, tok, h.to(final.dtype))
    return final


def emulate_w4a4(model: nn.Module, export_dir: str | os.PathLike) -> nn.Module:
    """Make `model` (loaded from the export's dequantized weights) quantize its expert inputs like the engines."""
    scales = input_scales(export_dir)
    layers = model.model.layers
    patched = 0
    for L, (s_in, s_down) in scales.items():
        if L >= len(layers):  # the MTP block: transformers does not run it
            continue
        experts = layers[L].mlp.experts
        experts.nvfp4_input_scale, experts.nvfp4_down_input_scale = s_in, s_down
        experts.forward = types.MethodType(_w4a4_forward, experts)
        patched += 1
    if patched == 0:
        raise ValueError(f"{Path(export_dir)}: no NVFP4 expert input scales for the model's layers")
    return model
