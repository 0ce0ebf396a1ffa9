"""Facts a build's own files hold: GGUF metadata and tensor infos (as `glmgguf inspect` reads them), or a
checkpoint's config.json and tensor headers, and the NVFP4 export record."""

from __future__ import annotations

import math
from pathlib import Path

from glmgguf.card.facts import NVFP4_MANIFEST, CacheDims, GgufFacts, ModelFacts, Nvfp4Facts, RoleRow
from glmgguf.gguf.inspect import GgufSummary, read_summary
from glmgguf.gguf.keys import Arch, Keys, Provenance, arch_key
from glmgguf.gguf.recipe import Recipe
from glmgguf.io import CheckpointReader
from glmgguf.io.reader import INDEX_NAME, SINGLE_NAME
from glmgguf.layout import GlmLayout, parse_hf_name
from glmgguf.pipeline.manifest import read_json

EXPERT_ROLES = ("expert_gate", "expert_up", "expert_down")
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def gguf_parts(output: Path) -> list[Path]:
    """The GGUF files of an output: the file, or every part in a split folder."""
    return sorted(output.glob("*.gguf")) if output.is_dir() else [output]


def _kv(s: GgufSummary, key: str) -> object:
    return s.kv.get(arch_key(key, str(s.kv[Keys.General.ARCHITECTURE])))


def gguf_model(s: GgufSummary) -> ModelFacts:
    """Dimensions from the GGUF's metadata; parameters from its tensor infos (MTP block not active)."""
    n_mtp = int(_kv(s, Keys.LLM.NEXTN_PREDICT_LAYERS) or 0)
    n_layers = int(_kv(s, Keys.LLM.BLOCK_COUNT)) - n_mtp
    experts, k = int(_kv(s, Keys.LLM.EXPERT_COUNT)), int(_kv(s, Keys.LLM.EXPERT_USED_COUNT))
    dense = routed = 0
    for t in s.tensors.values():
        if t.layer is None or t.layer < n_layers:
            routed += t.n_elements if t.role in EXPERT_ROLES else 0
            dense += 0 if t.role in EXPERT_ROLES else t.n_elements
    active = dense + routed * k // experts
    moe = {t.layer for t in s.tensors.values() if t.role in EXPERT_ROLES and t.layer is not None and t.layer < n_layers}
    types = list(_kv(s, Arch.INDEXER_TYPES) or [])
    cache = CacheDims(n_layers=n_layers, n_mtp=n_mtp, mla_width=int(_kv(s, Keys.Attention.KEY_LENGTH)),
                      n_full_indexer=sum(bool(x) for x in types),
                      indexer_width=int(_kv(s, Keys.Attention.Indexer.KEY_LENGTH)),
                      max_context=int(_kv(s, Keys.LLM.CONTEXT_LENGTH)))
    return ModelFacts(experts=experts, experts_per_tok=k, moe_layers=len(moe), total_params=s.total().n_elements,
                      active_params=active, cache=cache)


def recipe_rules(recipe: Recipe) -> tuple[str, ...]:
    """A recipe's rules as `what -> TYPE` lines, in the order they are tried, and its default."""
    rules = []
    for r in recipe.rules:
        what = [*([", ".join(sorted(x.value for x in r.roles))] if r.roles else []),
                *([f"name /{r.name.pattern}/"] if r.name else []), *([f"blocks {r.layers}"] if r.layers else [])]
        rules.append(f"{'; '.join(what)} -> {r.qtype.name}")
    return (*rules, f"anything else -> {recipe.default.name}")


def gguf_facts(output: Path, shipped: dict[str, Recipe]) -> tuple[GgufSummary, GgufFacts]:
    """The GGUF's summary and its card facts; `shipped`: the shipped recipes by name."""
    parts = gguf_parts(output)
    s = read_summary(parts[0])
    prov = s.provenance
    recipe = shipped.get(str(prov.get(Provenance.RECIPE)))
    if recipe is not None and recipe.sha256 != prov.get(Provenance.RECIPE_SHA256):
        recipe = None  # a recipe of that name, but not the one the file was made with
    roles = tuple(RoleRow(r.role, tuple(sorted(((q.name, n) for q, n in r.types.items()), key=lambda x: -x[1])),
                          r.n_tensors, r.bpw) for r in s.by_role())
    facts = GgufFacts(files=tuple(p.name for p in parts), recipe=_str(prov.get(Provenance.RECIPE)),
                      recipe_description=recipe.description if recipe else None,
                      recipe_rules=recipe_rules(recipe) if recipe else (), mtp=_str(prov.get(Provenance.MTP)),
                      indexer=_str(prov.get(Provenance.INDEXER)), roles=roles,
                      requires_patches=tuple(map(str, s.kv.get(Provenance.REQUIRES_PATCHES) or ())))
    return s, facts


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def checkpoint_model(ckpt: Path) -> ModelFacts:
    """Dimensions from config.json; parameters from the tensor names the checkpoint holds and the config's shapes
    (so packed or block-scaled storage counts each weight once)."""
    layout = GlmLayout.from_dir(ckpt)
    names = set(CheckpointReader(ckpt).names())
    mtp_indexer = any(n.startswith(f"model.layers.{layout.n_layers}.self_attn.indexer.") for n in names)
    total = dense = 0
    routed: dict[int, int] = {}  # trunk layer -> routed expert weights
    for name, shape in layout.expected_hf_tensors(mtp_indexer=mtp_indexer).items():
        n = math.prod(shape)
        total += n
        parsed = parse_hf_name(name)
        layer = parsed.layer if parsed else None
        if layer is not None and layer >= layout.n_layers:
            continue
        if ".mlp.experts." in name:
            routed[layer] = routed.get(layer, 0) + n
        else:
            dense += n
    active = dense + sum(n * layout.experts_per_tok // layout.layers[i].n_experts for i, n in routed.items())
    return ModelFacts(experts=layout.uniform_experts, experts_per_tok=layout.experts_per_tok,
                      moe_layers=sum(not x.is_mtp for x in layout.moe_layers), total_params=total,
                      active_params=active, cache=cache_dims(layout))


def cache_dims(layout: GlmLayout) -> CacheDims:
    """The KV-cache widths of a config (what the converter writes as `attention.key_length` and indexer keys)."""
    return CacheDims(n_layers=layout.n_layers, n_mtp=layout.n_mtp,
                     mla_width=layout.kv_lora_rank + layout.qk_rope_head_dim,
                     n_full_indexer=sum(x.indexer == "full" for x in layout.layers if not x.is_mtp),
                     indexer_width=layout.index_head_dim,
                     max_context=layout.config.get("max_position_embeddings"))


def checkpoint_storage(ckpt: Path) -> str:
    """How the checkpoint stores its weights, from its config."""
    cfg = read_json(ckpt / "config.json") or {}
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        return "safetensors, block-FP8 (128x128 scales) as the FP8 release"
    if qc:
        return f"safetensors, {qc.get('quant_method')} {qc.get('quant_algo') or qc.get('format') or ''}".rstrip()
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype"))
    return f"safetensors, {_DTYPES.get(dtype, dtype)}"


def nvfp4_facts(ckpt: Path) -> Nvfp4Facts | None:
    m = read_json(ckpt / NVFP4_MANIFEST)
    if not m:
        return None
    return Nvfp4Facts(format=m["format"], experts_nvfp4=int(m["experts_nvfp4"]),
                      quantized_layers=tuple(int(x) for x in m["quantized_layers"]))


def weight_files(ckpt: Path) -> list[Path]:
    """The checkpoint's weight shards (its index's files, or the single file), not statistics kept beside them."""
    index = read_json(ckpt / INDEX_NAME)
    names = sorted(set(index["weight_map"].values())) if index else [SINGLE_NAME]
    return [ckpt / n for n in names]
