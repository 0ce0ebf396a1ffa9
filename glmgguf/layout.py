"""The single source of truth for the GLM-5.x (`GlmMoeDsaForCausalLM`) tensor layout.

`GlmLayout` parses a config.json into typed per-layer facts (dense / MoE / MTP, full / shared indexer, expert
counts, dimensions). `TENSOR_TABLE` names every Hugging Face tensor, its GGUF counterpart and its role, as data;
every stage (REAP, KD, convert, quantize, NVFP4) finds tensors through these two.

One file on purpose (over 400 lines): it is the one source of truth for the layout, and the tensor table, the
name parsers and the per-layer facts are read together whenever the layout changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from glmgguf.errors import GlmggufError

ARCHITECTURE = "GlmMoeDsaForCausalLM"
GGUF_ARCH = "glm-dsa"


class LayoutError(GlmggufError, ValueError):
    """The config or the checkpoint does not describe a model this toolkit understands."""


class Role(StrEnum):
    """What a tensor does; quant recipes and stages select tensors by role."""

    EMBED = "embed"
    OUTPUT = "output"
    NORM = "norm"
    ATTN = "attn"
    INDEXER = "indexer"
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"
    DENSE_FFN = "dense_ffn"
    SHARED_EXPERT = "shared_expert"
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    MTP = "mtp"


class Transform(StrEnum):
    """How HF tensors become a GGUF tensor."""

    COPY = "copy"
    STACK_EXPERTS = "stack_experts"  # experts 0..E-1 stacked on a new outermost axis
    SPLIT_K_B = "split_k_b"  # kv_b_proj -> attn_k_b [n_head, kv_lora, qk_nope]
    SPLIT_V_B = "split_v_b"  # kv_b_proj -> attn_v_b [n_head, v_head, kv_lora]


class Part(StrEnum):
    """Which layers a table row exists in."""

    GLOBAL = "global"
    LAYER = "layer"  # every decoder block (trunk and MTP)
    INDEXER = "indexer"  # blocks that carry indexer tensors
    DENSE = "dense"
    MOE = "moe"
    MTP = "mtp"


@dataclass(frozen=True)
class TensorRule:
    """One row of the naming table: `{L}` is the block index, `{E}` the expert index."""

    hf: str
    gguf: str
    role: Role
    part: Part
    transform: Transform = Transform.COPY
    optional: bool = False

    @property
    def is_expert(self) -> bool:
        return "{E}" in self.hf


_A = "model.layers.{L}.self_attn."
_M = "model.layers.{L}.mlp."
TENSOR_TABLE: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "token_embd.weight", Role.EMBED, Part.GLOBAL),
    TensorRule("model.norm.weight", "output_norm.weight", Role.NORM, Part.GLOBAL),
    TensorRule("lm_head.weight", "output.weight", Role.OUTPUT, Part.GLOBAL),
    TensorRule("model.layers.{L}.input_layernorm.weight", "blk.{L}.attn_norm.weight", Role.NORM, Part.LAYER),
    TensorRule(_A + "q_a_proj.weight", "blk.{L}.attn_q_a.weight", Role.ATTN, Part.LAYER),
    TensorRule(_A + "q_a_layernorm.weight", "blk.{L}.attn_q_a_norm.weight", Role.NORM, Part.LAYER),
    TensorRule(_A + "q_b_proj.weight", "blk.{L}.attn_q_b.weight", Role.ATTN, Part.LAYER),
    TensorRule(_A + "kv_a_proj_with_mqa.weight", "blk.{L}.attn_kv_a_mqa.weight", Role.ATTN, Part.LAYER),
    TensorRule(_A + "kv_a_layernorm.weight", "blk.{L}.attn_kv_a_norm.weight", Role.NORM, Part.LAYER),
    TensorRule(_A + "kv_b_proj.weight", "blk.{L}.attn_k_b.weight", Role.ATTN, Part.LAYER, Transform.SPLIT_K_B),
    TensorRule(_A + "kv_b_proj.weight", "blk.{L}.attn_v_b.weight", Role.ATTN, Part.LAYER, Transform.SPLIT_V_B),
    TensorRule(_A + "o_proj.weight", "blk.{L}.attn_output.weight", Role.ATTN, Part.LAYER),
    TensorRule(_A + "indexer.wq_b.weight", "blk.{L}.indexer.attn_q_b.weight", Role.INDEXER, Part.INDEXER),
    TensorRule(_A + "indexer.wk.weight", "blk.{L}.indexer.attn_k.weight", Role.INDEXER, Part.INDEXER),
    TensorRule(_A + "indexer.k_norm.weight", "blk.{L}.indexer.k_norm.weight", Role.NORM, Part.INDEXER),
    TensorRule(_A + "indexer.k_norm.bias", "blk.{L}.indexer.k_norm.bias", Role.NORM, Part.INDEXER),
    TensorRule(_A + "indexer.weights_proj.weight", "blk.{L}.indexer.proj.weight", Role.INDEXER, Part.INDEXER),
    TensorRule(
        "model.layers.{L}.post_attention_layernorm.weight", "blk.{L}.ffn_norm.weight", Role.NORM, Part.LAYER
    ),
    TensorRule(_M + "gate_proj.weight", "blk.{L}.ffn_gate.weight", Role.DENSE_FFN, Part.DENSE),
    TensorRule(_M + "up_proj.weight", "blk.{L}.ffn_up.weight", Role.DENSE_FFN, Part.DENSE),
    TensorRule(_M + "down_proj.weight", "blk.{L}.ffn_down.weight", Role.DENSE_FFN, Part.DENSE),
    TensorRule(_M + "gate.weight", "blk.{L}.ffn_gate_inp.weight", Role.ROUTER, Part.MOE),
    TensorRule(_M + "gate.e_score_correction_bias", "blk.{L}.exp_probs_b.bias", Role.ROUTER_BIAS, Part.MOE),
    TensorRule(
        _M + "experts.{E}.gate_proj.weight", "blk.{L}.ffn_gate_exps.weight", Role.EXPERT_GATE, Part.MOE,
        Transform.STACK_EXPERTS,
    ),
    TensorRule(
        _M + "experts.{E}.up_proj.weight", "blk.{L}.ffn_up_exps.weight", Role.EXPERT_UP, Part.MOE,
        Transform.STACK_EXPERTS,
    ),
    TensorRule(
        _M + "experts.{E}.down_proj.weight", "blk.{L}.ffn_down_exps.weight", Role.EXPERT_DOWN, Part.MOE,
        Transform.STACK_EXPERTS,
    ),
    TensorRule(_M + "shared_experts.gate_proj.weight", "blk.{L}.ffn_gate_shexp.weight", Role.SHARED_EXPERT,
               Part.MOE),
    TensorRule(_M + "shared_experts.up_proj.weight", "blk.{L}.ffn_up_shexp.weight", Role.SHARED_EXPERT, Part.MOE),
    TensorRule(_M + "shared_experts.down_proj.weight", "blk.{L}.ffn_down_shexp.weight", Role.SHARED_EXPERT,
               Part.MOE),
    TensorRule("model.layers.{L}.eh_proj.weight", "blk.{L}.nextn.eh_proj.weight", Role.MTP, Part.MTP),
    TensorRule("model.layers.{L}.enorm.weight", "blk.{L}.nextn.enorm.weight", Role.NORM, Part.MTP),
    TensorRule("model.layers.{L}.hnorm.weight", "blk.{L}.nextn.hnorm.weight", Role.NORM, Part.MTP),
    TensorRule("model.layers.{L}.shared_head.norm.weight", "blk.{L}.nextn.shared_head_norm.weight", Role.NORM,
               Part.MTP),
    # The released GLM-5.x MTP layer has no head or embedding of its own (it uses lm_head and
    # model.embed_tokens); re-packaged checkpoints may store both as copies, which are then carried.
    TensorRule("model.layers.{L}.shared_head.head.weight", "blk.{L}.nextn.shared_head_head.weight", Role.OUTPUT,
               Part.MTP, optional=True),
    TensorRule("model.layers.{L}.embed_tokens.weight", "blk.{L}.nextn.embed_tokens.weight", Role.EMBED, Part.MTP,
               optional=True),
)


# Roles whose linear weights the block-FP8 release stores as float8_e4m3fn + `weight_scale_inv` (REFERENCE 1b):
# attention projections, the indexer's wq_b / wk (not weights_proj), dense MLPs, shared and routed experts.
# Everything else (embeddings, heads, norms, router, indexer weights_proj, MTP eh_proj) stays BF16/F32.
_FP8_ROLES = frozenset({Role.ATTN, Role.DENSE_FFN, Role.SHARED_EXPERT, Role.EXPERT_GATE, Role.EXPERT_UP,
                        Role.EXPERT_DOWN})


def released_as_fp8(rule: TensorRule) -> bool:
    """Whether the GLM-5.x FP8 release stores this row's tensor as block-FP8."""
    return rule.role in _FP8_ROLES or (rule.role is Role.INDEXER and not rule.hf.endswith("weights_proj.weight"))


def mtp_embedding_name(names: Container[str], index: int) -> str:
    """The MTP block's embedding: its own `embed_tokens` when stored, else `model.embed_tokens` (as released)."""
    own = f"model.layers.{index}.embed_tokens.weight"
    return own if own in names else "model.embed_tokens.weight"


def _rule_regex(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(rx + "$")


_HF_PATTERNS = [(_rule_regex(r.hf), r) for r in TENSOR_TABLE]


@dataclass(frozen=True)
class HfName:
    """A parsed HF tensor name: which table row, block and expert it belongs to."""

    rule: TensorRule
    layer: int | None
    expert: int | None


def parse_hf_name(name: str) -> HfName | None:
    """Match an HF tensor name against the table (the first rule for kv_b_proj); None if unknown."""
    for rx, rule in _HF_PATTERNS:
        if m := rx.match(name):
            d = m.groupdict()
            return HfName(rule, int(d["L"]) if "L" in d else None, int(d["E"]) if "E" in d else None)
    return None


_GGUF_PATTERNS = [(_rule_regex(r.gguf), r) for r in TENSOR_TABLE]


@dataclass(frozen=True)
class GgufName:
    """A parsed GGUF tensor name: which table row and block it belongs to."""

    rule: TensorRule
    layer: int | None


def parse_gguf_name(name: str) -> GgufName | None:
    """Match a glm-dsa GGUF tensor name against the table; None if unknown."""
    for rx, rule in _GGUF_PATTERNS:
        if m := rx.match(name):
            d = m.groupdict()
            return GgufName(rule, int(d["L"]) if "L" in d else None)
    return None


class LayerKind(StrEnum):
    DENSE = "dense"
    MOE = "moe"


@dataclass(frozen=True)
class LayerInfo:
    """One decoder block: trunk layers 0..n_layers-1, then MTP blocks."""

    index: int
    kind: LayerKind
    is_mtp: bool
    indexer: str | None  # "full" | "shared" for trunk layers; None for MTP blocks (dense attention)
    indexer_source: int | None  # the full layer whose indexer (top-k) this layer uses
    n_experts: int  # routed experts (0 for dense)

    def has_part(self, part: Part, mtp_indexer: bool = False) -> bool:
        match part:
            case Part.GLOBAL:
                return False
            case Part.LAYER:
                return True
            case Part.INDEXER:
                return self.indexer == "full" or (self.is_mtp and mtp_indexer)
            case Part.DENSE:
                return self.kind is LayerKind.DENSE
            case Part.MOE:
                return self.kind is LayerKind.MOE
            case Part.MTP:
                return self.is_mtp


# config.json keys of the release (REFERENCE 1b) whose value the toolkit relies on: anything else is refused.
CONFIG_FIXED_VALUES: dict[str, object] = {
    "scoring_func": "sigmoid",  # the router's sigmoid scores (transformers and llama.cpp implement only this)
    "topk_method": "noaux_tc",  # selection by score + e_score_correction_bias
    "rope_interleave": True,  # interleaved RoPE pairs in attention, as both runtimes implement it
    "indexer_rope_interleave": True,  # ... and in the DSA indexer
}
# Release keys read nowhere, on purpose: `head_dim` (inconsistent in the release, 192 against qk 256 / v 256; the
# MLA dims are used), `bos_token_id` (absent from the FP8 config; GLM puts [gMASK]<sop> in the chat template),
# `index_share_for_mtp_iteration` (the MTP layer reuses the trunk's top-k; llama.cpp runs it dense),
# `moe_router_dtype` (routing is float32 everywhere here), `quantization_config` (the checkpoint reader's business,
# not the architecture's), `transformers_version`.


def check_fixed_values(cfg: dict) -> None:
    """Refuse a config whose architectural switches differ from what every stage implements."""
    for key, want in CONFIG_FIXED_VALUES.items():
        if key in cfg and cfg[key] is not None and cfg[key] != want:
            raise LayoutError(f"config.json has {key}={cfg[key]!r}; GLM-5.x uses {want!r}, the only value supported")


def derive_indexer_types(cfg: dict, n_layers: int) -> list[str]:
    """`indexer_types` as transformers' GlmMoeDsaConfig derives it (explicit list, pattern, or freq/offset)."""
    types = cfg.get("indexer_types")
    if types is None:
        pattern = cfg.get("index_topk_pattern")
        if pattern is not None:
            types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
        else:
            freq = max(cfg.get("index_topk_freq", 1), 1)
            offset = cfg.get("index_skip_topk_offset", 2)
            types = ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(n_layers)]
    if len(types) != n_layers or any(t not in ("full", "shared") for t in types):
        raise LayoutError(f"indexer_types must list 'full'/'shared' for each of the {n_layers} layers: {types}")
    if types and types[0] != "full":
        raise LayoutError("indexer_types[0] must be 'full': a shared layer needs an earlier full layer")
    return list(types)


@dataclass(frozen=True)
class GlmLayout:
    """Typed view of a GlmMoeDsaForCausalLM config.json."""

    config: dict = field(repr=False)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    n_layers: int
    n_mtp: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_shared_experts: int
    experts_per_tok: int
    n_group: int
    topk_group: int
    layers: tuple[LayerInfo, ...]

    @classmethod
    def from_dir(cls, path: str | Path) -> GlmLayout:
        cfg_path = Path(path) / "config.json"
        try:
            return cls.from_config(json.loads(cfg_path.read_text()))
        except FileNotFoundError:
            raise LayoutError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise LayoutError(f"{cfg_path}: invalid JSON ({e})") from None

    @classmethod
    def from_config(cls, cfg: dict) -> GlmLayout:
        archs = cfg.get("architectures") or []
        if ARCHITECTURE not in archs:
            raise LayoutError(f"architecture {archs or cfg.get('model_type')} is not {ARCHITECTURE}")
        check_fixed_values(cfg)
        try:
            n_layers = int(cfg["num_hidden_layers"])
            n_mtp = int(cfg.get("num_nextn_predict_layers") or 0)
            types = derive_indexer_types(cfg, n_layers)
            mlp_types = cfg.get("mlp_layer_types")
            if mlp_types is None:
                n_dense = min(int(cfg.get("first_k_dense_replace", 3)), n_layers)
                mlp_types = ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense)
            if len(mlp_types) != n_layers:
                raise LayoutError(f"mlp_layer_types has {len(mlp_types)} entries for {n_layers} layers")
            per_layer = cfg.get("num_routed_experts_per_layer")
            n_experts = int(cfg["n_routed_experts"])
            layers = []
            last_full = 0
            for i in range(n_layers + n_mtp):
                is_mtp = i >= n_layers
                kind = LayerKind.MOE if is_mtp or mlp_types[i] == "sparse" else LayerKind.DENSE
                if not is_mtp and types[i] == "full":
                    last_full = i
                count = 0
                if kind is LayerKind.MOE:
                    count = int(per_layer[i]) if per_layer is not None else n_experts
                layers.append(LayerInfo(
                    index=i, kind=kind, is_mtp=is_mtp,
                    indexer=None if is_mtp else types[i],
                    indexer_source=None if is_mtp else last_full,
                    n_experts=count,
                ))
            layout = cls(
                config=cfg,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                n_layers=n_layers,
                n_mtp=n_mtp,
                n_heads=int(cfg["num_attention_heads"]),
                q_lora_rank=int(cfg["q_lora_rank"]),
                kv_lora_rank=int(cfg["kv_lora_rank"]),
                qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
                qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
                v_head_dim=int(cfg["v_head_dim"]),
                index_n_heads=int(cfg.get("index_n_heads", 32)),
                index_head_dim=int(cfg.get("index_head_dim", 128)),
                index_topk=int(cfg.get("index_topk", 2048)),
                n_shared_experts=int(cfg.get("n_shared_experts", 1)),
                experts_per_tok=int(cfg["num_experts_per_tok"]),
                n_group=int(cfg.get("n_group") or 1),
                topk_group=int(cfg.get("topk_group") or 1),
                layers=tuple(layers),
            )
        except KeyError as e:
            raise LayoutError(f"config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, LayoutError):
                raise
            raise LayoutError(f"config.json has an invalid value: {e}") from None
        return layout

    @property
    def block_count(self) -> int:
        return self.n_layers + self.n_mtp

    @property
    def moe_layers(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.kind is LayerKind.MOE]

    @property
    def uniform_experts(self) -> int | None:
        """The routed-expert count shared by every MoE layer, or None for a non-uniform (per-layer) model."""
        counts = {layer.n_experts for layer in self.moe_layers}
        return counts.pop() if len(counts) == 1 else None

    @property
    def n_dense_leading(self) -> int:
        n = 0
        for layer in self.layers:
            if layer.kind is not LayerKind.DENSE:
                break
            n += 1
        return n

    def hf_shape(self, rule: TensorRule) -> tuple[int, ...]:
        """The HF (torch) shape of a table row's tensor (one expert for expert rows)."""
        h, v = self.hidden_size, self.vocab_size
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        shexp = self.moe_intermediate_size * self.n_shared_experts
        mi, di = self.moe_intermediate_size, self.intermediate_size
        suffix = rule.hf.split("{L}.")[-1]
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (v, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (v, h),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_a_proj.weight": (self.q_lora_rank, h),
            "self_attn.q_a_layernorm.weight": (self.q_lora_rank,),
            "self_attn.q_b_proj.weight": (self.n_heads * qk, self.q_lora_rank),
            "self_attn.kv_a_proj_with_mqa.weight": (self.kv_lora_rank + self.qk_rope_head_dim, h),
            "self_attn.kv_a_layernorm.weight": (self.kv_lora_rank,),
            "self_attn.kv_b_proj.weight": (self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                           self.kv_lora_rank),
            "self_attn.o_proj.weight": (h, self.n_heads * self.v_head_dim),
            "self_attn.indexer.wq_b.weight": (self.index_n_heads * self.index_head_dim, self.q_lora_rank),
            "self_attn.indexer.wk.weight": (self.index_head_dim, h),
            "self_attn.indexer.k_norm.weight": (self.index_head_dim,),
            "self_attn.indexer.k_norm.bias": (self.index_head_dim,),
            "self_attn.indexer.weights_proj.weight": (self.index_n_heads, h),
            "mlp.gate_proj.weight": (di, h),
            "mlp.up_proj.weight": (di, h),
            "mlp.down_proj.weight": (h, di),
            "mlp.experts.{E}.gate_proj.weight": (mi, h),
            "mlp.experts.{E}.up_proj.weight": (mi, h),
            "mlp.experts.{E}.down_proj.weight": (h, mi),
            "mlp.shared_experts.gate_proj.weight": (shexp, h),
            "mlp.shared_experts.up_proj.weight": (shexp, h),
            "mlp.shared_experts.down_proj.weight": (h, shexp),
            "eh_proj.weight": (h, 2 * h),
            "enorm.weight": (h,),
            "hnorm.weight": (h,),
            "shared_head.norm.weight": (h,),
            "shared_head.head.weight": (v, h),
            "embed_tokens.weight": (v, h),
        }
        return shapes[suffix]

    def hf_router_shape(self, layer: LayerInfo, rule: TensorRule) -> tuple[int, ...]:
        """HF shape with the layer's own expert count applied to router rows."""
        if rule.role is Role.ROUTER:
            return (layer.n_experts, self.hidden_size)
        if rule.role is Role.ROUTER_BIAS:
            return (layer.n_experts,)
        return self.hf_shape(rule)

    def expected_hf_tensors(self, mtp_indexer: bool = True) -> dict[str, tuple[int, ...]]:
        """Every required HF tensor name with its shape (MTP indexer tensors when `mtp_indexer`)."""
        out: dict[str, tuple[int, ...]] = {}
        for rule in TENSOR_TABLE:
            if rule.optional:
                continue
            if rule.part is Part.GLOBAL:
                out[rule.hf] = self.hf_shape(rule)
                continue
            for layer in self.layers:
                if not layer.has_part(rule.part, mtp_indexer):
                    continue
                name = rule.hf.replace("{L}", str(layer.index))
                if rule.is_expert:
                    for e in range(layer.n_experts):
                        out[name.replace("{E}", str(e))] = self.hf_shape(rule)
                else:
                    out[name] = self.hf_router_shape(layer, rule)
        return out
