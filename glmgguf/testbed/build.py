"""Build a testbed checkpoint: a randomly initialized GLM-5.x-shaped model in GLM-5.2's exact on-disk layout.

The checkpoint is what `zai-org/GLM-5.2` looks like on disk, scaled down: BF16 tensors (the router's
`e_score_correction_bias` in F32), one tensor per routed expert (`mlp.experts.E.{gate,up,down}_proj.weight`),
sharded safetensors with an index, the MTP (NextN) block stored after the trunk as
`model.layers.{num_hidden_layers}.*`, config / generation config and the GLM-style tokenizer.
transformers loads the trunk (it ignores the MTP block); every stage of the toolkit can be tested on it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from glmgguf.io import ShardedWriter, atomic_dir
from glmgguf.testbed.configs import testbed_config, testbed_config_kwargs
from glmgguf.testbed.tokenizer import write_tokenizer

# Per-size shard limits: the tiny model spans several shards so sharding is always exercised.
MAX_SHARD_BYTES = {"tiny": 4 * 1024**2, "small": 128 * 1024**2}
DEFAULT_MAX_SHARD_BYTES = 1024**3

# Initialization scales (see `init_testbed_weights`).
WEIGHT_STD = 0.02
ROUTER_LOGIT_STD = 2.0  # std of router logits for unit-RMS inputs: sigmoid scores spread over (0, 1)
BIAS_STD = 0.03  # e_score_correction_bias: small, but it flips some top-k choices
NORM_NOISE = 0.05
KNORM_BIAS_STD = 0.02


# ---------------------------------------------------------------------------------------------------------------
# The MTP (NextN) block
# ---------------------------------------------------------------------------------------------------------------

def mtp_layer_config(config):
    """Config under which the MTP block is built: one more layer, a "full" MoE layer with a dense indexer.

    The draft head runs dense attention (llama.cpp's MTP graph has no indexer), so `index_topk` is raised past any
    sequence length: the indexer tensors exist (and are stored) but select every token.
    """
    from transformers import GlmMoeDsaConfig

    kw = config.to_dict()
    for k in ("mlp_layer_types", "layer_types", "head_dim", "qk_head_dim", "transformers_version",
              "architectures", "_name_or_path", "id2label", "label2id", "model_type"):
        kw.pop(k, None)
    n = config.num_hidden_layers
    kw.update(num_hidden_layers=n + 1, indexer_types=list(config.indexer_types) + ["full"],
              index_topk=max(config.max_position_embeddings, config.index_topk))
    cfg = GlmMoeDsaConfig(**kw)
    cfg._attn_implementation = config._attn_implementation or "sdpa"
    cfg._experts_implementation = getattr(config, "_experts_implementation", None) or "eager"
    return cfg


def build_mtp_layer(config):
    """The MTP block as a module whose parameter names are GLM's on-disk names (relative to the layer)."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer, GlmMoeDsaRMSNorm

    class GlmMtpLayer(GlmMoeDsaDecoderLayer):
        """A MoE decoder block plus NextN wiring: x = eh_proj([enorm(emb(t+1)), hnorm(h_t)]) -> block -> head."""

        def __init__(self, cfg, layer_idx: int):
            super().__init__(cfg, layer_idx)
            h = cfg.hidden_size
            self.enorm = GlmMoeDsaRMSNorm(h, cfg.rms_norm_eps)
            self.hnorm = GlmMoeDsaRMSNorm(h, cfg.rms_norm_eps)
            self.eh_proj = nn.Linear(2 * h, h, bias=False)
            self.shared_head = nn.Module()
            self.shared_head.norm = GlmMoeDsaRMSNorm(h, cfg.rms_norm_eps)
            self.shared_head.head = nn.Linear(h, cfg.vocab_size, bias=False)

        def mtp_forward(self, hidden_post_norm, next_embeds, position_embeddings, attention_mask):
            """Logits for token t+2 from the trunk's final-norm output at t and the embedding of token t+1."""
            x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden_post_norm)], dim=-1))
            x, _ = GlmMoeDsaDecoderLayer.forward(
                self, x, attention_mask=attention_mask, position_embeddings=position_embeddings
            )
            return self.shared_head.head(self.shared_head.norm(x))

    cfg = mtp_layer_config(config)
    return GlmMtpLayer(cfg, config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_testbed_weights(module: nn.Module, generator: torch.Generator, hidden_size: int) -> None:
    """Re-initialize every parameter / persistent buffer so that all tensors are non-trivial and routing matters.

    Linear / embedding / expert weights N(0, 0.02); RMSNorm and LayerNorm weights 1 + N(0, 0.05); the indexer
    k_norm bias N(0, 0.02); router weights scaled for logits of std ~2; correction bias N(0, 0.03).
    Depends only on the module's state-dict names and shapes, not on transformers' own init.
    """
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            val = noise * BIAS_STD
        elif name.endswith("mlp.gate.weight"):
            val = noise * (ROUTER_LOGIT_STD / math.sqrt(hidden_size))
        elif name.endswith("k_norm.bias"):
            val = noise * KNORM_BIAS_STD
        elif t.dim() == 1 and ("norm" in name.rsplit(".", 2)[-2] or name.endswith("norm.weight")):
            val = 1.0 + noise * NORM_NOISE
        else:
            val = noise * WEIGHT_STD
        t.copy_(val.to(t.dtype))


def new_testbed_model(size: str = "tiny", seed: int = 0):
    """A freshly initialized (float32) trunk model and its MTP block, deterministic in `seed`."""
    from transformers import GlmMoeDsaForCausalLM

    config = testbed_config(size)
    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(config)
    mtp = build_mtp_layer(model.config)
    gen = torch.Generator().manual_seed(seed)
    init_testbed_weights(model, gen, config.hidden_size)
    init_testbed_weights(mtp, gen, config.hidden_size)
    model.eval()
    mtp.eval()
    return model, mtp


# ---------------------------------------------------------------------------------------------------------------
# GLM-5.2 on-disk layout
# ---------------------------------------------------------------------------------------------------------------

def _split_layer(prefix: str, sd: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """A decoder layer's state dict with the fused experts split into GLM's per-expert tensors.

    transformers keeps experts as `gate_up_proj` [E, 2I, H] (gate rows first, as `chunk(2)` in the forward reads
    them) and `down_proj` [E, H, I]; on disk each expert has its own gate_proj / up_proj [I, H], down_proj [H, I].
    """
    for k, v in sd.items():
        if k.endswith("mlp.experts.down_proj"):
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            down = sd[k[: -len("gate_up_proj")] + "down_proj"]
            inter = v.shape[1] // 2
            base = prefix + k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                yield f"{base}{e}.gate_proj.weight", v[e, :inter]
                yield f"{base}{e}.up_proj.weight", v[e, inter:]
                yield f"{base}{e}.down_proj.weight", down[e]
            continue
        yield prefix + k, v


def glm_tensors(model, mtp=None) -> list[tuple[str, torch.Tensor]]:
    """(on-disk name, tensor) in checkpoint order: embeddings, layers 0..L-1, final norm, LM head, MTP layer L."""
    n = model.config.num_hidden_layers
    out: list[tuple[str, torch.Tensor]] = [("model.embed_tokens.weight", model.model.embed_tokens.weight)]
    for i, layer in enumerate(model.model.layers):
        out.extend(_split_layer(f"model.layers.{i}.", layer.state_dict()))
    out.append(("model.norm.weight", model.model.norm.weight))
    out.append(("lm_head.weight", model.lm_head.weight))
    if mtp is not None:
        out.extend(_split_layer(f"model.layers.{n}.", mtp.state_dict()))
    return out


def storage_dtype(name: str) -> torch.dtype:
    return torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16


def config_json(size: str) -> dict:
    """config.json in GLM-5.2's style (the testbed's keyword arguments plus the architecture keys)."""
    import transformers

    kw = testbed_config_kwargs(size)
    cfg = testbed_config(size)
    kw.update(
        architectures=["GlmMoeDsaForCausalLM"],
        model_type="glm_moe_dsa",
        dtype="bfloat16",
        torch_dtype="bfloat16",
        rope_parameters=dict(cfg.rope_parameters),
        head_dim=cfg.qk_rope_head_dim,
        attention_dropout=0.0,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
        use_cache=True,
        transformers_version=transformers.__version__,
    )
    return dict(sorted(kw.items()))


def generation_config_json(config: dict) -> dict:
    return {
        "_from_model_config": False,
        "do_sample": True,
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "temperature": 1.0,
        "top_p": 0.95,
        "transformers_version": config["transformers_version"],
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_testbed(
    model,
    mtp,
    out_dir: str | os.PathLike,
    size: str,
    force: bool = False,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
    on_write: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` (+ its MTP block) as a GLM-5.2-layout checkpoint directory, atomically.

    `extra_files` maps file names to text written beside the weights (e.g. a training report);
    `on_write(partial_dir)` runs before the directory is moved into place.
    """
    tensors = glm_tensors(model, mtp)
    plan = [(name, tuple(t.shape), storage_dtype(name)) for name, t in tensors]
    limit = max_shard_bytes or MAX_SHARD_BYTES.get(size, DEFAULT_MAX_SHARD_BYTES)
    cfg = config_json(size)
    with atomic_dir(out_dir, force=force) as tmp:
        with torch.no_grad(), ShardedWriter(tmp, plan, max_shard_bytes=limit) as writer:
            for (name, t), (_, _, dtype) in zip(tensors, plan, strict=True):
                writer.add(name, t.detach().to(dtype).contiguous())
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", generation_config_json(cfg))
        write_tokenizer(tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
        if on_write is not None:
            on_write(tmp)
    return Path(out_dir)


def build_testbed(
    out_dir: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    force: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Build a randomly initialized testbed checkpoint of `size` into `out_dir` (deterministic in `seed`)."""
    model, mtp = new_testbed_model(size, seed)
    return save_testbed(model, mtp, out_dir, size, force=force, max_shard_bytes=max_shard_bytes)


def expected_tensor_names(config: dict) -> list[str]:
    """Every tensor name GLM-5.2's layout has for a config (trunk + `num_nextn_predict_layers` MTP layers)."""
    n = config["num_hidden_layers"]
    n_mtp = config.get("num_nextn_predict_layers", 0)
    types = list(config["indexer_types"])
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(n + n_mtp):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{m}.weight" for m in
                  ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_layernorm",
                   "kv_a_layernorm")]
        if i >= n or types[i] == "full":
            names += [f"{p}self_attn.indexer.{m}" for m in
                      ("wq_b.weight", "wk.weight", "weights_proj.weight", "k_norm.weight", "k_norm.bias")]
        if i < config["first_k_dense_replace"]:
            names += [f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        else:
            names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            names += [f"{p}mlp.experts.{e}.{m}_proj.weight" for e in range(config["n_routed_experts"])
                      for m in ("gate", "up", "down")]
            names += [f"{p}mlp.shared_experts.{m}_proj.weight" for m in ("gate", "up", "down")]
        if i >= n:
            names += [p + "eh_proj.weight", p + "enorm.weight", p + "hnorm.weight",
                      p + "shared_head.norm.weight", p + "shared_head.head.weight"]
    return names
