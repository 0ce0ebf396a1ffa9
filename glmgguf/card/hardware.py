"""Which hardware fits a build at which context: weights + KV cache + overhead against usable memory.

The KV cache is what llama.cpp's glm-dsa cache allocates (`llama_kv_cache_dsa`, pinned version): per trunk layer
and token one K row of `attention.key_length` = kv_lora_rank + qk_rope_head_dim elements (MLA keeps the
compressed latent and the shared RoPE key; there is no V row), and per *full* indexer layer one indexer key row of
index_head_dim elements; both at 2 bytes (F16, llama.cpp's default `-ctk f16`; vLLM and SGLang hold the same
latent in BF16). The MTP block keeps a cache of its own (one more K row per token) only while drafting. A build
fits a device set at context C when weights + KV(C) + the set's overhead <= its usable memory, the weights and
cache spread evenly over the devices (tensor or pipeline parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmgguf.card.facts import CacheDims
from glmgguf.pipeline.fsdp_estimate import GB, GPUS

KV_ELEMENT_BYTES = 2  # F16 / BF16 cache entries
OVERHEAD_PER_DEVICE = 2 * GB  # compute buffers and the runtime's context on each device
CONTEXTS = (8192, 32768, 131072)  # the columns of the picker, besides the model's own maximum


@dataclass(frozen=True)
class DeviceSet:
    """One hardware configuration: `count` devices of `memory` bytes, of which `usable` may be filled."""

    name: str
    memory: int  # per device
    count: int
    usable: float
    kinds: frozenset[str]  # the builds it serves: "gguf" (llama.cpp), "nvfp4" and "checkpoint" (vLLM / SGLang)

    @property
    def capacity(self) -> int:
        """Bytes left for weights and KV cache."""
        return int(self.count * (self.memory * self.usable - OVERHEAD_PER_DEVICE))


_ALL = frozenset({"gguf", "nvfp4", "checkpoint"})
_GGUF = frozenset({"gguf"})
DEVICE_SETS: tuple[DeviceSet, ...] = (
    DeviceSet("8 x H100", int(GPUS["H100"].memory_gb * GB), 8, 0.9, _ALL),
    DeviceSet("8 x H200", int(GPUS["H200"].memory_gb * GB), 8, 0.9, _ALL),
    DeviceSet("8 x B200", int(GPUS["B200"].memory_gb * GB), 8, 0.9, _ALL),
    DeviceSet("4 x B200", int(GPUS["B200"].memory_gb * GB), 4, 0.9, _ALL),
    DeviceSet("4 x RTX PRO 6000", 96 * GB, 4, 0.9, _ALL),
    # macOS lets the GPU wire about 75% of unified memory by default (iogpu.wired_limit_mb raises it)
    DeviceSet("Apple, 512 GB unified memory", 512 * GB, 1, 0.75, _GGUF),
    DeviceSet("Apple, 256 GB unified memory", 256 * GB, 1, 0.75, _GGUF),
    DeviceSet("CPU + 1 TB RAM", 1024 * GB, 1, 0.9, _GGUF),
    DeviceSet("CPU + 512 GB RAM", 512 * GB, 1, 0.9, _GGUF),
)


def kv_bytes_per_token(c: CacheDims, drafting: bool = False) -> int:
    """KV-cache bytes one token of context takes (with `drafting`: the MTP block's cache too)."""
    rows = (c.n_layers + (c.n_mtp if drafting else 0)) * c.mla_width + c.n_full_indexer * c.indexer_width
    return rows * KV_ELEMENT_BYTES


def largest_context(weights: int, per_token: int, s: DeviceSet, max_context: int | None) -> int:
    """The longest context (up to the model's maximum, when known) that fits `s`; 0 when the weights alone do
    not fit."""
    free = s.capacity - weights
    if free <= 0:
        return 0
    return free // per_token if max_context is None else min(max_context, free // per_token)


def contexts(max_context: int | None) -> list[int]:
    """The picker's columns: the standard contexts below the model's maximum, then the maximum."""
    if max_context is None:
        return list(CONTEXTS)
    return [c for c in CONTEXTS if c < max_context] + [max_context]


def sets_for(kind: str) -> list[DeviceSet]:
    return [s for s in DEVICE_SETS if kind in s.kinds]
