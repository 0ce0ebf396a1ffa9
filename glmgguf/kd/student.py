"""The student as KD trains and evaluates it: the transformers trunk plus the MTP block built beside it.

transformers' `GlmMoeDsaForCausalLM` ignores the MTP (NextN) block stored after the trunk, so the block is built
with `glmgguf.modeling.load_decoder_layer` (the testbed's `build_mtp_layer`, GLM's on-disk names) and run with
`glmgguf.modeling.mtp_block_forward` the way llama.cpp runs it: for position t, the trunk's post-final-norm state h_t
and the embedding of token t+1 give the block's prediction of token t+2, through `shared_head.norm` and
the LM head (`lm_head` as released; a stored `shared_head.head` copy when there is one).

Its distillation target is the teacher's next-token distribution at position t+1, the teacher's own prediction of
token t+2 with the whole prefix in view: exactly what a draft head should propose, and already in the teacher cache
(no teacher MTP run needed). h_t is detached: the MTP loss trains the MTP router only, the trunk loss the trunk
routers only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glmgguf.io import CheckpointReader
from glmgguf.layout import GlmLayout, LayerKind, mtp_embedding_name


def router_names(layout: GlmLayout, mtp: bool, bias: bool) -> list[str]:
    """HF names of the tensors Router-KD trains: every MoE layer's gate weight (MTP block when `mtp`), and its
    `e_score_correction_bias` when `bias`."""
    out = []
    for x in layout.moe_layers:
        if x.is_mtp and not mtp:
            continue
        out.append(f"model.layers.{x.index}.mlp.gate.weight")
        if bias:
            out.append(f"model.layers.{x.index}.mlp.gate.e_score_correction_bias")
    return out


def parameter_counts(shapes: dict[str, tuple[int, ...]], layout: GlmLayout, mtp: bool = True,
                     bias: bool = False) -> tuple[int, int]:
    """(trainable, total) parameters of a checkpoint whose tensor shapes are `shapes` (from a reader, or from
    `GlmLayout.expected_hf_tensors()` for a config alone)."""
    total = sum(_numel(s) for s in shapes.values())
    trainable = sum(_numel(shapes[n]) for n in router_names(layout, mtp, bias) if n in shapes)
    return trainable, total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class Student:
    """A checkpoint loaded for KD: `forward(ids)` gives trunk logits and (if loaded) MTP logits.

    With `meta` the trunk and the MTP block are built on the meta device (shapes, no values) for
    `glmgguf.kd.fsdp.load_sharded_student` to shard and fill; `mtp_embed` is then None when the block shares the
    trunk's embedding (the forward reads `embed_tokens` itself)."""

    def __init__(self, model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 device_map: str | dict | None = None, mtp: bool = True, meta: bool = False):
        from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

        from glmgguf.modeling import (
            build_decoder_layer,
            cast_storage,
            load_decoder_layer,
            meta_trunk_model,
            model_config,
        )
        from glmgguf.reap.observe import load_in_memory_model

        self.path = Path(model_dir)
        self.reader = CheckpointReader(model_dir)
        self.layout = GlmLayout.from_config(self.reader.config)
        self.config = model_config(self.reader.config)
        # the trunk gets its own config: building a model sets fields (the experts' kernel) the MTP block must not see
        self.model = (meta_trunk_model(self.layout, model_config(self.reader.config), dtype) if meta
                      else load_in_memory_model(model_dir, dtype, device_map, self.reader))
        self.in_device = self.model.model.embed_tokens.weight.device
        self.out_device = self.model.model.norm.weight.device
        self.mtp: nn.Module | None = None
        self.mtp_index: int | None = None
        mtp_infos = [x for x in self.layout.layers if x.is_mtp and x.kind is LayerKind.MOE]
        if mtp and mtp_infos:
            if len(mtp_infos) > 1:
                raise NotImplementedError("more than one MTP block is not supported (GLM-5.x has one)")
            self.mtp_index = mtp_infos[0].index
            own_head = f"model.layers.{self.mtp_index}.shared_head.head.weight" in self.reader
            self.mtp = (cast_storage(build_decoder_layer(self.layout, self.config, self.mtp_index, own_head), dtype)
                        if meta else load_decoder_layer(self.reader, self.layout, self.config, self.mtp_index, dtype,
                                                        self.out_device, load_head=True))
            name = mtp_embedding_name(self.reader, self.mtp_index)
            shared = name == "model.embed_tokens.weight"
            emb = self.model.model.embed_tokens.weight if shared else self.reader.get(name)
            dev = torch.device("cpu") if meta else self.out_device  # FSDP moves them to the rank's device
            self.mtp_embed = None if meta and shared else emb.detach().to(device=dev, dtype=dtype)
            self.rotary = GlmMoeDsaRotaryEmbedding(self.config).to(dev)
        for p in self.parameters():
            p.requires_grad_(False)

    def parameters(self):
        yield from self.model.parameters()
        if self.mtp is not None:
            yield from self.mtp.parameters()

    def gates(self) -> dict[int, nn.Module]:
        """MoE layer index -> its router module (`GlmMoeDsaTopkRouter`), MTP block included when loaded."""
        out = {i: layer.mlp.gate for i, layer in enumerate(self.model.model.layers) if hasattr(layer.mlp, "gate")}
        if self.mtp is not None:
            out[self.mtp_index] = self.mtp.mlp.gate
        return out

    def checkpoint_activations(self) -> None:
        """Recompute each decoder layer's activations in the backward pass instead of keeping them."""
        self.model.config.use_cache = False
        self.model.activation_checkpointing_enable({"use_reentrant": False})

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.mtp is not None:
            self.mtp.train(mode)
        if mode:  # KD is deterministic: no dropout anywhere (GLM's attention_dropout is 0 anyway)
            for m in self.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
                if hasattr(m, "attention_dropout"):
                    m.attention_dropout = 0.0

    def modules(self):
        yield from self.model.modules()
        if self.mtp is not None:
            yield from self.mtp.modules()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk logits [B, S, V] (position t predicts token t+1) and MTP logits [B, S-1, V] (position t
        predicts token t+2) or None."""
        hidden = self.model.model(input_ids=ids.to(self.in_device)).last_hidden_state
        logits = self.model.lm_head(hidden)
        if self.mtp is None or ids.shape[1] < 2:
            return logits, None
        from glmgguf.modeling import mtp_block_forward

        h = hidden.detach().to(self.out_device)
        table = self.model.model.embed_tokens.weight if self.mtp_embed is None else self.mtp_embed
        e = F.embedding(ids[:, 1:].to(self.out_device), table)
        out = mtp_block_forward(self.mtp, h[:, :-1], e, self.config, self.rotary)
        return logits, self.mtp.head_logits(out, self.model.lm_head)
