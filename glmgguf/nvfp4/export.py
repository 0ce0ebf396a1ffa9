"""NVFP4 export of a GLM-5.x checkpoint for vLLM / SGLang: ModelOpt's layout or compressed-tensors'.

Plan (headers, config and calibration statistics only, no tensor data): the routed experts of every MoE layer
(the MTP block included) become NVFP4, everything else is copied unchanged (BF16) and listed in the exclude list;
per expert the activation amaxes come from REAP observe statistics (`input_amax` for gate/up, `down_input_amax`
for down), an expert calibration never routed to getting its layer's max. Bad input (missing or foreign
statistics, an already-quantized source, dimensions NVFP4 cannot take) fails here, before any work. A block-FP8
source (the GLM-5.x FP8 release) is read dequantized: its experts are quantized from the dequantized values and
its other FP8 weights are written as BF16, like every tensor the export keeps unquantized.

Execute: one tensor (one expert: gate, up, down) at a time, read ahead on a background thread, quantized with
`glmgguf.nvfp4.quant` on `device` (the same torch code on CPU and CUDA, so the bytes are the same), streamed into
`ShardedWriter` shards with an index; the output directory appears atomically.

Layouts per expert projection `model.layers.L.mlp.experts.E.{gate,up,down}_proj`:
  modelopt            weight u8 [N, K/2], weight_scale e4m3 [N, K/16], weight_scale_2 f32 [], input_scale f32 []
                      (+ hf_quant_config.json and config.json quantization_config with quant_method "modelopt")
  compressed-tensors  weight_packed u8 [N, K/2], weight_scale e4m3 [N, K/16], weight_global_scale f32 [1],
                      input_global_scale f32 [1], global scales reciprocal (6*448/amax, llm-compressor's formula)
                      (config.json quantization_config with format "nvfp4-pack-quantized")
gate_proj and up_proj of one expert share the weight global scale (max of the two amaxes) and the input scale:
serving engines fuse them into one GEMM with one scale.
"""

from __future__ import annotations

import bisect
import fnmatch
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmgguf import __version__
from glmgguf.checkpoint import GlmCheckpoint, open_checkpoint
from glmgguf.errors import GlmggufError
from glmgguf.io import ShardedWriter, atomic_dir
from glmgguf.io.writer import PlanEntry
from glmgguf.layout import GlmLayout, Role, parse_hf_name
from glmgguf.nvfp4 import quant as nq

FORMATS = ("modelopt", "compressed-tensors")
HF_QUANT_CONFIG = "hf_quant_config.json"
MANIFEST_NAME = "nvfp4_export.json"
PROJS = ("gate_proj", "up_proj", "down_proj")
MODELOPT_VERSION = "0.47.0"  # the ModelOpt release whose format (and quantizer) this export reproduces
DEFAULT_STATS_NAME = "reap_stats.safetensors"  # what `reap prune` leaves beside a pruned checkpoint
_EXPERT_ROLES = {Role.EXPERT_GATE: "gate_proj", Role.EXPERT_UP: "up_proj", Role.EXPERT_DOWN: "down_proj"}

# Names of the four tensors of one quantized projection: packed weight, block scales, weight global, input global.
TENSOR_SUFFIXES = {
    "modelopt": ("weight", "weight_scale", "weight_scale_2", "input_scale"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"),
}


class ExportError(GlmggufError, ValueError):
    """The export cannot be planned or run with these inputs."""


# ----------------------------------------------------------------------------------------------------------------
# Calibration: per-expert activation amaxes
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class InputAmax:
    """Per MoE layer and expert: the activation amax of gate/up's input and of down's input (fallbacks applied)."""

    gate_up: dict[int, torch.Tensor]  # layer -> float32 [n_experts]
    down: dict[int, torch.Tensor]
    fallbacks: dict[int, list[int]]  # layer -> experts that got the layer's max (never routed / no finite amax)

    @property
    def n_fallback(self) -> int:
        return sum(len(v) for v in self.fallbacks.values())


def _layer_amax(values: torch.Tensor, routed: torch.Tensor, layer: int, what: str) -> tuple[torch.Tensor, set[int]]:
    values = values.float()
    ok = routed & torch.isfinite(values) & (values > 0)
    if not bool(ok.any()):
        raise ExportError(f"statistics of layer {layer} have no usable {what} (no expert was routed to in "
                          "calibration): observe more tokens")
    fill = values[ok].max()
    out = torch.where(ok, values, fill)
    if float(fill) / nq.GLOBAL_DENOM == 0.0:
        raise ExportError(f"layer {layer}: {what} {float(fill)} is too small for an NVFP4 input scale")
    return out, {int(i) for i in (~ok).nonzero().flatten()}


def input_amax_from_stats(stats, layout: GlmLayout, layers: Sequence[int]) -> InputAmax:
    """Per-expert input amaxes of `layers` from REAP statistics (`glmgguf.reap.stats.ReapStats`).

    Raises ExportError unless the statistics were observed on a model with this layout's MoE layers (hidden size,
    layer count, each quantized layer's expert count).
    """
    from glmgguf.reap.stats import model_fingerprint

    want, have = model_fingerprint(layout), stats.fingerprint
    if have.get("hidden_size") != want["hidden_size"] or have.get("n_layers") != want["n_layers"]:
        raise ExportError(f"calibration statistics are from another model (hidden {have.get('hidden_size')}, "
                          f"{have.get('n_layers')} layers) than the checkpoint (hidden {want['hidden_size']}, "
                          f"{want['n_layers']} layers)")
    out = InputAmax({}, {}, {})
    for L in layers:
        n = want["experts"][str(L)]
        if L not in stats.layers:
            raise ExportError(f"calibration statistics lack MoE layer {L}"
                              + (" (the MTP block: observe without --no-mtp, or --exclude its experts)"
                                 if L >= layout.n_layers else ""))
        t = stats.layers[L]
        if t["count"].numel() != n:
            raise ExportError(f"calibration statistics are from another model: layer {L} has {n} experts in the "
                              f"checkpoint, {t['count'].numel()} in the statistics")
        routed = t["count"] > 0
        out.gate_up[L], fb1 = _layer_amax(t["input_amax"], routed, L, "input_amax")
        out.down[L], fb2 = _layer_amax(t["down_input_amax"], routed, L, "down_input_amax")
        if fb1 | fb2:
            out.fallbacks[L] = sorted(fb1 | fb2)
    return out


def load_stats(paths: Sequence[str | os.PathLike]):
    """Load (and merge) REAP statistics files."""
    from glmgguf.reap.stats import ReapStats

    for p in paths:
        if not Path(p).is_file():
            raise ExportError(f"calibration statistics {p} not found")
    return ReapStats.load_many(list(paths))


# ----------------------------------------------------------------------------------------------------------------
# Exclude lists
# ----------------------------------------------------------------------------------------------------------------

def summarize_exclude(unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """ModelOpt's exclude-list summary: each unquantized module is covered by the shortest dot-boundary prefix
    wildcard `P*` that no quantized module name starts with, else `P.*` (when only names like `P0...` are
    quantized), else its own name."""
    q = sorted(set(quantized))
    qset = set(q)

    def some_start_with(prefix: str) -> bool:
        i = bisect.bisect_left(q, prefix)
        return i < len(q) and q[i].startswith(prefix)

    out: set[str] = set()
    for m in sorted(set(unquantized)):
        for i, ch in enumerate(m):
            if ch != ".":
                continue
            p = m[:i]
            if not some_start_with(p):
                out.add(p + "*")
                break
            if p not in qset and not some_start_with(p + "."):
                out.add(p + ".*")  # ModelOpt 0.47 writes only `P.*` of the pair `P`, `P.*`
                break
        else:
            out.add(m)
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertStep:
    layer: int
    expert: int
    sources: dict[str, str]  # proj -> source tensor name

    def module(self, proj: str) -> str:
        return f"model.layers.{self.layer}.mlp.experts.{self.expert}.{proj}"


Step = str | ExpertStep  # a tensor name to copy, or one expert to quantize


@dataclass
class ExportPlan:
    checkpoint: GlmCheckpoint = field(repr=False)
    fmt: str
    steps: list[Step]
    entries: list[PlanEntry]
    quantized_layers: list[int]
    bf16_expert_layers: list[int]  # MoE layers whose experts --exclude keeps in BF16
    modules_nvfp4: list[str]
    modules_bf16: list[str]
    ignore: list[str]  # what the config lists (ModelOpt wildcards, or compressed-tensors module names)
    amax: InputAmax
    stats_paths: list[Path]

    @property
    def src(self) -> Path:
        return self.checkpoint.reader.root

    @property
    def layout(self) -> GlmLayout:
        return self.checkpoint.layout

    @property
    def bytes_in(self) -> int:
        return self.checkpoint.reader.total_bytes()

    @property
    def expert_bytes_in(self) -> int:
        r = self.checkpoint.reader
        return sum(r.info(n).nbytes for s in self.steps if isinstance(s, ExpertStep) for n in s.sources.values())

    @property
    def bytes_out(self) -> int:
        size = {dt: torch.empty((), dtype=dt).element_size() for dt in {dt for _, _, dt in self.entries}}
        return sum(math.prod(shape) * size[dt] for _, shape, dt in self.entries)

    def describe(self) -> str:
        n_exp = sum(isinstance(s, ExpertStep) for s in self.steps)
        lines = [
            f"NVFP4 export ({self.fmt}) of {self.src}",
            f"  {n_exp} experts in NVFP4 over {len(self.quantized_layers)} MoE layers "
            f"({', '.join(map(str, self.quantized_layers))}), {len(self.modules_nvfp4)} projections",
            f"  {len(self.modules_bf16)} other modules kept as they are; exclude list of {len(self.ignore)} entries",
            f"  {self.bytes_in / 2**20:.1f} MiB in ({self.expert_bytes_in / 2**20:.1f} MiB of experts) -> "
            f"{self.bytes_out / 2**20:.1f} MiB out",
            f"  input scales from {', '.join(p.name for p in self.stats_paths)}: "
            f"{self.amax.n_fallback} expert(s) never routed in calibration got their layer's max"
            + (" (" + "; ".join(f"layer {L}: {v}" for L, v in sorted(self.amax.fallbacks.items())) + ")"
               if self.amax.fallbacks else ""),
        ]
        if self.bf16_expert_layers:
            lines.append(f"  experts kept in BF16 (--exclude): layers {self.bf16_expert_layers}")
        return "\n".join(lines)


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in name.replace(".", " . ").split())


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def plan_export(src: str | os.PathLike, stats_paths: Sequence[str | os.PathLike] | None = None,
                fmt: str = "modelopt", exclude: Sequence[str] = ()) -> ExportPlan:
    """Plan the export of `src` (see the module docstring); `stats_paths` defaults to SRC/reap_stats.safetensors.

    `exclude` holds fnmatch patterns of module names (`model.layers.78.mlp.experts.*`) whose experts stay BF16;
    an MoE layer's experts are excluded all together or not at all (engines load one scheme per MoE layer).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    root = Path(src)
    try:
        qc = json.loads((root / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        qc = None  # open_checkpoint reports a missing or broken config
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method in ("modelopt", "compressed-tensors") or (root / HF_QUANT_CONFIG).exists():
        raise ExportError(f"{src} is already quantized (it has a {method or 'modelopt'} quantization config)")
    ckpt = open_checkpoint(src)  # reads the block-FP8 release dequantized; refuses other quantization schemes
    reader, layout = ckpt.reader, ckpt.layout
    for dim, what in ((layout.hidden_size, "hidden_size"), (layout.moe_intermediate_size, "moe_intermediate_size")):
        if dim % nq.BLOCK_SIZE:
            raise ExportError(f"{what} {dim} is not a multiple of {nq.BLOCK_SIZE}: experts cannot be NVFP4")
    if stats_paths is None or len(stats_paths) == 0:
        default = reader.root / DEFAULT_STATS_NAME
        if not default.is_file():
            raise ExportError(f"no calibration statistics: pass --calib (REAP observe output); {src} has no "
                              f"{DEFAULT_STATS_NAME}")
        stats_paths = [default]
    stats_paths = [Path(p) for p in stats_paths]
    stats = load_stats(stats_paths)

    experts: dict[tuple[int, int], dict[str, str]] = {}
    for name in reader.names():
        p = parse_hf_name(name)
        if p is not None and p.rule.role in _EXPERT_ROLES:
            experts.setdefault((p.layer, p.expert), {})[_EXPERT_ROLES[p.rule.role]] = name
    excluded_layers: set[int] = set()
    for layer in layout.moe_layers:
        mods = [f"model.layers.{layer.index}.mlp.experts.{e}.{proj}" for e in range(layer.n_experts) for proj in PROJS]
        hit = [any(fnmatch.fnmatchcase(m, pat) for pat in exclude) for m in mods]
        if all(hit):
            excluded_layers.add(layer.index)
        elif any(hit):
            raise ExportError(f"--exclude matches some but not all experts of layer {layer.index}: serving engines "
                              "load one quantization scheme per MoE layer, exclude all of its experts or none")
    quantized_layers = [x.index for x in layout.moe_layers if x.index not in excluded_layers]
    if not quantized_layers:
        raise ExportError("--exclude leaves no expert to quantize")
    amax = input_amax_from_stats(stats, layout, quantized_layers)

    steps: list[Step] = []
    entries: list[PlanEntry] = []
    nvfp4: list[str] = []
    bf16: set[str] = set()
    sfx = TENSOR_SUFFIXES[fmt]
    scalar = () if fmt == "modelopt" else (1,)
    seen: set[tuple[int, int]] = set()
    for name in sorted(reader.names(), key=_natural_key):
        p = parse_hf_name(name)
        key = (p.layer, p.expert) if p is not None and p.rule.role in _EXPERT_ROLES else None
        if key is None or key[0] in excluded_layers:
            steps.append(name)
            info = reader.info(name)
            entries.append((name, info.shape, torch.bfloat16 if reader.is_fp8(name) else info.torch_dtype))
            if len(info.shape) == 2:
                bf16.add(_module(name))
            continue
        if key in seen:
            continue
        seen.add(key)
        step = ExpertStep(key[0], key[1], experts[key])
        steps.append(step)
        for proj in PROJS:
            n, k = reader.info(step.sources[proj]).shape
            mod = step.module(proj)
            nvfp4.append(mod)
            entries += [(f"{mod}.{sfx[0]}", (n, k // 2), torch.uint8),
                        (f"{mod}.{sfx[1]}", (n, k // nq.BLOCK_SIZE), torch.float8_e4m3fn),
                        (f"{mod}.{sfx[2]}", scalar, torch.float32),
                        (f"{mod}.{sfx[3]}", scalar, torch.float32)]
    ignore = summarize_exclude(bf16, nvfp4) if fmt == "modelopt" else sorted(bf16)
    if not ignore:
        raise ExportError("the exclude list is empty (SGLang refuses that): nothing is kept unquantized")
    return ExportPlan(ckpt, fmt, steps, entries, quantized_layers, sorted(excluded_layers), nvfp4, sorted(bf16),
                      ignore, amax, stats_paths)


# ----------------------------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------------------------

def hf_quant_config(ignore: list[str]) -> dict:
    """hf_quant_config.json as ModelOpt writes it for NVFP4 (no KV-cache quantization)."""
    return {
        "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": nq.BLOCK_SIZE,
                         "exclude_modules": list(ignore)},
    }


def modelopt_quantization_config(ignore: list[str]) -> dict:
    """config.json `quantization_config`: ModelOpt's conversion of hf_quant_config.json (compressed-tensors-like
    groups, `ignore`, `quant_method: modelopt`) plus `group_size` and `exclude_modules`, which vLLM's and
    SGLang's config.json readers look up directly."""
    gs = nq.BLOCK_SIZE
    return {
        "config_groups": {"group_0": {
            "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
            "targets": ["Linear"],
        }},
        "ignore": list(ignore),
        "quant_algo": "NVFP4",
        "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
        "quant_method": "modelopt",
        "group_size": gs,
        "kv_cache_quant_algo": None,
        "exclude_modules": list(ignore),
    }


def compressed_tensors_quantization_config(ignore: list[str]) -> dict:
    """config.json `quantization_config` of llm-compressor's NVFP4 (W4A4) scheme, `nvfp4-pack-quantized`."""
    args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": nq.BLOCK_SIZE,
            "strategy": "tensor_group", "block_structure": None, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**args, "dynamic": False},
            "input_activations": {**args, "dynamic": "local"},
            "output_activations": None,
            "format": "nvfp4-pack-quantized",
        }},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


# ----------------------------------------------------------------------------------------------------------------
# Execute
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path
    plan: ExportPlan
    n_tensors: int
    bytes_out: int
    seconds: float
    expert_seconds: float  # time inside expert steps (read wait + quantize + write)

    @property
    def expert_gbps(self) -> float:
        return self.plan.expert_bytes_in / max(self.expert_seconds, 1e-9) / 1e9


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ExportError(f"unsupported device {device!r} (cpu or cuda)")
    return dev


def quantize_expert(tensors: dict[str, torch.Tensor], gate_up_amax: torch.Tensor, down_amax: torch.Tensor,
                    fmt: str, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """The four output tensors of each projection of one expert (CPU tensors, in TENSOR_SUFFIXES order)."""
    w = {proj: t.to(device, non_blocking=True) for proj, t in tensors.items()}
    pair_amax = torch.maximum(nq.amax(w["gate_proj"]), nq.amax(w["up_proj"]))
    down_w_amax = nq.amax(w["down_proj"])
    out: dict[str, list[torch.Tensor]] = {}
    for proj in PROJS:
        w_amax = pair_amax if proj != "down_proj" else down_w_amax
        in_amax = (gate_up_amax if proj != "down_proj" else down_amax).to(device)
        q = nq.quantize(w[proj], nq.global_scale(w_amax))
        if fmt == "modelopt":
            s2, s_in = q.weight_scale_2, nq.input_scale(in_amax)
        else:  # reciprocal global scales, computed as llm-compressor does: (6 * 448) / amax
            a = w_amax.float() if float(w_amax) > 0 else torch.ones((), device=device)
            s2, s_in = (nq.GLOBAL_DENOM / a).reshape(1), (nq.GLOBAL_DENOM / in_amax.float()).reshape(1)
        out[proj] = [t.cpu() for t in (q.weight, q.weight_scale, s2, s_in)]
    return out


def _write_configs(plan: ExportPlan, tmp: Path) -> None:
    cfg = dict(plan.checkpoint.reader.config)
    if plan.fmt == "modelopt":
        (tmp / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant_config(plan.ignore), indent=4) + "\n")
        cfg["quantization_config"] = modelopt_quantization_config(plan.ignore)
    else:
        cfg["quantization_config"] = compressed_tensors_quantization_config(plan.ignore)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export_nvfp4(plan: ExportPlan, out: str | os.PathLike, device: str | torch.device = "cpu", force: bool = False,
                 max_shard_bytes: int = 5 * 1024**3, threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write the planned export into `out` (atomically); `progress(bytes_done, bytes_total)` after each step.

    `threads` sets torch's CPU threads for the run (None: leave them as they are). On a CPU that other processes
    keep busy, fewer threads than cores is much faster: the threads of every op wait for each other.
    """
    dev = resolve_device(device)
    out = Path(out)
    if out.resolve() == plan.src.resolve():
        raise ExportError("the output directory is the source checkpoint")
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _export(plan, out, dev, force, max_shard_bytes, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _export(plan: ExportPlan, out: Path, dev: torch.device, force: bool, max_shard_bytes: int,
            progress: Callable[[int, int], None] | None) -> ExportResult:
    reader = plan.checkpoint.reader
    t0 = time.perf_counter()
    expert_s = 0.0
    total = plan.bytes_in
    done = 0

    def load(step: Step):
        if isinstance(step, ExpertStep):
            return {proj: reader.get(name) for proj, name in step.sources.items()}
        return reader.get(step).to(torch.bfloat16) if reader.is_fp8(step) else reader.get(step)

    def step_bytes(step: Step) -> int:
        names = step.sources.values() if isinstance(step, ExpertStep) else [step]
        return sum(reader.info(n).nbytes for n in names)

    with atomic_dir(out, force=force, inputs=[plan.src]) as tmp:
        meta = {"quantization": f"nvfp4-{plan.fmt}"}
        with ShardedWriter(tmp, plan.entries, max_shard_bytes=max_shard_bytes, metadata=meta) as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="nvfp4-read") as pool:
            sfx = TENSOR_SUFFIXES[plan.fmt]
            ahead = pool.submit(load, plan.steps[0]) if plan.steps else None
            for i, step in enumerate(plan.steps):
                ts = time.perf_counter()
                data = ahead.result()
                ahead = pool.submit(load, plan.steps[i + 1]) if i + 1 < len(plan.steps) else None
                if isinstance(step, ExpertStep):
                    L, E = step.layer, step.expert
                    try:
                        res = quantize_expert(data, plan.amax.gate_up[L][E], plan.amax.down[L][E], plan.fmt, dev)
                    except nq.Nvfp4Error as e:
                        raise ExportError(f"layer {L} expert {E}: {e}") from None
                    for proj in PROJS:
                        for suffix, t in zip(sfx, res[proj], strict=True):
                            writer.add(f"{step.module(proj)}.{suffix}", t)
                    expert_s += time.perf_counter() - ts
                else:
                    writer.add(step, data)
                del data
                done += step_bytes(step)
                if progress is not None:
                    progress(done, total)
        _write_configs(plan, tmp)
        for f in reader.extra_files():
            if f.name in (HF_QUANT_CONFIG, MANIFEST_NAME):
                continue
            shutil.copy2(f, tmp / f.name)
        seconds = time.perf_counter() - t0
        manifest = {
            "producer": {"name": "glmgguf", "version": __version__},
            "format": plan.fmt,
            "source": str(plan.src),
            "calibration": [str(p) for p in plan.stats_paths],
            "device": str(dev),
            "quantized_layers": plan.quantized_layers,
            "bf16_expert_layers": plan.bf16_expert_layers,
            "experts_nvfp4": sum(isinstance(s, ExpertStep) for s in plan.steps),
            "input_scale_fallbacks": {str(L): v for L, v in sorted(plan.amax.fallbacks.items())},
            "n_input_scale_fallbacks": plan.amax.n_fallback,
            "bytes_in": plan.bytes_in,
            "bytes_out": writer.total_size,
            "seconds": round(seconds, 3),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return ExportResult(out, plan, len(plan.entries), writer.total_size, seconds, expert_s)


# ----------------------------------------------------------------------------------------------------------------
# Reading an export back
# ----------------------------------------------------------------------------------------------------------------

def detect_format(path: str | os.PathLike) -> str:
    cfg = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    method = cfg.get("quant_method")
    if method == "modelopt":
        return "modelopt"
    if method == "compressed-tensors" and cfg.get("format") == "nvfp4-pack-quantized":
        return "compressed-tensors"
    raise ExportError(f"{path} is not an NVFP4 export (quantization_config quant_method {method!r})")


def dequantize_export(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      force: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint from an NVFP4 export: every quantized projection dequantized to
    `dtype` (`E2M1 * weight_scale * weight_scale_2`), everything else copied, the quantization config removed."""
    from glmgguf.io import CheckpointReader

    fmt = detect_format(src)
    sfx = TENSOR_SUFFIXES[fmt]
    reader = CheckpointReader(src)
    modules = sorted({n[: -len(sfx[0]) - 1] for n in reader.names() if n.endswith("." + sfx[0])
                      and reader.info(n).dtype == "U8"})
    quant_names = {f"{m}.{s}" for m in modules for s in sfx}
    plan: list[PlanEntry] = []
    for name in sorted(reader.names(), key=_natural_key):
        if name not in quant_names:
            info = reader.info(name)
            plan.append((name, info.shape, info.torch_dtype))
    for m in modules:
        n, half = reader.info(f"{m}.{sfx[0]}").shape
        plan.append((f"{m}.weight", (n, half * 2), dtype))
    deq = {f"{m}.weight": m for m in modules}
    with atomic_dir(out, force=force, inputs=[src]) as tmp:
        with ShardedWriter(tmp, plan) as writer:
            for name, _, _ in plan:
                m = deq.get(name)
                if m is None:
                    writer.add(name, reader.get(name))
                    continue
                s2 = reader.get(f"{m}.{sfx[2]}").float()
                if fmt == "compressed-tensors":
                    s2 = 1.0 / s2
                writer.add(name, nq.dequantize(reader.get(f"{m}.{sfx[0]}"), reader.get(f"{m}.{sfx[1]}"), s2, dtype))
        cfg = dict(reader.config)
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for f in reader.extra_files():
            if f.name not in (HF_QUANT_CONFIG, MANIFEST_NAME):
                shutil.copy2(f, tmp / f.name)
    return Path(out)
