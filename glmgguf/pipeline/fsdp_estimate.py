"""Per-GPU memory and time of `kd train --fsdp` under torchrun, from the model config alone (`pipeline --dry-run`).

The model (assumptions in `FsdpAssumptions`, GPUs in `GPUS`): each GPU holds its 1/N shard of the BF16 student
(none with `--cpu-offload`: the shards live in host memory), the largest FSDP unit gathered twice (the running
decoder layer and the prefetched next), the root unit (embeddings, LM head, MTP projections), the float32 gates
with gradient and AdamW state (sharded), and the activations of its share of the batch under activation
checkpointing (layer-boundary hidden states, one layer's working set, float32 logits with their log-softmax and
gradient). A step takes the longer of compute (every GPU busy at `mfu` of its dense BF16 peak) and parameter
traffic (three gathers a step: forward, recomputation, backward; over NVLink, or over PCIe from host memory when
offloaded).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from glmgguf.layout import GlmLayout, parse_hf_name
from glmgguf.pipeline.estimate import tensor_bytes

GB = 10**9


@dataclass(frozen=True)
class Gpu:
    """One accelerator of an 8-GPU node."""

    bf16_tflops: float  # dense BF16 peak
    memory_gb: float
    nvlink_gbs: float  # per direction per GPU
    pcie_gbs: float  # host -> GPU


GPUS: dict[str, Gpu] = {
    "H100": Gpu(989.0, 80, 450, 25),
    "H200": Gpu(989.0, 141, 450, 25),
    "B200": Gpu(2250.0, 192, 900, 50),
}


@dataclass(frozen=True)
class FsdpAssumptions:
    mfu: float = 0.35  # achieved fraction of the BF16 peak
    layer_working_set_gb: float = 3.0  # one layer's recomputed attention scores and MoE intermediates
    gathers_per_step: int = 3  # forward, recomputed forward, backward
    usable_memory: float = 0.9  # of a GPU's memory, the rest for the CUDA context and fragmentation


@dataclass(frozen=True)
class FsdpGpuEstimate:
    gpu: str
    per_gpu_bytes: int
    fits: bool
    seconds_per_step: float  # the larger of the two below
    compute_seconds: float  # every GPU busy at the assumed MFU

    def hours(self, steps: int) -> float:
        return self.seconds_per_step * steps / 3600


def param_counts(layout: GlmLayout) -> dict:
    """Parameters per decoder layer (total, routed-expert share, active per token), outside layers ("global"), in
    all, and active per token of the trunk (the LM head counted, the embedding lookup not)."""
    total: dict = defaultdict(int)
    experts: dict = defaultdict(int)
    for name, shape in layout.expected_hf_tensors(mtp_indexer=True).items():
        p = parse_hf_name(name)
        key = p.layer if p is not None and p.layer is not None else "global"
        total[key] += math.prod(shape)
        if p is not None and p.expert is not None:
            experts[key] += math.prod(shape)
    layers = {}
    for info in layout.layers:
        active = total[info.index] - experts[info.index]
        if info.n_experts:
            active += experts[info.index] * layout.experts_per_tok // info.n_experts
        layers[info.index] = {"params": total[info.index], "expert_params": experts[info.index],
                              "active_params": active}
    trunk = sum(v["active_params"] for k, v in layers.items() if k < layout.n_layers) + total["global"] // 2
    return {"global": total["global"], "layers": layers, "total": sum(total.values()),
            "trunk_active_per_token": trunk}


def fsdp_kd_parts(layout: GlmLayout, world: int, batch: int, seq_len: int, dtype_bytes: int = 2,
                  assume: FsdpAssumptions = FsdpAssumptions()) -> dict[str, int]:
    """Bytes per GPU of each part of the model above (the student in `dtype_bytes`, `batch` sequences across
    `world` ranks)."""
    params = param_counts(layout)
    routers = sum(x.n_experts * layout.hidden_size for x in layout.moe_layers)
    tokens = batch // world * seq_len
    hidden = tokens * layout.hidden_size * dtype_bytes * (layout.n_layers + layout.n_mtp)
    logits = tokens * layout.vocab_size * 4 * 3  # logits, log-softmax, their gradient (float32)
    return {"shard": tensor_bytes(layout, dtype_bytes)[0] // world,
            "gathered_units": 2 * max(v["params"] for v in params["layers"].values()) * dtype_bytes,
            "root_unit": params["global"] * dtype_bytes,
            "activations": int(hidden + logits + assume.layer_working_set_gb * GB),
            "gates_adamw": routers * 16 // world}


def step_flops(layout: GlmLayout, batch: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one step: 2 x active parameters per token, three times (activation recompute
    costs a forward, the backward two)."""
    params = param_counts(layout)
    active = params["trunk_active_per_token"] + params["layers"][layout.n_layers]["active_params"]
    return batch * seq_len * 2 * active * 3


def fsdp_kd_estimate(layout: GlmLayout, world: int, batch: int, seq_len: int, cpu_offload: bool,
                     dtype_bytes: int = 2, assume: FsdpAssumptions = FsdpAssumptions()) -> list[FsdpGpuEstimate]:
    """Per GPU kind of `GPUS`: bytes per GPU, whether it fits, seconds per step."""
    parts = fsdp_kd_parts(layout, world, batch, seq_len, dtype_bytes, assume)
    per_gpu = sum(v for k, v in parts.items() if not (cpu_offload and k == "shard"))
    weights = tensor_bytes(layout, dtype_bytes)[0]
    flops = step_flops(layout, batch, seq_len)
    out = []
    for name, gpu in GPUS.items():
        compute = flops / (world * gpu.bf16_tflops * 1e12 * assume.mfu)
        traffic = (assume.gathers_per_step * parts["shard"] / (gpu.pcie_gbs * GB) if cpu_offload
                   else assume.gathers_per_step * weights * (world - 1) / world / (gpu.nvlink_gbs * GB))
        out.append(FsdpGpuEstimate(name, per_gpu, per_gpu < assume.usable_memory * gpu.memory_gb * GB,
                                   max(compute, traffic), compute))
    return out


def fsdp_kd_lines(layout: GlmLayout, world: int, batch: int, seq_len: int, steps: int, cpu_offload: bool,
                  dtype_bytes: int) -> list[str]:
    """The dry run's per-GPU table of `kd train --fsdp` on `world` ranks, one row per GPU kind."""
    parts = fsdp_kd_parts(layout, world, batch, seq_len, dtype_bytes)
    shown = {k: v for k, v in parts.items() if not (cpu_offload and k == "shard")}
    lines = [f"kd under torchrun (FSDP2, {world} ranks{', --cpu-offload' if cpu_offload else ''}): per GPU "
             + " + ".join(f"{k} {v / GB:.1f} GB" for k, v in shown.items())
             + (f"; host memory {tensor_bytes(layout, dtype_bytes)[0] / GB:.0f} GB in all" if cpu_offload else ""),
             "", f"| {world} x GPU | memory | per GPU | fits | s/step | {steps} steps |",
             "|---|---:|---:|---|---:|---:|"]
    for e in fsdp_kd_estimate(layout, world, batch, seq_len, cpu_offload, dtype_bytes):
        hours = f"{e.hours(steps):.1f} h" if e.fits else "-"
        lines.append(f"| {e.gpu} | {GPUS[e.gpu].memory_gb:.0f} GB | {e.per_gpu_bytes / GB:.0f} GB | "
                     f"{'yes' if e.fits else 'no'} | {e.seconds_per_step:.1f} | {hours} |")
    return lines
