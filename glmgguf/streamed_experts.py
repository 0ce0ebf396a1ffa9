"""A MoE layer run expert by expert from the shards: memory holds one expert, never a layer's 256.

GLM-5.2's routed experts are 19.3 GB per layer in BF16. `StreamedExperts` stands in for transformers'
`GlmMoeDsaExperts` (same forward) but keeps the weights on disk: each routed expert is read when its tokens come,
used once and freed. For that to read each expert once per layer rather than once per calibration chunk, the
layer runs in two passes over a group of chunks (`moe_in_groups`): the attention half of every chunk first (the
MoE's input is kept, its output left out), then the MoE over all of the group's tokens at once, then the sum.
The result equals the one-pass layer's: the MoE is a per-token function and the residual sum is the same add.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from glmgguf.io import CheckpointReader

EXPERT_STREAM_BYTES = 2 * 1024**3  # a layer whose routed experts exceed this runs them one at a time


class ExpertWeights:
    """One projection of a layer's routed experts, read from the shards when indexed: `[e]` -> [out, in]."""

    def __init__(self, reader: CheckpointReader, prefix: str, parts: tuple[str, ...], n_experts: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.reader, self.prefix, self.parts, self.n_experts = reader, prefix, parts, n_experts
        self.dtype, self.device = dtype, torch.device(device)

    def __len__(self) -> int:
        return self.n_experts

    def __getitem__(self, e: int | torch.Tensor) -> torch.Tensor:
        e = int(e)
        if not 0 <= e < self.n_experts:
            raise IndexError(f"expert {e} of {self.n_experts}")
        parts = [self.reader.get(f"{self.prefix}mlp.experts.{e}.{p}_proj.weight") for p in self.parts]
        weight = parts[0] if len(parts) == 1 else torch.cat(parts)
        return weight.to(device=self.device, dtype=self.dtype)


class StreamedExperts(nn.Module):
    """`GlmMoeDsaExperts` with its weights left in the checkpoint: `gate_up_proj[e]` [2I, H] (gate rows, then up
    rows) and `down_proj[e]` [H, I] read expert `e` on access."""

    def __init__(self, reader: CheckpointReader, prefix: str, n_experts: int, act_fn: Callable,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.num_experts = n_experts
        self.gate_up_proj = ExpertWeights(reader, prefix, ("gate", "up"), n_experts, dtype, device)
        self.down_proj = ExpertWeights(reader, prefix, ("down",), n_experts, dtype, device)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> the weighted sum of routed outputs [T, H]."""
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            pairs = order[start:start + c]
            tokens, slots = pairs // k, pairs % k
            gate, up = F.linear(hidden_states[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
            start += c
        return out


class CapturedMoe(nn.Module):
    """Stands in for a block's MoE during the attention pass: keeps its input, contributes zero."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.inputs.append(hidden_states)
        return torch.zeros_like(hidden_states)


def token_groups(sizes: Iterable[int], max_tokens: int) -> Iterator[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most `max_tokens` (at least one each)."""
    group: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        if group and total + n > max_tokens:
            yield group
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        yield group


def moe_in_groups(block: nn.Module, sizes: list[int], run_chunk: Callable[[int], torch.Tensor],
                  max_tokens: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(chunk index, block output) for every chunk, the block's MoE (`block.mlp`) run once per group of chunks.

    `run_chunk(i)` runs the block on chunk `i` (its MoE is swapped for a `CapturedMoe` meanwhile); `sizes` are
    the chunks' token counts and `max_tokens` bounds a group (the MoE's input and output are held for it).
    """
    moe = block.mlp
    capture = CapturedMoe()
    block.mlp = capture
    try:
        for group in token_groups(sizes, max_tokens):
            partial = [run_chunk(i) for i in group]
            hidden = partial[0].shape[-1]
            x = torch.cat([h.reshape(-1, hidden) for h in capture.inputs])
            capture.inputs.clear()
            block.mlp = moe
            y = moe(x.unsqueeze(0))[0]
            block.mlp = capture
            start = 0
            for i, h in zip(group, partial, strict=True):
                n = h.numel() // hidden
                yield i, h + y[start:start + n].view_as(h)
                start += n
    finally:
        block.mlp = moe
