"""Testbed model sizes: `GlmMoeDsaConfig` keyword arguments shaped like GLM-5.2, scaled down.

Both sizes keep every structural feature of the real model: MLA attention with q/kv LoRA, the DSA indexer with
"full" and "shared" layers, leading dense layers then MoE layers (sigmoid router with correction bias, one shared
expert), one MTP (NextN) block, untied output head, and the GLM tokenizer's special-token ids.
Expert / FFN rows are multiples of 256 so llama.cpp's K-quants apply to them.
"""

from __future__ import annotations

from copy import deepcopy

from glmgguf.testbed.tokenizer import EOS_TOKENS, PAD_TOKEN, VOCAB_SIZE, special_token_ids

_IDS = special_token_ids()
_TOKEN_IDS = {
    "vocab_size": VOCAB_SIZE,
    "eos_token_id": [_IDS[t] for t in EOS_TOKENS],
    "pad_token_id": _IDS[PAD_TOKEN],
    "bos_token_id": None,  # GLM puts `[gMASK]<sop>` in the chat template, not a tokenizer BOS
}

_COMMON = {
    **_TOKEN_IDS,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_shared_experts": 1,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "initializer_range": 0.02,
}

TESTBED_SIZES: dict[str, dict] = {
    # ~15 M parameters: fast enough to train on 2 CPU cores in minutes.
    "tiny": {
        **_COMMON,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "index_n_heads": 16,
        "index_head_dim": 64,
        "index_topk": 32,
        # full, shared, full, shared (GLM-5.2's schedule is freq 4, offset 3: too sparse for 4 layers)
        "index_topk_freq": 2,
        "index_skip_topk_offset": 1,
    },
    # ~200 M parameters (~400 MB in BF16): for benchmarks of the conversion / quantization stages.
    "small": {
        **_COMMON,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 8,
        "first_k_dense_replace": 3,
        "n_routed_experts": 64,
        "num_experts_per_tok": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 512,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "index_n_heads": 16,
        "index_head_dim": 128,
        "index_topk": 256,
        "index_topk_freq": 4,  # GLM-5.2's schedule: full at 0, 1, 2, then every 4th (6, 10, ...)
        "index_skip_topk_offset": 3,
    },
}


def testbed_config_kwargs(size: str, overrides: dict | None = None) -> dict:
    """A copy of the `GlmMoeDsaConfig` keyword arguments of one testbed size (with `overrides` applied)."""
    try:
        return {**deepcopy(TESTBED_SIZES[size]), **(overrides or {})}
    except KeyError:
        raise ValueError(f"unknown testbed size {size!r}; choose from {sorted(TESTBED_SIZES)}") from None


def testbed_config(size: str, overrides: dict | None = None):
    """The `GlmMoeDsaConfig` of one testbed size."""
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(**testbed_config_kwargs(size, overrides))
