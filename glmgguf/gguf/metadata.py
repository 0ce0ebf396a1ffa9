"""GGUF key/value metadata for llama.cpp's `glm-dsa` architecture (the upstream converter's set, plus ours)."""

from __future__ import annotations

import hashlib
import json

import gguf

from glmgguf import __version__
from glmgguf.gguf.keys import Arch, Keys, Provenance, arch_key
from glmgguf.layout import GlmLayout, LayoutError
from glmgguf.llama import patches

# transformers' GlmMoeDsaIndexer normalizes keys with nn.LayerNorm(index_head_dim, eps=1e-6) (no config key)
INDEXER_NORM_EPS = 1e-6


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise LayoutError(f"rope_type {rope_type!r} is not supported by this converter (GLM-5.x uses 'default')")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def expert_counts(layout: GlmLayout, block_count: int) -> list[int] | None:
    """Routed experts of each written block (0 for dense ones) when they differ between blocks, else None."""
    counts = [layer.n_experts for layer in layout.layers[:block_count]]
    return None if len({c for c in counts if c}) <= 1 else counts


def write_hparams(w: gguf.GGUFWriter, layout: GlmLayout, block_count: int, with_mtp: bool) -> list[str]:
    """Hyperparameters exactly as llama.cpp's loader for glm-dsa reads them.

    Returns the llama.cpp patches the file needs (also written as `Provenance.REQUIRES_PATCHES`): per-layer expert
    counts are an array-typed `expert_count`, which the unpatched loader refuses ("key glm-dsa.expert_count has
    wrong type arr but expected type u32") instead of misreading.
    """
    cfg = layout.config
    per_layer = expert_counts(layout, block_count)
    needs = [patches.PER_LAYER_EXPERTS] if per_layer is not None else []
    w.add_block_count(block_count)
    w.add_context_length(int(cfg.get("max_position_embeddings", 202752)))
    w.add_embedding_length(layout.hidden_size)
    w.add_feed_forward_length(layout.intermediate_size)
    w.add_head_count(layout.n_heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    if per_layer is None:
        w.add_expert_count(max(layer.n_experts for layer in layout.layers[:block_count]))
    else:
        w.add_key_value(arch_key(Keys.LLM.EXPERT_COUNT), per_layer, gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.UINT32)
    w.add_expert_used_count(layout.experts_per_tok)
    w.add_expert_group_count(layout.n_group)
    w.add_expert_group_used_count(layout.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(layout.n_dense_leading)
    w.add_vocab_size(layout.vocab_size)
    w.add_q_lora_rank(layout.q_lora_rank)
    w.add_kv_lora_rank(layout.kv_lora_rank)
    w.add_key_length(layout.kv_lora_rank + layout.qk_rope_head_dim)
    w.add_value_length(layout.kv_lora_rank)
    w.add_key_length_mla(layout.qk_nope_head_dim + layout.qk_rope_head_dim)
    w.add_value_length_mla(layout.v_head_dim)
    w.add_expert_feed_forward_length(layout.moe_intermediate_size)
    w.add_expert_shared_count(layout.n_shared_experts)
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    if cfg.get("norm_topk_prob", True):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(layout.qk_rope_head_dim)
    if with_mtp and layout.n_mtp:
        w.add_nextn_predict_layers(layout.n_mtp)
    w.add_indexer_head_count(layout.index_n_heads)
    w.add_indexer_key_length(layout.index_head_dim)
    w.add_indexer_top_k(layout.index_topk)
    # gguf 0.19.0 has no add_indexer_types; without the key llama.cpp guesses the pattern from n_ctx_train.
    types = [layer.indexer == "full" for layer in layout.layers if not layer.is_mtp]
    w.add_array(arch_key(Arch.INDEXER_TYPES), types)
    # read by the patched runtime (glmgguf.llama.patches.INDEXER_NORM_EPS); an unpatched one ignores it (eps 0)
    w.add_float32(arch_key(Arch.INDEXER_LAYERNORM_EPS), INDEXER_NORM_EPS)
    if needs:
        w.add_array(Provenance.REQUIRES_PATCHES, needs)
    return needs


def config_digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def write_provenance(w: gguf.GGUFWriter, layout: GlmLayout, settings: dict[str, str]) -> None:
    """Our own keys: tool version, source config digest and the conversion settings (`Provenance` keys)."""
    w.add_string(Provenance.VERSION, __version__)
    w.add_string(Provenance.SOURCE_CONFIG_SHA256, config_digest(layout.config))
    for key, value in settings.items():
        w.add_string(key, value)
