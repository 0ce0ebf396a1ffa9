"""What a card may say about one build, read from manifests and files only (nothing is estimated here).

A build is a pipeline stage output: a GGUF file or split folder, an NVFP4 folder, or a pruned / distilled
checkpoint, with the stage's `manifest.json` beside it. Its lineage (the stages it was made from, through the
manifests' `upstream`) gives the REAP keep map and the Router-KD log; its own files give the storage, the GGUF
tensor types (as `glmgguf inspect` reads them), the config's dimensions and the size on disk; the evaluation
stages whose upstream is the build give the loop measurements, those of the unpruned source model converted the
same way (`baseline-gguf`) the baseline of its z-test, and the `kld` stage the KL divergence against the
unquantized checkpoint (`kld-reference`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmgguf.errors import GlmggufError
from glmgguf.eval.compare import load_run
from glmgguf.eval.stats import wilson
from glmgguf.pipeline.manifest import read_json

MANIFEST = "manifest.json"
KEEP_MAP = "reap_keep_map.json"
REAP_STATS = "reap_stats.json"
KD_LOG = "kd_train_log.json"
LORA_STAGE, LORA_LOG = "lora", "adapter/lora_train_log.json"  # the pipeline's LoRA-KD stage and its log
NVFP4_MANIFEST = "nvfp4_export.json"
KLD_STAGE, KLD_REFERENCE, BASELINE = "kld", "kld-reference", "baseline-gguf"  # the pipeline's stage names
log = logging.getLogger(__name__)
_HUB_CACHE = re.compile(r"^models--([^/]+?)--([^/]+)$")  # a Hugging Face cache folder names its repository


class CardError(GlmggufError, ValueError):
    """The output has no manifest or files a card can be built from."""


@dataclass(frozen=True)
class StageRecord:
    """A finished stage: its name, directory, manifest and output path."""

    name: str
    dir: Path
    manifest: dict[str, Any]

    @property
    def output(self) -> Path:
        return self.dir / self.manifest["output"]


@dataclass(frozen=True)
class CacheDims:
    """Per-token KV-cache widths (elements) of the trunk, as llama.cpp's glm-dsa cache stores them."""

    n_layers: int  # trunk layers; the MTP block keeps its own cache, used only while drafting
    n_mtp: int
    mla_width: int  # kv_lora_rank + qk_rope_head_dim: the compressed latent and the shared RoPE key
    n_full_indexer: int  # layers whose indexer keeps a key cache ("full"); shared layers reuse its top-k
    indexer_width: int  # index_head_dim
    max_context: int | None  # the config's max_position_embeddings (None: not in the config)


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts of the build (from its config or GGUF metadata) and its parameter counts."""

    experts: int | None  # routed experts per MoE layer (None: not one count)
    experts_per_tok: int
    moe_layers: int
    total_params: int
    active_params: int  # per token: every trunk tensor, routed experts scaled by experts_per_tok / experts
    cache: CacheDims


@dataclass(frozen=True)
class PruneFacts:
    metric: str
    per_layer: str
    kept: tuple[int, ...]  # distinct kept counts over the MoE layers
    source: tuple[int, ...]  # distinct source counts
    moe_layers: int
    calibration_tokens: int | None


@dataclass(frozen=True)
class KdFacts:
    steps: int
    trainable_params: int
    first_eval: dict[str, float] | None  # held-out KL / top-1 agreement before training (step 0)
    last_eval: dict[str, float] | None


@dataclass(frozen=True)
class LoraFacts:
    """LoRA-KD after Router-KD: the adapter's settings and where it went (merged, or an adapter GGUF served with
    the GGUF, `adapter` its file name)."""

    rank: int
    targets: tuple[str, ...]
    train_gates: bool
    steps: int
    trainable_params: int
    adapter: str | None  # None: merged into the weights


@dataclass(frozen=True)
class RoleRow:
    """One tensor role of a GGUF: its types (name, tensors), tensor count and bits per weight."""

    role: str
    types: tuple[tuple[str, int], ...]
    n_tensors: int
    bpw: float


@dataclass(frozen=True)
class GgufFacts:
    files: tuple[str, ...]
    recipe: str | None
    recipe_description: str | None  # these two only when the shipped recipe is the one recorded (same SHA-256)
    recipe_rules: tuple[str, ...]  # "what -> TYPE", first match wins, then "anything else -> DEFAULT"
    mtp: str | None
    indexer: str | None
    roles: tuple[RoleRow, ...]
    requires_patches: tuple[str, ...]


@dataclass(frozen=True)
class Nvfp4Facts:
    format: str
    experts_nvfp4: int
    quantized_layers: tuple[int, ...]


@dataclass(frozen=True)
class EvalFacts:
    """One loop-evaluation run of the build (a `glmgguf eval loops` file)."""

    preset: str
    sampler: dict[str, Any]
    prompts: str
    n: int
    loops: int
    eos: int
    distinct4: float | None
    median_tokens: float | None
    draft: dict[str, Any] | None  # drafted, accepted, n_max, p_min
    lora: str | None = None  # the LoRA adapter GGUF the server applied (its file name)

    @property
    def loop_ci(self) -> tuple[float, float]:
        return wilson(self.loops, self.n)

    @property
    def eos_ci(self) -> tuple[float, float]:
        return wilson(self.eos, self.n)


@dataclass(frozen=True)
class KldFacts:
    """`glmgguf kld --json` of this GGUF against a reference GGUF."""

    base: str
    mean_kld: float
    mean_kld_err: float
    same_top_pct: float
    ctx: int | None


@dataclass(frozen=True)
class BuildFacts:
    name: str  # the stage, e.g. gguf-q4_protected
    kind: str  # "gguf" | "nvfp4" | "checkpoint"
    output: Path
    size_bytes: int
    storage: str
    source: str | None  # the source model's folder name
    base_model: str | None  # Hugging Face repository id of the source model
    license: str | None
    model: ModelFacts
    prune: PruneFacts | None = None
    kd: KdFacts | None = None
    lora: LoraFacts | None = None
    gguf: GgufFacts | None = None
    nvfp4: Nvfp4Facts | None = None
    evals: tuple[EvalFacts, ...] = ()
    baseline: tuple[EvalFacts, ...] = ()  # the same runs of the unpruned source model, converted the same way
    kld: KldFacts | None = None
    workdir: Path = Path(".")  # the pipeline workdir holding the stage


# ---- stages and lineage --------------------------------------------------------------------------------------


def read_stage(stage_dir: Path) -> StageRecord | None:
    """The finished stage in `stage_dir` (None without a manifest naming its output)."""
    m = read_json(stage_dir / MANIFEST)
    if not m or "stage" not in m or "output" not in m:
        return None
    return StageRecord(m["stage"], stage_dir, m)


def find_stage(output: Path) -> StageRecord:
    """The stage that wrote `output` (the output itself or its stage directory)."""
    output = Path(os.path.abspath(output))  # symbolic links kept: a workdir may link stages of another
    for d in (output, output.parent):
        rec = read_stage(d)
        if rec is not None and (d == output or rec.output == output):
            return rec
    raise CardError(f"{output}: no stage manifest ({MANIFEST}) beside it; a card is built from a pipeline "
                    "output and its manifests")


def lineage(rec: StageRecord) -> list[StageRecord]:
    """`rec` and every finished stage it was made from (through the manifests' upstream), nearest first."""
    out, todo, seen = [], [rec], set()
    while todo:
        r = todo.pop(0)
        if r.name in seen:
            continue
        seen.add(r.name)
        out.append(r)
        for name in sorted(r.manifest.get("upstream") or {}):
            up = read_stage(rec.dir.parent / name)
            if up is not None and made_from(r, up):
                todo.append(up)
    return out


def made_from(child: StageRecord, parent: StageRecord) -> bool:
    """Whether `child` read `parent`'s present output (not one an earlier run wrote); warns when not."""
    if (child.manifest.get("upstream") or {}).get(parent.name) == parent.manifest.get("output_fingerprint"):
        return True
    log.warning("%s was made from an earlier output of %s: its facts are left out of the card", child.name,
                parent.name)
    return False


def source_model_path(records: list[StageRecord]) -> Path | None:
    """The source model a lineage started from: the first path argument of its earliest stage's command."""
    for rec in reversed(records):
        if rec.manifest.get("upstream"):
            continue
        args = rec.manifest.get("command") or []
        return next((Path(a) for a in args[1:] if a.startswith("/")), None)
    return None


def hub_id(path: Path | None) -> str | None:
    """`org/name` when the path lies in a Hugging Face cache (`models--org--name/snapshots/...`)."""
    for part in (path.parts if path else ()):
        m = _HUB_CACHE.match(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def front_matter_value(readme: Path, key: str) -> str | None:
    """A scalar `key: value` of a README's YAML front matter (None when absent or unreadable)."""
    try:
        lines = readme.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        m = re.match(rf"^{re.escape(key)}:\s*(\S.*?)\s*$", line)
        if m:
            return m.group(1).strip("'\"")
    return None


# ---- what the build's files say --------------------------------------------------------------------------------


def checkpoint_dir(records: list[StageRecord]) -> Path | None:
    """The checkpoint the build was made from, or is: the nearest checkpoint output in its lineage, else the
    source model."""
    for r in records:
        if (r.output / "config.json").is_file():
            return r.output
    src = source_model_path(records)
    return src if src is not None and (src / "config.json").is_file() else None


def prune_facts(ckpt: Path | None) -> PruneFacts | None:
    keep = read_json(ckpt / KEEP_MAP) if ckpt else None
    if not keep:
        return None
    stats = read_json(ckpt / REAP_STATS) or {}
    return PruneFacts(metric=keep["metric"], per_layer=keep["per_layer"],
                      kept=tuple(sorted(set(keep["kept_experts"].values()))),
                      source=tuple(sorted(set(keep["source_experts"].values()))),
                      moe_layers=len(keep["kept_experts"]), calibration_tokens=(stats.get("meta") or {}).get("tokens"))


def kd_facts(ckpt: Path | None) -> KdFacts | None:
    log = read_json(ckpt / KD_LOG) if ckpt else None
    if not log:
        return None
    evals = log.get("evals") or []
    first, last = (evals[0], evals[-1]) if len(evals) >= 2 else (None, None)
    return KdFacts(steps=len(log["steps"]), trainable_params=int(log["trainable_parameters"]),
                   first_eval=first, last_eval=last)


def lora_facts(records: list[StageRecord], evals: tuple[EvalFacts, ...]) -> LoraFacts | None:
    """LoRA-KD in the build's lineage (merged), or the stage whose adapter GGUF its evaluations applied."""
    rec = next((r for r in records if r.name == LORA_STAGE), None)
    adapter = next((e.lora for e in evals if e.lora), None)
    if rec is None and adapter and records:
        rec = read_stage(records[0].dir.parent / LORA_STAGE)
    log = read_json(rec.output / LORA_LOG) if rec else None
    if not log:
        return None
    o = log["options"]
    return LoraFacts(rank=int(o["rank"]), targets=tuple(o["targets"]), train_gates=bool(o["train_gates"]),
                     steps=len(log["steps"]), trainable_params=int(log["trainable_parameters"]), adapter=adapter)


def eval_facts(rec: StageRecord) -> tuple[EvalFacts, ...]:
    """The loop evaluations whose upstream is this stage, in the order the comparison stage lists them."""
    workdir = rec.dir.parent
    runs = [r for d in sorted(workdir.iterdir()) if d.is_dir() and (r := read_stage(d)) is not None
            and rec.name in (r.manifest.get("upstream") or {}) and r.manifest["command"][1:3] == ["eval", "loops"]
            and made_from(r, rec)]
    report = read_stage(workdir / "eval-report")
    order = [Path(a).name for a in report.manifest["command"]] if report else []
    if order:  # the build's own runs (other checkpoints' runs served from it are compared elsewhere)
        runs = [r for r in runs if r.output.name in order]
    runs.sort(key=lambda r: order.index(r.output.name) if r.output.name in order else len(order))
    return tuple(_eval(load_run(r.output), r.output.stem) for r in runs if r.output.is_file())


def _eval(doc: dict[str, Any], preset: str) -> EvalFacts:
    s, spec = doc["summary"], doc["spec"]
    draft = None
    if s.get("draft") and spec.get("draft"):
        draft = {"drafted": s["draft"]["drafted"], "accepted": s["draft"]["accepted"],
                 "n_max": spec["draft"]["n_max"], "p_min": spec["draft"]["p_min"]}
    return EvalFacts(preset=preset, sampler=dict(spec["sampler"]), prompts=spec["prompts"], n=s["n"],
                     loops=s["loops"], eos=s["counts"]["eos"], distinct4=s["distinct4_mean"],
                     median_tokens=s["median_tokens"], draft=draft, lora=spec.get("lora"))


def _model_input(rec: StageRecord) -> str | None:
    """The fingerprint of the source model a stage read (None when it read an earlier stage's output)."""
    return (rec.manifest.get("inputs") or {}).get("model")


def source_fingerprint(records: list[StageRecord]) -> str | None:
    """The fingerprint of the source model a lineage started from (its earliest stage's `model` input)."""
    return next((fp for r in reversed(records) if (fp := _model_input(r))), None)


def baseline_facts(rec: StageRecord, records: list[StageRecord]) -> tuple[EvalFacts, ...]:
    """The loop evaluations of the unpruned source model converted as this build was, when it is this build's
    source (same fingerprint) and they read its present GGUF."""
    base = read_stage(rec.dir.parent / BASELINE)
    if base is None:
        return ()
    if _model_input(base) != source_fingerprint(records):
        log.warning("%s was converted from another source model than %s: its evaluations are left out of the card",
                    BASELINE, rec.name)
        return ()
    return eval_facts(base)


def pipeline_kld(rec: StageRecord) -> Path | None:
    """The `kld` stage's JSON when it scored this GGUF's present file against a reference converted from the
    same checkpoint (same upstream and source inputs)."""
    kld, ref = read_stage(rec.dir.parent / KLD_STAGE), read_stage(rec.dir.parent / KLD_REFERENCE)
    if kld is None or ref is None or rec.name not in (kld.manifest.get("upstream") or {}):
        return None
    same = ref.manifest.get("upstream") == rec.manifest.get("upstream") and _model_input(ref) == _model_input(rec)
    return kld.output if same and made_from(kld, rec) and made_from(kld, ref) else None


def kld_facts(path: Path | None, gguf_name: str) -> KldFacts | None:
    """This GGUF's row of a `glmgguf kld --json` file."""
    doc = json.loads(path.read_text()) if path else None
    row = next((r for r in (doc or {}).get("results", []) if r["name"] == gguf_name), None)
    if row is None:
        return None
    k = row["kld"]
    return KldFacts(base=Path(doc["base"]).name, mean_kld=k["mean_kld"], mean_kld_err=k["mean_kld_err"],
                    same_top_pct=k["same_top_pct"], ctx=doc.get("ctx"))


def files_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)
