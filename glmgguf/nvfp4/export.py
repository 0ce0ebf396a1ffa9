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

The formats (tensor names, scale conventions, config files) are `glmgguf.nvfp4.formats` objects. gate_proj and
up_proj of one expert share the weight global scale (max of the two amaxes) and the input scale: serving engines
fuse them into one GEMM with one scale.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmgguf import __version__
from glmgguf.checkpoint import GlmCheckpoint, open_checkpoint
from glmgguf.choices import usable_device
from glmgguf.io import CheckpointReader, ShardedWriter, atomic_dir
from glmgguf.io.dequantized import copy_extra_files, natural_key
from glmgguf.io.writer import PlanEntry, plan_bytes
from glmgguf.layout import GlmLayout, Role, parse_hf_name
from glmgguf.nvfp4 import quant as nq
from glmgguf.nvfp4.calibration import InputAmax, input_amax_from_stats, load_stats
from glmgguf.nvfp4.errors import ExportError
from glmgguf.nvfp4.formats import FORMATS, HF_QUANT_CONFIG, Nvfp4Format, get_format

MANIFEST_NAME = "nvfp4_export.json"
PROJS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_STATS_NAME = "reap_stats.safetensors"  # what `reap prune` leaves beside a pruned checkpoint
_EXPERT_ROLES = {Role.EXPERT_GATE: "gate_proj", Role.EXPERT_UP: "up_proj", Role.EXPERT_DOWN: "down_proj"}
KEPT_FILES = (HF_QUANT_CONFIG, MANIFEST_NAME)  # a source's files the output does not copy (written anew)


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
    format: Nvfp4Format
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
        return plan_bytes(self.entries)

    def describe(self) -> str:
        n_exp = sum(isinstance(s, ExpertStep) for s in self.steps)
        lines = [
            f"NVFP4 export ({self.format.name}) of {self.src}",
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


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _open_source(src: str | os.PathLike) -> GlmCheckpoint:
    """The source checkpoint, refused when already quantized or when its dimensions cannot be NVFP4."""
    root = Path(src)
    try:
        qc = json.loads((root / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        qc = None  # open_checkpoint reports a missing or broken config
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method in FORMATS or (root / HF_QUANT_CONFIG).exists():
        raise ExportError(f"{src} is already quantized (it has a {method or 'modelopt'} quantization config)")
    ckpt = open_checkpoint(src)  # reads the block-FP8 release dequantized; refuses other quantization schemes
    layout = ckpt.layout
    for dim, what in ((layout.hidden_size, "hidden_size"), (layout.moe_intermediate_size, "moe_intermediate_size")):
        if dim % nq.BLOCK_SIZE:
            raise ExportError(f"{what} {dim} is not a multiple of {nq.BLOCK_SIZE}: experts cannot be NVFP4")
    return ckpt


def _stats_paths(reader: CheckpointReader, src: str | os.PathLike,
                 given: Sequence[str | os.PathLike] | None) -> list[Path]:
    if given:
        return [Path(p) for p in given]
    default = reader.root / DEFAULT_STATS_NAME
    if not default.is_file():
        raise ExportError(f"no calibration statistics: pass --calib (REAP observe output); {src} has no "
                          f"{DEFAULT_STATS_NAME}")
    return [default]


def _excluded_layers(layout: GlmLayout, exclude: Sequence[str]) -> set[int]:
    """MoE layers whose experts all match an --exclude pattern (some but not all: refused)."""
    out: set[int] = set()
    for layer in layout.moe_layers:
        mods = [f"model.layers.{layer.index}.mlp.experts.{e}.{proj}" for e in range(layer.n_experts) for proj in PROJS]
        hit = [any(fnmatch.fnmatchcase(m, pat) for pat in exclude) for m in mods]
        if all(hit):
            out.add(layer.index)
        elif any(hit):
            raise ExportError(f"--exclude matches some but not all experts of layer {layer.index}: serving engines "
                              "load one quantization scheme per MoE layer, exclude all of its experts or none")
    return out


def _expert_sources(reader: CheckpointReader) -> dict[tuple[int, int], dict[str, str]]:
    """(layer, expert) -> proj -> source tensor name."""
    experts: dict[tuple[int, int], dict[str, str]] = {}
    for name in reader.names():
        p = parse_hf_name(name)
        if p is not None and p.rule.role in _EXPERT_ROLES:
            experts.setdefault((p.layer, p.expert), {})[_EXPERT_ROLES[p.rule.role]] = name
    return experts


def _expert_entries(step: ExpertStep, reader: CheckpointReader, fmt: Nvfp4Format) -> list[PlanEntry]:
    """The four output tensors of each projection of one expert."""
    sfx = fmt.suffixes
    entries: list[PlanEntry] = []
    for proj in PROJS:
        n, k = reader.info(step.sources[proj]).shape
        mod = step.module(proj)
        entries += [(f"{mod}.{sfx[0]}", (n, k // 2), torch.uint8),
                    (f"{mod}.{sfx[1]}", (n, k // nq.BLOCK_SIZE), torch.float8_e4m3fn),
                    (f"{mod}.{sfx[2]}", fmt.scalar_shape, torch.float32),
                    (f"{mod}.{sfx[3]}", fmt.scalar_shape, torch.float32)]
    return entries


def plan_export(src: str | os.PathLike, stats_paths: Sequence[str | os.PathLike] | None = None,
                fmt: str = "modelopt", exclude: Sequence[str] = ()) -> ExportPlan:
    """Plan the export of `src` (see the module docstring); `stats_paths` defaults to SRC/reap_stats.safetensors.

    `exclude` holds fnmatch patterns of module names (`model.layers.78.mlp.experts.*`) whose experts stay BF16;
    an MoE layer's experts are excluded all together or not at all (engines load one scheme per MoE layer).
    """
    form = get_format(fmt)
    ckpt = _open_source(src)
    reader, layout = ckpt.reader, ckpt.layout
    stats_paths = _stats_paths(reader, src, stats_paths)
    stats = load_stats(stats_paths)
    excluded = _excluded_layers(layout, exclude)
    quantized_layers = [x.index for x in layout.moe_layers if x.index not in excluded]
    if not quantized_layers:
        raise ExportError("--exclude leaves no expert to quantize")
    amax = input_amax_from_stats(stats, layout, quantized_layers)
    experts = _expert_sources(reader)
    steps: list[Step] = []
    entries: list[PlanEntry] = []
    bf16: set[str] = set()
    seen: set[tuple[int, int]] = set()
    for name in sorted(reader.names(), key=natural_key):
        p = parse_hf_name(name)
        key = (p.layer, p.expert) if p is not None and p.rule.role in _EXPERT_ROLES else None
        if key is None or key[0] in excluded:
            steps.append(name)
            info = reader.info(name)
            entries.append((name, info.shape, torch.bfloat16 if reader.is_fp8(name) else info.torch_dtype))
            if len(info.shape) == 2:
                bf16.add(_module(name))
        elif key not in seen:
            seen.add(key)
            steps.append(ExpertStep(key[0], key[1], experts[key]))
            entries += _expert_entries(steps[-1], reader, form)
    nvfp4 = [s.module(proj) for s in steps if isinstance(s, ExpertStep) for proj in PROJS]
    ignore = form.ignore_list(bf16, nvfp4)
    if not ignore:
        raise ExportError("the exclude list is empty (SGLang refuses that): nothing is kept unquantized")
    return ExportPlan(ckpt, form, steps, entries, quantized_layers, sorted(excluded), nvfp4, sorted(bf16),
                      ignore, amax, stats_paths)


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
    return usable_device(device, ExportError)


def quantize_expert(tensors: dict[str, torch.Tensor], gate_up_amax: torch.Tensor, down_amax: torch.Tensor,
                    fmt: Nvfp4Format, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """The four output tensors of each projection of one expert (CPU tensors, in `fmt.suffixes` order)."""
    w = {proj: t.to(device, non_blocking=True) for proj, t in tensors.items()}
    pair_amax = torch.maximum(nq.amax(w["gate_proj"]), nq.amax(w["up_proj"]))
    down_w_amax = nq.amax(w["down_proj"])
    out: dict[str, list[torch.Tensor]] = {}
    for proj in PROJS:
        w_amax = pair_amax if proj != "down_proj" else down_w_amax
        in_amax = (gate_up_amax if proj != "down_proj" else down_amax).to(device)
        q = nq.quantize(w[proj], nq.global_scale(w_amax))
        s2, s_in = fmt.global_scales(q, w_amax, in_amax, device)
        out[proj] = [t.cpu() for t in (q.weight, q.weight_scale, s2, s_in)]
    return out


def write_configs(fmt: Nvfp4Format, config: dict, ignore: list[str], out: Path) -> None:
    """config.json with the format's quantization_config, and the format's other config files."""
    for name, doc in fmt.config_files(ignore).items():
        (out / name).write_text(json.dumps(doc, indent=4) + "\n")
    cfg = {**config, "quantization_config": fmt.quantization_config(ignore)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


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


class _StepRunner:
    """Reads the plan's steps one ahead on a background thread and writes each one's output tensors."""

    def __init__(self, plan: ExportPlan, writer: ShardedWriter, device: torch.device):
        self.plan, self.writer, self.device = plan, writer, device
        self.reader = plan.checkpoint.reader
        self.expert_seconds = 0.0

    def load(self, step: Step):
        """An expert's weights, a block-FP8 weight as BF16, or (any other tensor, copied as stored) a lazy reader
        of its bytes: GLM-5.2's embedding is 1.9 GB, never held whole."""
        if isinstance(step, ExpertStep):
            return {proj: self.reader.get(name) for proj, name in step.sources.items()}
        if self.reader.is_fp8(step):
            return self.reader.get(step).to(torch.bfloat16)
        return self.reader.stored_chunks(self.reader.info(step))

    def step_bytes(self, step: Step) -> int:
        names = step.sources.values() if isinstance(step, ExpertStep) else [step]
        return sum(self.reader.info(n).nbytes for n in names)

    def write(self, step: Step, data) -> None:
        if not isinstance(step, ExpertStep):
            if isinstance(data, torch.Tensor):
                self.writer.add(step, data)
            else:
                self.writer.add_bytes(step, data)
            return
        ts = time.perf_counter()
        L, E, fmt = step.layer, step.expert, self.plan.format
        try:
            res = quantize_expert(data, self.plan.amax.gate_up[L][E], self.plan.amax.down[L][E], fmt, self.device)
        except nq.Nvfp4Error as e:
            raise ExportError(f"layer {L} expert {E}: {e}") from None
        for proj in PROJS:
            for suffix, t in zip(fmt.suffixes, res[proj], strict=True):
                self.writer.add(f"{step.module(proj)}.{suffix}", t)
        self.expert_seconds += time.perf_counter() - ts

    def run(self, progress: Callable[[int, int], None] | None) -> None:
        steps, done = self.plan.steps, 0
        with ThreadPoolExecutor(1, thread_name_prefix="nvfp4-read") as pool:
            ahead = pool.submit(self.load, steps[0]) if steps else None
            for i, step in enumerate(steps):
                ts = time.perf_counter()
                data = ahead.result()
                ahead = pool.submit(self.load, steps[i + 1]) if i + 1 < len(steps) else None
                if isinstance(step, ExpertStep):
                    self.expert_seconds += time.perf_counter() - ts  # the read wait counts for the experts
                self.write(step, data)
                del data
                done += self.step_bytes(step)
                if progress is not None:
                    progress(done, self.plan.bytes_in)


def _manifest(plan: ExportPlan, dev: torch.device, bytes_out: int, seconds: float) -> dict:
    return {
        "producer": {"name": "glmgguf", "version": __version__},
        "format": plan.format.name,
        "source": str(plan.src),
        "calibration": [str(p) for p in plan.stats_paths],
        "device": str(dev),
        "quantized_layers": plan.quantized_layers,
        "bf16_expert_layers": plan.bf16_expert_layers,
        "experts_nvfp4": sum(isinstance(s, ExpertStep) for s in plan.steps),
        "input_scale_fallbacks": {str(L): v for L, v in sorted(plan.amax.fallbacks.items())},
        "n_input_scale_fallbacks": plan.amax.n_fallback,
        "bytes_in": plan.bytes_in,
        "bytes_out": bytes_out,
        "seconds": round(seconds, 3),
    }


def _export(plan: ExportPlan, out: Path, dev: torch.device, force: bool, max_shard_bytes: int,
            progress: Callable[[int, int], None] | None) -> ExportResult:
    reader = plan.checkpoint.reader
    t0 = time.perf_counter()
    with atomic_dir(out, force=force, inputs=[plan.src]) as tmp:
        meta = {"quantization": f"nvfp4-{plan.format.name}"}
        with ShardedWriter(tmp, plan.entries, max_shard_bytes=max_shard_bytes, metadata=meta) as writer:
            steps = _StepRunner(plan, writer, dev)
            steps.run(progress)
        write_configs(plan.format, reader.config, plan.ignore, tmp)
        copy_extra_files(reader, tmp, skip=KEPT_FILES)
        seconds = time.perf_counter() - t0
        (tmp / MANIFEST_NAME).write_text(json.dumps(_manifest(plan, dev, writer.total_size, seconds), indent=1)
                                         + "\n")
    return ExportResult(out, plan, len(plan.entries), writer.total_size, seconds, steps.expert_seconds)
