"""Build a testbed checkpoint: a randomly initialized GLM-5.x-shaped model in GLM-5.2's exact on-disk layout.

The checkpoint is what `zai-org/GLM-5.2` looks like on disk, scaled down: BF16 tensors (the router's
`e_score_correction_bias` in F32), one tensor per routed expert (`mlp.experts.E.{gate,up,down}_proj.weight`),
sharded safetensors with an index, the MTP (NextN) block stored after the trunk as
`model.layers.{num_hidden_layers}.*` with its own indexer and without a head or embedding of its own, the
release's config.json keys, generation config and a GLM-style tokenizer (or the real one). With `fp8` it is
stored as `zai-org/GLM-5.2-FP8` is: block-FP8 weights with float32 `weight_scale_inv` on the modules the release
quantizes, and its `quantization_config`. transformers loads the trunk (it ignores the MTP block); every stage of
the toolkit can be tested on it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from glmgguf.io import ShardedWriter, atomic_dir
from glmgguf.io.fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, Fp8Scheme
from glmgguf.io.fp8 import quantize as fp8_quantize
from glmgguf.layout import parse_hf_name, released_as_fp8
from glmgguf.testbed.configs import testbed_config, testbed_config_kwargs
from glmgguf.testbed.tokenizer import EOS_TOKENS, PAD_TOKEN, write_tokenizer

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


def build_mtp_layer(config, own_head: bool = False):
    """The MTP block as a module whose parameter names are GLM's on-disk names (relative to the layer).

    As released, the block has no LM head of its own: it reuses the trunk's `lm_head` (and embeddings). With
    `own_head` it carries `shared_head.head` (re-packaged checkpoints store that copy).
    """
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
            if own_head:
                self.shared_head.head = nn.Linear(h, cfg.vocab_size, bias=False)

        def head_logits(self, x: torch.Tensor, lm_head: nn.Module | None) -> torch.Tensor:
            """[B, S, H] block output -> [B, S, V] logits: shared_head.norm, then the own head or `lm_head`."""
            head = getattr(self.shared_head, "head", None) or lm_head
            if head is None:
                raise ValueError("this MTP block has no head of its own: pass the trunk's lm_head")
            return head(self.shared_head.norm(x))

        def mtp_forward(self, hidden_post_norm, next_embeds, position_embeddings, attention_mask, lm_head=None):
            """Logits for token t+2 from the trunk's final-norm output at t and the embedding of token t+1."""
            x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden_post_norm)], dim=-1))
            x, _ = GlmMoeDsaDecoderLayer.forward(
                self, x, attention_mask=attention_mask, position_embeddings=position_embeddings
            )
            return self.head_logits(x, lm_head)

    cfg = mtp_layer_config(config)
    return GlmMtpLayer(cfg, config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------------------------------

def init_value(name: str, noise: torch.Tensor, hidden_size: int, ndim: int) -> torch.Tensor:
    """A tensor's initial value from standard-normal `noise` (elementwise, so it may be drawn in row chunks).

    Linear / embedding / expert weights N(0, 0.02); RMSNorm and LayerNorm weights 1 + N(0, 0.05); the indexer
    k_norm bias N(0, 0.02); router weights scaled for logits of std ~2; correction bias N(0, 0.03).
    `ndim`: the whole tensor's rank (1 for norms and biases).
    """
    if name.endswith("e_score_correction_bias"):
        return noise * BIAS_STD
    if name.endswith("mlp.gate.weight"):
        return noise * (ROUTER_LOGIT_STD / math.sqrt(hidden_size))
    if name.endswith("k_norm.bias"):
        return noise * KNORM_BIAS_STD
    if ndim == 1 and ("norm" in name.rsplit(".", 2)[-2] or name.endswith("norm.weight")):
        return 1.0 + noise * NORM_NOISE
    return noise * WEIGHT_STD


@torch.no_grad()
def init_testbed_weights(module: nn.Module, generator: torch.Generator, hidden_size: int) -> None:
    """Re-initialize every parameter / persistent buffer (see `init_value`) so that all tensors are non-trivial
    and routing matters. Depends only on the module's state-dict names and shapes, not on transformers' init."""
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        t.copy_(init_value(name, noise, hidden_size, t.dim()).to(t.dtype))


def new_testbed_model(size: str = "tiny", seed: int = 0, overrides: dict | None = None):
    """A freshly initialized (float32) trunk model and its MTP block, deterministic in `seed`."""
    from transformers import GlmMoeDsaForCausalLM

    config = testbed_config(size, overrides)
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


def glm_tensors(model, mtp=None, mtp_head_copies: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(on-disk name, tensor) in checkpoint order: embeddings, layers 0..L-1, final norm, LM head, MTP layer L.

    As released, the MTP layer stores no head or embedding; `mtp_head_copies` adds `shared_head.head` and
    `embed_tokens` as copies of `lm_head` and `model.embed_tokens`, as some re-packaged checkpoints do.
    """
    n = model.config.num_hidden_layers
    out: list[tuple[str, torch.Tensor]] = [("model.embed_tokens.weight", model.model.embed_tokens.weight)]
    for i, layer in enumerate(model.model.layers):
        out.extend(_split_layer(f"model.layers.{i}.", layer.state_dict()))
    out.append(("model.norm.weight", model.model.norm.weight))
    out.append(("lm_head.weight", model.lm_head.weight))
    if mtp is not None:
        out.extend(_split_layer(f"model.layers.{n}.", mtp.state_dict()))
        if mtp_head_copies:
            out.append((f"model.layers.{n}.shared_head.head.weight", model.lm_head.weight))
            out.append((f"model.layers.{n}.embed_tokens.weight", model.model.embed_tokens.weight))
    return out


def storage_dtype(name: str) -> torch.dtype:
    return torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16


def is_fp8_in_release(name: str) -> bool:
    """Whether the GLM-5.x FP8 release stores this tensor as block-FP8 (from the layout's table)."""
    parsed = parse_hf_name(name)
    return parsed is not None and released_as_fp8(parsed.rule)


def stored_tensors(tensors: list[tuple[str, torch.Tensor]], fp8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors as stored: BF16 (F32 correction bias), or with `fp8` the release's block-FP8 weights, each
    followed by its float32 `weight_scale_inv`."""
    for name, t in tensors:
        if fp8 and is_fp8_in_release(name):
            codes, scale = fp8_quantize(t, DEFAULT_BLOCK)
            yield name, codes
            yield name + SCALE_SUFFIX, scale
        else:
            yield name, t.detach().to(storage_dtype(name))


def _stored_plan(tensors: list[tuple[str, torch.Tensor]], fp8: bool) -> list[tuple[str, tuple, torch.dtype]]:
    plan = []
    for name, t in tensors:
        if fp8 and is_fp8_in_release(name):
            plan.append((name, tuple(t.shape), torch.float8_e4m3fn))
            plan.append((name + SCALE_SUFFIX, Fp8Scheme(DEFAULT_BLOCK).scale_shape(tuple(t.shape)), torch.float32))
        else:
            plan.append((name, tuple(t.shape), storage_dtype(name)))
    return plan


def fp8_quantization_config(config: dict) -> dict:
    """`quantization_config` as GLM-5.2-FP8 writes it, quirks included: `modules_to_not_convert` names
    `self_attn.indexers_proj` (no such tensor) and omits `indexer.weights_proj` (BF16 all the same)."""
    n, n_mtp = config["num_hidden_layers"], config.get("num_nextn_predict_layers", 0)
    skip = ["lm_head", "model.embed_tokens"]
    for i in range(n + n_mtp):
        p = f"model.layers.{i}."
        skip += [p + "input_layernorm", p + "post_attention_layernorm", p + "self_attn.q_a_layernorm",
                 p + "self_attn.kv_a_layernorm", p + "self_attn.indexers_proj"]
        if i >= n or config["mlp_layer_types"][i] == "sparse":
            skip.append(p + "mlp.gate")
        if i >= n:
            skip += [p + "eh_proj", p + "enorm", p + "hnorm", p + "shared_head.norm"]
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "modules_to_not_convert": skip, "quant_method": "fp8",
            "weight_block_size": list(DEFAULT_BLOCK)}


def config_json(size: str, overrides: dict | None = None, fp8: bool = False) -> dict:
    """config.json as GLM-5.2 writes it (the testbed's keyword arguments plus the release's other keys)."""
    import transformers

    kw = testbed_config_kwargs(size, overrides)
    cfg = testbed_config(size, overrides)
    kw.pop("bos_token_id", None)  # the release's config has none
    kw.update(
        architectures=["GlmMoeDsaForCausalLM"],
        model_type="glm_moe_dsa",
        dtype="bfloat16",
        rope_parameters=dict(cfg.rope_parameters),
        head_dim=cfg.qk_nope_head_dim,  # the release's value, inconsistent with the MLA dims (never used)
        attention_dropout=0.0,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
        mlp_layer_types=list(cfg.mlp_layer_types),
        indexer_types=list(cfg.indexer_types),
        index_topk_pattern=None,
        index_share_for_mtp_iteration=True,
        indexer_rope_interleave=True,
        rope_interleave=True,
        use_cache=True,
        transformers_version=transformers.__version__,
    )
    if fp8:
        kw.update(moe_router_dtype="float32", quantization_config=fp8_quantization_config(kw))
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tokenizer_overrides(tokenizer_dir: str | os.PathLike) -> dict:
    """Config values a model built for a tokenizer directory needs: the vocabulary padded up to a multiple of
    128 (GLM-5.x: 154,880) and the special-token ids (eos: `<|endoftext|>`, `<|user|>`, `<|observation|>`)."""
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = dict(tok["model"]["vocab"])
    ids.update({a["content"]: a["id"] for a in tok.get("added_tokens", [])})
    missing = [t for t in (*EOS_TOKENS, PAD_TOKEN) if t not in ids]
    if missing:
        raise ValueError(f"{tokenizer_dir}: not a GLM tokenizer (no {missing[0]})")
    return {"vocab_size": -(-(max(ids.values()) + 1) // 128) * 128, "eos_token_id": [ids[t] for t in EOS_TOKENS],
            "pad_token_id": ids[PAD_TOKEN]}


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)


def write_side_files(out: Path, cfg: dict, tokenizer_dir: str | os.PathLike | None) -> None:
    """config.json, generation_config.json and the tokenizer (the testbed's own, or `tokenizer_dir`'s files)."""
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", generation_config_json(cfg))
    if tokenizer_dir is None:
        write_tokenizer(out)
    else:
        _copy_tokenizer(Path(tokenizer_dir), out)


def save_testbed(
    model,
    mtp,
    out_dir: str | os.PathLike,
    size: str,
    force: bool = False,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
    on_write: Callable[[Path], None] | None = None,
    fp8: bool = False,
    mtp_head_copies: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (+ its MTP block) as a GLM-5.2-layout checkpoint directory, atomically.

    `fp8` stores it as GLM-5.2-FP8 does; `mtp_head_copies` adds the MTP head/embedding copies; `tokenizer_dir`
    supplies the tokenizer files (the model must have been built with `tokenizer_overrides` of it).
    `extra_files` maps file names to text written beside the weights (e.g. a training report);
    `on_write(partial_dir)` runs before the directory is moved into place.
    """
    tensors = glm_tensors(model, mtp, mtp_head_copies)
    plan = _stored_plan(tensors, fp8)
    limit = max_shard_bytes or MAX_SHARD_BYTES.get(size, DEFAULT_MAX_SHARD_BYTES)
    overrides = tokenizer_overrides(tokenizer_dir) if tokenizer_dir is not None else None
    cfg = config_json(size, overrides, fp8)
    with atomic_dir(out_dir, force=force) as tmp:
        with torch.no_grad(), ShardedWriter(tmp, plan, max_shard_bytes=limit) as writer:
            for name, t in stored_tensors(tensors, fp8):
                writer.add(name, t.contiguous())
        write_side_files(tmp, cfg, tokenizer_dir)
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
    fp8: bool = False,
    mtp_head_copies: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Build a randomly initialized testbed checkpoint of `size` into `out_dir` (deterministic in `seed`).

    With `tokenizer_dir` (a directory with a GLM `tokenizer.json`, e.g. the real GLM tokenizer) the model gets
    that tokenizer's vocabulary size and special-token ids.
    """
    overrides = tokenizer_overrides(tokenizer_dir) if tokenizer_dir is not None else None
    model, mtp = new_testbed_model(size, seed, overrides)
    return save_testbed(model, mtp, out_dir, size, force=force, max_shard_bytes=max_shard_bytes, fp8=fp8,
                        mtp_head_copies=mtp_head_copies, tokenizer_dir=tokenizer_dir)


def expected_tensor_names(config: dict) -> list[str]:
    """Every tensor name GLM-5.2's layout has for a config (trunk + `num_nextn_predict_layers` MTP layers, which
    carry an indexer and no head or embedding of their own)."""
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
            names += [p + "eh_proj.weight", p + "enorm.weight", p + "hnorm.weight", p + "shared_head.norm.weight"]
    return names
