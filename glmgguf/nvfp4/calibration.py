"""NVFP4 calibration: per-expert activation amaxes from REAP observe statistics, with a layer's max for an expert
calibration never routed to (its input scale must still be finite)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from glmgguf.layout import GlmLayout
from glmgguf.nvfp4 import quant as nq
from glmgguf.nvfp4.errors import ExportError


@dataclass
class InputAmax:
    """Per MoE layer and expert: the activation amax of gate/up's input and of down's input (fallbacks applied)."""

    gate_up: dict[int, torch.Tensor]  # layer -> float32 [n_experts]
    down: dict[int, torch.Tensor]
    fallbacks: dict[int, list[int]]  # layer -> experts that got the layer's max (never routed / no finite amax)

    @property
    def n_fallback(self) -> int:
        return sum(len(v) for v in self.fallbacks.values())


def _layer_amax(values: torch.Tensor, routed: torch.Tensor, layer: int, what: str) -> tuple[torch.Tensor, set[int]]:
    values = values.float()
    ok = routed & torch.isfinite(values) & (values > 0)
    if not bool(ok.any()):
        raise ExportError(f"statistics of layer {layer} have no usable {what} (no expert was routed to in "
                          "calibration): observe more tokens")
    fill = values[ok].max()
    out = torch.where(ok, values, fill)
    if float(fill) / nq.GLOBAL_DENOM == 0.0:
        raise ExportError(f"layer {layer}: {what} {float(fill)} is too small for an NVFP4 input scale")
    return out, {int(i) for i in (~ok).nonzero().flatten()}


def input_amax_from_stats(stats, layout: GlmLayout, layers: Sequence[int]) -> InputAmax:
    """Per-expert input amaxes of `layers` from REAP statistics (`glmgguf.reap.stats.ReapStats`).

    Raises ExportError unless the statistics were observed on a model with this layout's MoE layers (hidden size,
    layer count, each quantized layer's expert count).
    """
    from glmgguf.reap.stats import model_fingerprint

    want, have = model_fingerprint(layout), stats.fingerprint
    if have.get("hidden_size") != want["hidden_size"] or have.get("n_layers") != want["n_layers"]:
        raise ExportError(f"calibration statistics are from another model (hidden {have.get('hidden_size')}, "
                          f"{have.get('n_layers')} layers) than the checkpoint (hidden {want['hidden_size']}, "
                          f"{want['n_layers']} layers)")
    out = InputAmax({}, {}, {})
    for L in layers:
        n = want["experts"][str(L)]
        if L not in stats.layers:
            raise ExportError(f"calibration statistics lack MoE layer {L}"
                              + (" (the MTP block: observe without --no-mtp, or --exclude its experts)"
                                 if L >= layout.n_layers else ""))
        t = stats.layers[L]
        if t["count"].numel() != n:
            raise ExportError(f"calibration statistics are from another model: layer {L} has {n} experts in the "
                              f"checkpoint, {t['count'].numel()} in the statistics")
        routed = t["count"] > 0
        out.gate_up[L], fb1 = _layer_amax(t["input_amax"], routed, L, "input_amax")
        out.down[L], fb2 = _layer_amax(t["down_input_amax"], routed, L, "down_input_amax")
        if fb1 | fb2:
            out.fallbacks[L] = sorted(fb1 | fb2)
    return out


def load_stats(paths: Sequence[str | os.PathLike]):
    """Load (and merge) REAP statistics files."""
    from glmgguf.reap.stats import ReapStats

    for p in paths:
        if not Path(p).is_file():
            raise ExportError(f"calibration statistics {p} not found")
    return ReapStats.load_many(list(paths))
