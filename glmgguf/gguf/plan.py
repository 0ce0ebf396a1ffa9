"""The tensor plan of a conversion: every GGUF tensor, where it comes from and how it is made.

Built from the layout and the checkpoint headers only (no tensor data), so it can be printed, sized and checked
before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from gguf import GGMLQuantizationType

from glmgguf.checkpoint import GlmCheckpoint
from glmgguf.io import CheckpointError
from glmgguf.layout import TENSOR_TABLE, LayerInfo, Part, Role, TensorRule, Transform, parse_hf_name

OUTTYPES: dict[str, GGMLQuantizationType] = {  # `convert --outtype`: the type of the weight matrices
    "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}


class MtpMode(StrEnum):
    KEEP = "keep"
    DROP = "drop"
    ONLY = "only"


class IndexerMode(StrEnum):
    NATIVE = "native"  # indexer tensors only on full layers (runtimes with shared-indexer support)
    DUPLICATE = "duplicate"  # shared layers also get their governing full layer's indexer (older runtimes)


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, role, block, HF sources, transform and GGUF (numpy-order) shape."""

    name: str
    role: Role
    layer: LayerInfo | None
    sources: list[str]
    transform: Transform
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType = GGMLQuantizationType.F32
    note: str = ""
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def row_size(self) -> int:
        return self.shape[-1]

    @property
    def always_f32(self) -> bool:
        """Tensors the upstream converter never quantizes: norms, 1-D tensors, the router, indexer.proj."""
        return (
            self.role in (Role.NORM, Role.ROUTER, Role.ROUTER_BIAS)
            or len(self.shape) == 1
            or self.name.endswith("indexer.proj.weight")
        )


def _gguf_shape(ckpt: GlmCheckpoint, rule: TensorRule, layer: LayerInfo | None) -> tuple[int, ...]:
    lay = ckpt.layout
    match rule.transform:
        case Transform.SPLIT_K_B:
            return (lay.n_heads, lay.kv_lora_rank, lay.qk_nope_head_dim)
        case Transform.SPLIT_V_B:
            return (lay.n_heads, lay.v_head_dim, lay.kv_lora_rank)
        case Transform.STACK_EXPERTS:
            assert layer is not None
            return (layer.n_experts, *lay.hf_shape(rule))
    return lay.hf_router_shape(layer, rule) if layer is not None else lay.hf_shape(rule)


def _layer_tensors(ckpt: GlmCheckpoint, layer: LayerInfo, indexer: IndexerMode) -> list[PlannedTensor]:
    out = []
    for rule in TENSOR_TABLE:
        if rule.part is Part.GLOBAL:
            continue
        src_layer = layer.index
        if rule.part is Part.INDEXER and not layer.has_part(Part.INDEXER, ckpt.mtp_indexer):
            if indexer is IndexerMode.DUPLICATE and layer.indexer == "shared":
                src_layer = layer.indexer_source  # copy of the governing full layer's indexer
            else:
                continue
        elif not layer.has_part(rule.part, ckpt.mtp_indexer):
            continue
        hf = rule.hf.replace("{L}", str(src_layer))
        if rule.is_expert:
            sources = [hf.replace("{E}", str(e)) for e in range(layer.n_experts)]
        else:
            sources = [hf]
        if rule.optional and sources[0] not in ckpt.reader:
            continue
        note = f"copy of blk.{src_layer} indexer" if src_layer != layer.index else ""
        out.append(PlannedTensor(
            name=rule.gguf.replace("{L}", str(layer.index)), role=rule.role, layer=layer, sources=sources,
            transform=rule.transform, shape=_gguf_shape(ckpt, rule, layer), note=note,
        ))
    return out


def plan_tensors(ckpt: GlmCheckpoint, mtp: MtpMode = MtpMode.KEEP,
                 indexer: IndexerMode = IndexerMode.NATIVE) -> list[PlannedTensor]:
    """All GGUF tensors for this checkpoint, in file order (globals, then block by block)."""
    for name in ckpt.reader.names():
        if parse_hf_name(name) is None:
            raise CheckpointError(f"tensor {name} is not part of the GLM-5.x layout; refusing to guess")
    lay = ckpt.layout
    plan: list[PlannedTensor] = []
    for rule in TENSOR_TABLE:
        if rule.part is Part.GLOBAL:
            plan.append(PlannedTensor(rule.gguf, rule.role, None, [rule.hf], rule.transform,
                                      lay.hf_shape(rule)))
    for layer in lay.layers:
        if (mtp is MtpMode.DROP and layer.is_mtp) or (mtp is MtpMode.ONLY and not layer.is_mtp):
            continue
        plan.extend(_layer_tensors(ckpt, layer, indexer))
    return plan
