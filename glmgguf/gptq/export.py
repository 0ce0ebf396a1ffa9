"""GPTQ W4A16 export of a GLM-5.x checkpoint for vLLM / SGLang.

Plan (headers and config only): the quantized modules are the linear weights the GLM-5.x FP8 release stores as
FP8 (attention projections, the indexer's wq_b, dense MLPs, shared and routed experts, the MTP block's included;
not the indexer's small wk, see `KEPT_BF16`), minus `--exclude` patterns and minus weights whose input width is
not a multiple of the group size (128). Everything else (embeddings, lm_head, norms, router, indexer wk and
weights_proj, eh_proj) is copied unchanged and the config's ignore list names every unquantized linear. A
block-FP8 source is read dequantized (its unquantized FP8 weights are written as BF16).

Execute: `glmgguf.gptq.sequential` quantizes block by block over the calibration text; tensors stream into
`ShardedWriter` shards in plan order (each block's copied tensors, then its quantized modules as they come);
the output directory appears atomically, with a manifest of the settings and of what was rounded to nearest.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmgguf import __version__
from glmgguf.checkpoint import GlmCheckpoint, open_checkpoint
from glmgguf.choices import usable_device
from glmgguf.gptq import quant as gq
from glmgguf.gptq.errors import ExportError
from glmgguf.gptq.formats import GptqFormat, get_format
from glmgguf.gptq.sequential import GptqReport, GptqSettings, run_sequential
from glmgguf.io import CheckpointReader, ShardedWriter, atomic_dir
from glmgguf.io.dequantized import copy_extra_files, natural_key
from glmgguf.io.writer import PlanEntry, plan_bytes
from glmgguf.layout import parse_hf_name, released_as_fp8

MANIFEST_NAME = "gptq_export.json"
KEPT_FILES = ("quantize_config.json", "hf_quant_config.json", MANIFEST_NAME)  # written anew, never copied
ALWAYS_IGNORED = ("model.embed_tokens", "lm_head")
# Kept BF16 although the FP8 release stores it as FP8: recent vLLM runs the indexer's wk fused with weights_proj as
# one unquantized GEMM, so a packed wk would not load there (it is 128 x hidden: nothing to save).
KEPT_BF16 = ("*.self_attn.indexer.wk",)


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _block_of(name: str) -> int | None:
    p = parse_hf_name(name)
    return p.layer if p is not None else None


@dataclass
class GptqPlan:
    checkpoint: GlmCheckpoint = field(repr=False)
    format: GptqFormat
    targets: dict[str, tuple[int, int]]  # quantized module -> weight shape
    ignore: list[str]  # unquantized linear modules (the config's ignore list)
    too_narrow: list[str]  # excluded: input width not a multiple of the group size
    items: list[str]  # write order: tensor names to copy and module names to quantize
    entries: list[PlanEntry]

    @property
    def src(self) -> Path:
        return self.checkpoint.reader.root

    @property
    def bytes_in(self) -> int:
        return self.checkpoint.reader.total_bytes()

    @property
    def bytes_out(self) -> int:
        return plan_bytes(self.entries)

    def describe(self) -> str:
        experts = sum(".mlp.experts." in m for m in self.targets)
        lines = [f"GPTQ W4A16 export ({self.format.name}) of {self.src}",
                 f"  {len(self.targets)} linear modules to INT4 (group {gq.GROUP_SIZE}, symmetric), "
                 f"{experts} of them routed-expert projections",
                 f"  {len(self.ignore)} linear modules kept unquantized (ignore list)",
                 f"  {self.bytes_in / 2**20:.1f} MiB in -> {self.bytes_out / 2**20:.1f} MiB out"]
        if self.too_narrow:
            lines.append(f"  kept BF16, input width not a multiple of {gq.GROUP_SIZE}: {len(self.too_narrow)} "
                         f"({', '.join(self.too_narrow[:3])}{', ...' if len(self.too_narrow) > 3 else ''})")
        return "\n".join(lines)


def _open_source(src: str | os.PathLike) -> GlmCheckpoint:
    root = Path(src)
    try:
        qc = json.loads((root / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        qc = None  # open_checkpoint reports a missing or broken config
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in (None, "fp8") or (root / "hf_quant_config.json").exists():
        raise ExportError(f"{src} is already quantized ({method or 'modelopt'}): export from BF16 or the FP8 release")
    return open_checkpoint(src)


def _is_candidate(name: str, reader: CheckpointReader) -> bool:
    """A 2-D weight of a role GPTQ quantizes by default (what the FP8 release stores as FP8, less `KEPT_BF16`)."""
    p = parse_hf_name(name)
    return (p is not None and released_as_fp8(p.rule) and len(reader.info(name).shape) == 2
            and not any(fnmatch.fnmatchcase(_module(name), k) for k in KEPT_BF16))


def _order(names: list[str], targets: dict[str, tuple[int, int]]) -> list[str]:
    """Write order: global tensors, then per block its copied tensors and then its modules in the order the
    sequential run produces them (attention, dense / shared MLP, routed experts by number; gate, up, down)."""
    def key(item: str) -> tuple:
        block = _block_of(item + ".weight" if item in targets else item)
        if block is None:
            return (-1, 0, natural_key(item))
        if item not in targets:
            return (block, 0, natural_key(item))
        stage = 1 if ".self_attn." in item else 2 if ".experts." not in item or ".shared_experts." in item else 3
        expert = int(item.split(".experts.")[1].split(".")[0]) if stage == 3 else 0
        proj = next((i for i, p in enumerate(("gate_proj", "up_proj", "down_proj")) if item.endswith(p)), 0)
        return (block, stage, expert, proj, natural_key(item))

    return sorted(names, key=key)


def plan_export(src: str | os.PathLike, fmt: str = "compressed-tensors", exclude: Sequence[str] = ()) -> GptqPlan:
    """Plan the export of `src` (see the module docstring); `exclude` holds fnmatch patterns of module names."""
    form = get_format(fmt)
    ckpt = _open_source(src)
    reader = ckpt.reader
    targets: dict[str, tuple[int, int]] = {}
    too_narrow: list[str] = []
    ignore = set(ALWAYS_IGNORED)
    copies: list[str] = []
    for name in reader.names():
        info = reader.info(name)
        mod = _module(name)
        if _is_candidate(name, reader) and not any(fnmatch.fnmatchcase(mod, p) for p in exclude):
            if info.shape[1] % gq.GROUP_SIZE == 0:
                targets[mod] = tuple(info.shape)
                continue
            too_narrow.append(mod)
        copies.append(name)
        if name.endswith(".weight") and len(info.shape) == 2:
            ignore.add(mod)
    if not targets:
        raise ExportError("nothing to quantize (every candidate module is excluded)")
    items = _order(copies + list(targets), targets)
    entries: list[PlanEntry] = []
    for item in items:
        if item in targets:
            entries += form.entries(item, targets[item])
        else:
            info = reader.info(item)
            entries.append((item, info.shape, torch.bfloat16 if reader.is_fp8(item) else info.torch_dtype))
    ignore_list = sorted(ignore, key=natural_key)
    return GptqPlan(ckpt, form, targets, ignore_list, sorted(too_narrow, key=natural_key), items, entries)


# ----------------------------------------------------------------------------------------------------------------
# Execute
# ----------------------------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int], None]  # (modules quantized, modules to quantize)


class OrderedSink:
    """Writes the plan's items in order: copies straight from the source, quantized modules as they arrive
    (held until their turn: at most one block's attention projections wait)."""

    def __init__(self, plan: GptqPlan, writer: ShardedWriter, progress: ProgressFn | None = None):
        self.plan, self.writer, self.progress = plan, writer, progress
        self.received = 0
        self.reader = plan.checkpoint.reader
        self.pending: dict[str, gq.Int4Weight] = {}
        self.next = 0
        self.flush()

    def __call__(self, module: str, q: gq.Int4Weight) -> None:
        if module not in self.plan.targets:
            raise ExportError(f"{module} was quantized but is not in the plan")
        self.pending[module] = q
        self.received += 1
        if self.progress is not None:
            self.progress(self.received, len(self.plan.targets))
        self.flush()

    def flush(self) -> None:
        items = self.plan.items
        while self.next < len(items):
            item = items[self.next]
            if item in self.plan.targets:
                if item not in self.pending:
                    return
                q = self.pending.pop(item)
                for suffix, t in zip(self.plan.format.suffixes, self.plan.format.tensors(q), strict=True):
                    self.writer.add(f"{item}.{suffix}", t)
            elif self.reader.is_fp8(item):
                self.writer.add(item, self.reader.get(item).to(torch.bfloat16))
            else:
                self.writer.add_bytes(item, self.reader.stored_chunks(self.reader.info(item)))
            self.next += 1

    def check_done(self) -> None:
        if self.next < len(self.plan.items):
            raise ExportError(f"the run produced no weight for {self.plan.items[self.next]}")


@dataclass
class ExportResult:
    out: Path
    plan: GptqPlan
    report: GptqReport
    bytes_out: int
    seconds: float
    tokens: int


def resolve_device(device: str | torch.device) -> torch.device:
    return usable_device(device, ExportError)


def _manifest(plan: GptqPlan, res: ExportResult, settings: GptqSettings, dev: torch.device, calib: dict) -> dict:
    r = res.report
    return {
        "producer": {"name": "glmgguf", "version": __version__},
        "format": plan.format.name,
        "scheme": {"method": "rtn" if settings.rtn else "gptq", "bits": gq.BITS, "group_size": gq.GROUP_SIZE,
                   "symmetric": True, "actorder": settings.actorder,
                   "dampening_frac": settings.damp, "block_size": settings.block_size,
                   "min_expert_tokens": settings.min_tokens, "activations": "bf16"},
        "source": str(plan.src),
        "calibration": {**calib, "tokens": res.tokens},
        "device": str(dev),
        "modules": r.summary(),
        "rtn_few_tokens": r.rtn_few_tokens,
        "rtn_no_input": r.rtn_no_input,
        "rtn_cholesky": r.rtn_cholesky,
        "kept_too_narrow": plan.too_narrow,
        "expert_tokens": {str(k): v for k, v in sorted(r.expert_tokens.items())},
        "gptq_loss": r.loss,
        "bytes_in": plan.bytes_in,
        "bytes_out": res.bytes_out,
        "seconds": round(res.seconds, 3),
    }


def export_gptq(plan: GptqPlan, out: str | os.PathLike, chunks: Sequence[torch.Tensor],
                settings: GptqSettings | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.bfloat16, force: bool = False, max_shard_bytes: int = 5 * 1024**3,
                calib: dict | None = None, progress: ProgressFn | None = None) -> ExportResult:
    """Quantize and write the planned export into `out` (atomically), calibrating on token chunks [B, S];
    `progress(done, total)` after each quantized module."""
    dev = resolve_device(device)
    settings = settings or GptqSettings()
    out = Path(out)
    if out.resolve() == plan.src.resolve():
        raise ExportError("the output directory is the source checkpoint")
    if not chunks:
        raise ExportError("no calibration tokens")
    reader = plan.checkpoint.reader
    t0 = time.perf_counter()
    with atomic_dir(out, force=force, inputs=[plan.src]) as tmp:
        meta = {"quantization": f"gptq-w4a16-{plan.format.name}"}
        with ShardedWriter(tmp, plan.entries, max_shard_bytes=max_shard_bytes, metadata=meta) as writer:
            sink = OrderedSink(plan, writer, progress)
            with torch.no_grad():
                report = run_sequential(reader, chunks, set(plan.targets), settings, sink, dev, dtype)
            sink.check_done()
        cfg = {**reader.config, "quantization_config": plan.format.quantization_config(plan.ignore)}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name, doc in plan.format.config_files(plan.ignore).items():
            (tmp / name).write_text(json.dumps(doc, indent=2) + "\n")
        copy_extra_files(reader, tmp, skip=KEPT_FILES)
        res = ExportResult(out, plan, report, writer.total_size, time.perf_counter() - t0,
                           sum(c.numel() for c in chunks))
        doc = _manifest(plan, res, settings, dev, calib or {})
        (tmp / MANIFEST_NAME).write_text(json.dumps(doc, indent=1) + "\n")
    return res
