"""GLM-5.x transformers modules built from a checkpoint's tensors, one decoder layer at a time.

`load_decoder_layer` creates a `GlmMoeDsaDecoderLayer` (or the MTP block) on the meta device and assigns its
parameters from the shards, per-expert tensors fused into transformers' in-memory layout, so memory holds that
one layer. `positions_and_mask` and `mtp_block_forward` rebuild what `GlmMoeDsaModel.forward` computes around the
layers. The streaming runner (`glmgguf.runner`), the REAP observer and the KD student run layers built here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from glmgguf.errors import GlmggufError
from glmgguf.io import CheckpointReader
from glmgguf.layout import GlmLayout, LayerInfo, LayerKind
from glmgguf.streamed_experts import StreamedExperts

FP32_SUFFIXES = ("e_score_correction_bias",)  # transformers keeps these in float32 (_keep_in_fp32_modules_strict)


class ModelingError(GlmggufError, ValueError):
    """A checkpoint cannot be assembled as asked (device placement)."""



def model_config(cfg: dict, attn_implementation: str = "sdpa"):
    """The transformers `GlmMoeDsaConfig` of a config.json dict (attention implementation set explicitly)."""
    from transformers import GlmMoeDsaConfig

    config = GlmMoeDsaConfig.from_dict(copy.deepcopy(cfg))
    config._attn_implementation = attn_implementation
    return config


def layer_config(config, info: LayerInfo):
    """`config` with this layer's own routed-expert count (per-layer counts after a non-uniform prune)."""
    if info.kind is not LayerKind.MOE or info.n_experts == config.n_routed_experts:
        return config
    cfg = copy.deepcopy(config)
    cfg.n_routed_experts = info.n_experts
    return cfg


def storage_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model loaded in `dtype` holds tensor `name` in."""
    return torch.float32 if name.endswith(FP32_SUFFIXES) else dtype


def fused_expert_weights(reader: CheckpointReader, prefix: str, n_experts: int, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert tensors fused as transformers holds them: gate_up_proj [E, 2I, H] (gate rows, then up rows,
    the order `chunk(2)` reads them in the forward) and down_proj [E, H, I]. One expert tensor is read at a time."""
    g0 = reader.info(f"{prefix}mlp.experts.0.gate_proj.weight").shape
    d0 = reader.info(f"{prefix}mlp.experts.0.down_proj.weight").shape
    gate_up = torch.empty((n_experts, 2 * g0[0], g0[1]), dtype=dtype, device=device)
    down = torch.empty((n_experts, *d0), dtype=dtype, device=device)
    copy_experts(reader, prefix, 0, gate_up, down)
    return gate_up, down


@torch.no_grad()
def copy_experts(reader: CheckpointReader, prefix: str, first: int, gate_up: torch.Tensor | None,
                 down: torch.Tensor | None) -> None:
    """Fill fused rows in place: gate_up [k, 2I, H] and down [k, H, I] (either may be None) with experts
    first .. first+k-1, one expert tensor read at a time."""
    for k in range(len(gate_up if gate_up is not None else down)):
        base = f"{prefix}mlp.experts.{first + k}."
        if gate_up is not None:
            inter = gate_up.shape[1] // 2
            gate_up[k, :inter].copy_(reader.get(base + "gate_proj.weight"))
            gate_up[k, inter:].copy_(reader.get(base + "up_proj.weight"))
        if down is not None:
            down[k].copy_(reader.get(base + "down_proj.weight"))


def build_decoder_layer(layout: GlmLayout, config, index: int, own_head: bool = False) -> nn.Module:
    """Decoder block `index` (trunk layer, or the MTP block with GLM's on-disk names) on the meta device."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer

    from glmgguf.testbed.build import build_mtp_layer

    info = layout.layers[index]
    cfg = layer_config(config, info)
    with torch.device("meta"):
        return build_mtp_layer(cfg, own_head) if info.is_mtp else GlmMoeDsaDecoderLayer(cfg, index)


def meta_trunk_model(layout: GlmLayout, config, dtype: torch.dtype) -> nn.Module:
    """The transformers `GlmMoeDsaForCausalLM` (trunk) on the meta device, each layer with its own expert count,
    parameters and buffers in `dtype` (float32 for `FP32_SUFFIXES`): shapes without values."""
    from transformers import GlmMoeDsaForCausalLM

    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(config)
    for i in range(layout.n_layers):
        model.model.layers[i] = build_decoder_layer(layout, config, i)
    return cast_storage(model, dtype).eval()


def cast_storage(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` in `dtype`, its `FP32_SUFFIXES` buffers and parameters kept in float32 (as transformers keeps them)."""
    module.to(dtype)
    for m in module.modules():
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if name.endswith(FP32_SUFFIXES) and t.dtype != torch.float32:
                setattr(m, name, t.float() if not isinstance(t, nn.Parameter)
                        else nn.Parameter(t.float(), requires_grad=t.requires_grad))
    return module


def load_decoder_layer(reader: CheckpointReader, layout: GlmLayout, config, index: int,
                       dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                       load_head: bool = True, experts_on_disk: bool = False) -> nn.Module:
    """Build decoder block `index` (trunk layer, or the MTP block for index >= n_layers) from its tensors only.

    The module is created on the meta device and its parameters are assigned from the checkpoint, so memory holds
    this one layer. MTP blocks are built with the testbed's `build_mtp_layer` (GLM's on-disk parameter names);
    indexer tensors an MTP block lacks on disk are zero (its indexer selects every token anyway). A stored
    `shared_head.head` copy is loaded when `load_head`; without one the block's logits come from the trunk's
    `lm_head` (`head_logits(x, lm_head)`), as in the released checkpoints. With `experts_on_disk` the routed
    experts stay in the shards (`StreamedExperts`: read one at a time when their tokens come).
    """
    info = layout.layers[index]
    prefix = f"model.layers.{index}."
    module = build_decoder_layer(layout, config, index, load_head and f"{prefix}shared_head.head.weight" in reader)
    state: dict[str, torch.Tensor] = {}
    if info.kind is LayerKind.MOE and experts_on_disk:
        module.mlp.experts = StreamedExperts(reader, prefix, info.n_experts, module.mlp.experts.act_fn, dtype, device)
    elif info.kind is LayerKind.MOE:
        state["mlp.experts.gate_up_proj"], state["mlp.experts.down_proj"] = fused_expert_weights(
            reader, prefix, info.n_experts, dtype, device)
    for key, meta in module.state_dict().items():
        if key in state:
            continue
        name = prefix + key
        if name in reader:
            t = reader.get(name)
        elif info.is_mtp and ".indexer." in key:
            t = torch.zeros(meta.shape)
        else:
            raise KeyError(f"checkpoint lacks {name}")
        state[key] = t.to(device=device, dtype=storage_dtype(key, dtype))
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def load_trunk_model(reader: CheckpointReader, dtype: torch.dtype, device: str | dict | None = None) -> nn.Module:
    """The transformers `GlmMoeDsaForCausalLM` (trunk only) assembled from the reader's tensors, layer by layer.

    For checkpoints transformers cannot load itself (the block-FP8 release, read dequantized). One device only:
    spreading a model over several GPUs needs accelerate's loading (dequantize first: `reap prune --dequantize`).
    """
    from transformers import GlmMoeDsaForCausalLM
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

    if isinstance(device, dict) or device == "auto":
        raise ModelingError("a block-FP8 checkpoint loads onto one device in memory; use --streaming, or write a "
                            "BF16 copy first (`glmgguf reap prune ... --dequantize bf16`)")
    dev = torch.device(device or "cpu")
    layout = GlmLayout.from_config(reader.config)
    config = model_config(reader.config)
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(config)
    for i in range(layout.n_layers):
        model.model.layers[i] = load_decoder_layer(reader, layout, config, i, dtype, dev)
    for module, name in ((model.model.embed_tokens, "model.embed_tokens.weight"),
                         (model.model.norm, "model.norm.weight"), (model.lm_head, "lm_head.weight")):
        module.weight = nn.Parameter(reader.get(name).to(device=dev, dtype=dtype), requires_grad=False)
    model.model.rotary_emb = GlmMoeDsaRotaryEmbedding(config).to(dev)
    return model.eval()


def load_vector_module(reader: CheckpointReader, name: str, eps: float, dtype: torch.dtype, device) -> nn.Module:
    """An RMSNorm whose weight is the checkpoint tensor `name`."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRMSNorm

    w = reader.get(name)
    norm = GlmMoeDsaRMSNorm(w.shape[0], eps)
    norm.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    return norm


def positions_and_mask(config, hidden: torch.Tensor, rotary: nn.Module):
    """Rotary (cos, sin), position ids and the causal mask for a [B, S, H] chunk, as GlmMoeDsaModel builds them."""
    from transformers.masking_utils import create_causal_mask

    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                              position_ids=pos, allow_is_causal_skip=False)
    return rotary(hidden, position_ids=pos), pos, mask


def mtp_block_forward(mtp: nn.Module, hidden_post_norm: torch.Tensor, next_embeds: torch.Tensor, config,
                      rotary: nn.Module) -> torch.Tensor:
    """The MTP block's decoder output (before shared_head) for positions t with inputs h_t and emb(token t+1).

    The same computation as the testbed's `GlmMtpLayer.mtp_forward` without the LM head:
    x = eh_proj([enorm(e), hnorm(h)]), then the decoder block with dense attention and the MoE FFN.
    """
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer

    x = mtp.eh_proj(torch.cat([mtp.enorm(next_embeds), mtp.hnorm(hidden_post_norm)], dim=-1))
    pos_emb, pos, mask = positions_and_mask(config, x, rotary)
    out, _ = GlmMoeDsaDecoderLayer.forward(mtp, x, attention_mask=mask, position_embeddings=pos_emb,
                                           position_ids=pos)
    return out
