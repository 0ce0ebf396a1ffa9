"""REAP pruning: choose experts from saved statistics, then rewrite the checkpoint streaming.

Plan (from the layout and the statistics, no tensor data): per MoE layer (MTP block included, with its own
statistics) the experts to keep, best score first, stored in ascending original order. `uniform` keeps the same
count in every layer (what llama.cpp and transformers need); `global` ranks experts of all layers together on
scores normalized per layer (each layer's scores divided by their sum) and writes per-layer counts
(`num_routed_experts_per_layer`).

Execute: every tensor is read once and written once with `ShardedWriter`: kept experts renamed 0..N-1, router
rows and `e_score_correction_bias` sliced with the keep-map, everything else copied. A block-FP8 source (the
GLM-5.x FP8 release) stays block-FP8: FP8 codes are copied as stored, each followed by its own `_scale_inv`
(or, with `dequantize`, written as BF16 without scales or `quantization_config`). config.json gets the new
`n_routed_experts` (and per-layer counts), the keep-map goes beside the weights (`reap_keep_map.json`), into the
shards' metadata and (sliced) statistics follow as `reap_stats.safetensors` for later stages (NVFP4 input
scales). The input is only read; the output directory appears atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from glmgguf.checkpoint import open_checkpoint
from glmgguf.choices import REAP_PER_LAYER as PER_LAYER_MODES
from glmgguf.io import ShardedWriter, atomic_dir
from glmgguf.io.fp8 import SCALE_SUFFIX
from glmgguf.layout import GlmLayout, Role, parse_hf_name
from glmgguf.reap.errors import PruneError, RoutingError
from glmgguf.reap.keepmap import KEEP_MAP_NAME, read_keep_map
from glmgguf.reap.routing import RouterSpec
from glmgguf.reap.stats import METRICS, ReapStats

STATS_NAME = "reap_stats.safetensors"


@dataclass
class PrunePlan:
    """Which original experts every MoE layer keeps (ascending ids; position = new id)."""

    keep: dict[int, list[int]]
    source_experts: dict[int, int]
    metric: str
    per_layer: str
    seed: int = 0
    scores: dict[int, list[float]] = field(default_factory=dict, repr=False)

    @property
    def counts(self) -> dict[int, int]:
        return {L: len(ids) for L, ids in self.keep.items()}

    @property
    def uniform_count(self) -> int | None:
        c = set(self.counts.values())
        return c.pop() if len(c) == 1 else None

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "per_layer": self.per_layer,
            "seed": self.seed,
            "source_experts": {str(k): v for k, v in sorted(self.source_experts.items())},
            "kept_experts": {str(k): v for k, v in sorted(self.counts.items())},
            "keep_map": {str(k): v for k, v in sorted(self.keep.items())},
        }

    def describe(self) -> str:
        counts = self.counts
        total_in, total_out = sum(self.source_experts.values()), sum(counts.values())
        lines = [f"REAP plan ({self.metric}, {self.per_layer}): {total_out}/{total_in} experts kept "
                 f"({100 * (1 - total_out / total_in):.1f}% pruned)"]
        for L in sorted(counts):
            lines.append(f"  layer {L}: keep {counts[L]}/{self.source_experts[L]}")
        return "\n".join(lines)


def _keep_count(n: int, keep: int | None, ratio: float | None) -> int:
    if (keep is None) == (ratio is None):
        raise PruneError("give exactly one of --keep N or --ratio R")
    if keep is not None:
        return int(keep)
    if not 0.0 <= float(ratio) < 1.0:
        raise PruneError(f"--ratio is the fraction of experts to prune and must lie in [0, 1): {ratio}")
    return int(round(n * (1.0 - float(ratio))))


def _check_feasible(layout: GlmLayout, layer: int, n_source: int, n_keep: int) -> None:
    k = layout.experts_per_tok
    if n_keep > n_source:
        raise PruneError(f"layer {layer}: cannot keep {n_keep} of {n_source} experts")
    if n_keep < k:
        raise PruneError(f"layer {layer}: keeping {n_keep} experts is fewer than num_experts_per_tok={k}")
    try:
        RouterSpec.from_config(layout.config, n_keep).check()
    except RoutingError as e:
        raise PruneError(f"layer {layer}: keeping {n_keep} experts breaks the router: {e}") from None


def _top_in_groups(score: torch.Tensor, n_keep: int, n_group: int) -> list[int]:
    """The best `n_keep` experts, the same number from each of the router's contiguous groups."""
    n = score.numel()
    per_group, size = n_keep // n_group, n // n_group
    chosen: list[int] = []
    for g in range(n_group):
        s = score[g * size:(g + 1) * size]
        order = torch.argsort(s, descending=True, stable=True)[:per_group]
        chosen.extend((order + g * size).tolist())
    return sorted(chosen)


def plan_prune(layout: GlmLayout, stats: ReapStats, keep: int | None = None, ratio: float | None = None,
               per_layer: str = "uniform", metric: str = "reap", seed: int = 0) -> PrunePlan:
    """Choose the experts to keep (raises PruneError / StatsError for plans that cannot work)."""
    if metric not in METRICS:
        raise PruneError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if per_layer not in PER_LAYER_MODES:
        raise PruneError(f"--per-layer must be one of {', '.join(PER_LAYER_MODES)}")
    stats.check_model(layout, "the checkpoint")
    moe = layout.moe_layers
    if not moe:
        raise PruneError("the model has no MoE layers")
    source = {x.index: x.n_experts for x in moe}
    scores = {L: stats.score(L, metric, seed) for L in source}
    g = layout.n_group
    if per_layer == "uniform":
        if len(set(source.values())) != 1:
            raise PruneError("--per-layer uniform needs a model with one expert count in every layer")
        n = next(iter(source.values()))
        n_keep = _keep_count(n, keep, ratio)
        for L in source:
            _check_feasible(layout, L, n, n_keep)
        chosen = {L: _top_in_groups(scores[L], n_keep, g) for L in source}
    else:
        if g > 1:
            raise PruneError("--per-layer global needs n_group = 1 (expert groups must stay equal in size)")
        total = sum(_keep_count(n, keep, ratio) for n in source.values())
        k = layout.experts_per_tok
        if total < k * len(source):
            raise PruneError(f"keeping {total} experts in all leaves fewer than num_experts_per_tok={k} per layer")
        chosen_sets: dict[int, set[int]] = {}
        ranked: list[tuple[float, int, int]] = []
        for L, s in scores.items():
            order = torch.argsort(s, descending=True, stable=True).tolist()
            chosen_sets[L] = set(order[:k])  # every layer keeps at least top-k experts
            norm = s.double() / s.double().sum().clamp_min(1e-300)
            ranked.extend((float(norm[e]), L, e) for e in order[k:])
        ranked.sort(key=lambda t: (-t[0], t[1], t[2]))
        for _, L, e in ranked[: total - k * len(source)]:
            chosen_sets[L].add(e)
        chosen = {L: sorted(ids) for L, ids in chosen_sets.items()}
        for L, ids in chosen.items():
            _check_feasible(layout, L, source[L], len(ids))
    return PrunePlan(chosen, source, metric, per_layer, seed, {L: scores[L].tolist() for L in source})


# ---------------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------------

class Read(StrEnum):
    """What a planned write reads from its source tensor."""

    STORED = "stored"  # the tensor as stored (FP8 codes for a block-FP8 weight)
    SCALE = "scale"  # the block scales (`_scale_inv`) of a block-FP8 weight
    VALUE = "value"  # the dequantized value (a block-FP8 weight written in another dtype)


@dataclass(frozen=True)
class PlannedWrite:
    out: str
    src: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: tuple[int, ...] | None = None  # keep these rows (router weight / bias)
    read: Read = Read.STORED

    def tensor(self, reader) -> torch.Tensor:
        match self.read:
            case Read.SCALE:
                t = reader.get_scale(self.src)
            case Read.VALUE:
                t = reader.get(self.src).to(self.dtype)
            case _:
                t = reader.get_stored(self.src)
        return t if self.rows is None else t[torch.tensor(self.rows, dtype=torch.long)].contiguous()


def _tensor_writes(reader, name: str, out: str, dequantize: torch.dtype | None) -> list[PlannedWrite]:
    """The write(s) of one source tensor under a new name: a block-FP8 weight keeps its codes and is followed by
    its own scales, unless `dequantize` asks for its value in that dtype."""
    info = reader.info(name)
    if not reader.is_fp8(name):
        return [PlannedWrite(out, name, info.shape, info.torch_dtype)]
    if dequantize is not None:
        return [PlannedWrite(out, name, info.shape, dequantize, read=Read.VALUE)]
    scale = reader.scales[name]
    return [PlannedWrite(out, name, info.shape, info.torch_dtype),
            PlannedWrite(out + SCALE_SUFFIX, name, scale.shape, torch.float32, read=Read.SCALE)]


def plan_writes(reader, layout: GlmLayout, plan: PrunePlan, dequantize: torch.dtype | None = None
                ) -> list[PlannedWrite]:
    """Every output tensor in input order: kept experts renamed (FP8 scales with them), router rows and bias
    sliced; block-FP8 weights stay block-FP8 unless `dequantize` names the dtype to write them in."""
    new_id = {L: {old: new for new, old in enumerate(ids)} for L, ids in plan.keep.items()}
    writes: list[PlannedWrite] = []
    for name in reader.names():
        info = reader.info(name)
        p = parse_hf_name(name)
        layer = p.layer if p is not None else None
        if p is not None and layer in plan.keep and p.expert is not None:
            if p.expert in new_id[layer]:
                out = name.replace(f".experts.{p.expert}.", f".experts.{new_id[layer][p.expert]}.", 1)
                writes += _tensor_writes(reader, name, out, dequantize)
        elif p is not None and layer in plan.keep and p.rule.role in (Role.ROUTER, Role.ROUTER_BIAS):
            rows = tuple(plan.keep[layer])
            if info.shape[0] != plan.source_experts[layer]:
                raise PruneError(f"{name} has {info.shape[0]} rows, the layer {plan.source_experts[layer]} experts")
            writes.append(PlannedWrite(name, name, (len(rows), *info.shape[1:]), info.torch_dtype, rows))
        else:
            writes += _tensor_writes(reader, name, name, dequantize)
    return writes


def pruned_config(cfg: dict, layout: GlmLayout, plan: PrunePlan, dequantized: bool = False) -> dict:
    """The source config with the new expert counts and the REAP record (no `quantization_config` once the
    block-FP8 weights were written dequantized; else it stays: it names no expert)."""
    out = json.loads(json.dumps(cfg))
    if dequantized:
        out.pop("quantization_config", None)
    counts = plan.counts
    uniform = plan.uniform_count
    out["n_routed_experts"] = uniform if uniform is not None else max(counts.values())
    if uniform is None:
        out["num_routed_experts_per_layer"] = [counts.get(x.index, 0) for x in layout.layers]
    else:
        out.pop("num_routed_experts_per_layer", None)
    out["reap"] = {"keep_map": KEEP_MAP_NAME, "metric": plan.metric, "per_layer": plan.per_layer,
                   "source_n_routed_experts": cfg.get("n_routed_experts")}
    return out


def load_keep_map(model_dir: str | os.PathLike) -> dict[int, list[int]]:
    """The keep-map of a pruned checkpoint (MoE layer -> original expert ids, position = new id), e.g. to slice
    an imatrix of the unpruned model (`glmgguf imatrix slice`)."""
    if not Path(model_dir).is_dir():
        raise PruneError(f"{model_dir} is not a pruned checkpoint directory")
    return read_keep_map(model_dir).keep


@dataclass
class PruneResult:
    out: Path
    plan: PrunePlan
    n_tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float


def _max_shard_bytes(reader) -> int:
    sizes = [os.path.getsize(p) for p in {i.shard for i in reader.tensors.values()}]
    return max(sizes) if sizes else 5 * 1024**3


def prune_checkpoint(src: str | os.PathLike, plan: PrunePlan, out: str | os.PathLike, *, force: bool = False,
                     stats: ReapStats | None = None, max_shard_bytes: int | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     dequantize: torch.dtype | None = None) -> PruneResult:
    """Write the pruned checkpoint `out` (see the module docstring); `progress(done, total)` per tensor.

    A block-FP8 source stays block-FP8 (each kept expert with its own scales) unless `dequantize` names the
    dtype its FP8 weights are written in."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise PruneError("the output directory must differ from the input (the input is never modified)")
    ckpt = open_checkpoint(src)
    reader, layout = ckpt.reader, ckpt.layout
    if set(plan.keep) != {x.index for x in layout.moe_layers}:
        raise PruneError("the plan does not cover this checkpoint's MoE layers")
    dequantize = dequantize if reader.fp8 is not None else None
    writes = plan_writes(reader, layout, plan, dequantize)
    keep_json = plan.to_json()
    metadata = {"reap_keep_map": json.dumps(keep_json["keep_map"], separators=(",", ":"))}
    limit = max_shard_bytes or _max_shard_bytes(reader)
    bytes_in = reader.total_bytes()
    with atomic_dir(out, force=force, inputs=[src]) as tmp:
        with ShardedWriter(tmp, [(w.out, w.shape, w.dtype) for w in writes], max_shard_bytes=limit,
                           metadata=metadata) as writer:
            for i, w in enumerate(writes):
                if w.read is Read.STORED and w.rows is None:  # copied as stored, a piece at a time
                    writer.add_bytes(w.out, reader.stored_chunks(reader.info(w.src)))
                else:
                    writer.add(w.out, w.tensor(reader))
                if progress:
                    progress(i + 1, len(writes))
        cfg = pruned_config(reader.config, layout, plan, dequantize is not None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / KEEP_MAP_NAME).write_text(json.dumps(keep_json, indent=1) + "\n")
        for f in reader.extra_files():
            if f.name in (KEEP_MAP_NAME, STATS_NAME, STATS_NAME.replace(".safetensors", ".json")):
                continue
            shutil.copy2(f, tmp / f.name)
        if stats is not None:
            stats.select(plan.keep).save(tmp / STATS_NAME, force=True)
        bytes_out = writer.total_size
    return PruneResult(out, plan, len(writes), bytes_in, bytes_out, time.perf_counter() - t0)
