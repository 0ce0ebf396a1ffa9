"""A build plan (TOML): what to prune, distill, convert, export and evaluate, checked before any work starts.

Every section is a dataclass (`SECTIONS`) declaring its keys' types, defaults and choices (the tuples of
`glmgguf.choices`, which the command-line options offer too); unknown sections or keys, wrong types, missing
files, a keep count above the model's expert count and unknown recipes are refused with the plan's line named.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmgguf.choices import (
    DEVICE,
    DEVICE_MAP,
    DTYPES,
    GGUF_INDEXER,
    GGUF_MTP,
    KD_SCHEDULES,
    LORA_GGUF_TARGETS,
    LORA_SERVE,
    LORA_TARGETS,
    NVFP4_FORMATS,
    REAP_METRICS,
    REAP_PER_LAYER,
    device_problem,
)
from glmgguf.errors import GlmggufError

BUILTIN_DATA = ("stdlib:train", "stdlib:heldout")  # the testbed's standard-library text splits
# the trained testbed models (built and cached on demand); `-fp8`: stored as the block-FP8 release is
BUILTIN_MODELS = ("testbed:tiny", "testbed:small", "testbed:tiny-fp8", "testbed:small-fp8")
KLD_REFERENCES = ("bf16", "f32")  # the unquantized recipes a KLD reference is converted with

class PlanError(GlmggufError, ValueError):
    """The plan is invalid; the message names the file and line."""


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")


def line_of(text: str, section: str, key: str | None = None, index: int = 0) -> int | None:
    """1-based line of `key` in `[section]` (the `index`-th `[[section]]`), or of the header when key is None."""
    current, count, header_line = None, -1, None
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0]
        m = _HEADER.match(stripped)
        if m:
            current = m.group(2)
            if current == section:
                count += 1
                if count == index:
                    header_line = no
            continue
        if current == section and count == index and key is not None:
            if re.match(rf"^\s*{re.escape(key)}\s*=", stripped):
                return no
    return header_line


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    """A string field whose value must be one of `choices` (the same tuple the command-line option offers)."""
    return field(default=default, metadata={"choices": choices})


def _device(pattern: re.Pattern = DEVICE) -> Any:
    """A device string field, checked as the command-line option checks it."""
    return field(default="cpu", metadata={"device": pattern})


DTYPE_CHOICES = tuple(sorted(DTYPES))


@dataclass
class PipelineSection:
    """[pipeline]: where the stages write and which model they start from."""

    workdir: str
    model: str  # a directory or one of BUILTIN_MODELS
    threads: int | None = None


@dataclass
class DataSection:
    """[data]: the text files of each pass (entries are paths or BUILTIN_DATA names) and how they are packed."""

    calibration: list[str] = field(default_factory=list)
    kd: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    seq_len: int = 2048
    calibration_samples: int | None = None
    kd_samples: int | None = None
    heldout_samples: int | None = None
    text_field: str = "text"
    batch_size: int = 4


@dataclass
class ReapSection:
    """[reap]: observe the calibration text and prune to `keep` experts (or by `ratio`)."""

    keep: int | None = None
    ratio: float | None = None
    per_layer: str = _choice("uniform", REAP_PER_LAYER)
    metric: str = _choice("reap", REAP_METRICS)
    streaming: bool = False
    device: str = _device(DEVICE_MAP)
    dtype: str = _choice("bf16", DTYPE_CHOICES)
    spill_threshold: str = "4G"  # streaming: activations above this spill to disk and the pass can resume


@dataclass
class KdSection:
    """[kd]: the teacher caches and router-only distillation of the pruned student."""

    steps: int = 200
    lr: float = 5e-5
    top_k: int = 64
    batch_size: int = 4
    schedule: str = _choice("constant", KD_SCHEDULES)
    warmup: int = 0
    train_bias: bool = False
    device_map: str = _device(DEVICE_MAP)
    dtype: str = _choice("f32", DTYPE_CHOICES)
    teacher_streaming: bool = False
    teacher_device: str = _device(DEVICE_MAP)
    save_every: int = 50
    teacher_spill_threshold: str = "4G"
    cpu_offload: bool = False  # with [launch] (FSDP2): the parameter shards in host memory (8 x 80 GB GPUs)


@dataclass
class LoraSection:
    """[lora]: LoRA adapters (and optionally the router gates) trained after [kd] to the same teacher cache (with
    [launch]: FSDP2 over its ranks, offloaded as [kd] cpu_offload says); served merged into the checkpoint every
    later stage reads, or as a llama.cpp adapter GGUF beside the GGUF outputs."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["attn", "shared"], metadata={"each": LORA_TARGETS})
    train_gates: bool = True
    gate_lr: float | None = None  # the gates' learning rate (default: lr)
    lr: float = 1e-3
    steps: int = 200
    batch_size: int = 4
    schedule: str = _choice("constant", KD_SCHEDULES)
    warmup: int = 0
    dtype: str = _choice("f32", DTYPE_CHOICES)
    device_map: str = _device(DEVICE_MAP)
    save_every: int = 50
    serve: str = _choice("merged", LORA_SERVE)


@dataclass
class LaunchSection:
    """[launch]: observe, the teacher passes and Router-KD (with FSDP2) run under torchrun on these ranks; each
    rank's backend follows its stage's device (NCCL on CUDA, gloo on the CPU)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0  # this node's place (the plan runs on every node)
    rdzv_endpoint: str | None = None  # HOST:PORT of the rendezvous, needed when nnodes > 1

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class GgufOutput:
    """[[gguf]]: one GGUF output (several tables: several outputs)."""

    name: str
    recipe: str
    imatrix: Path | None = None
    split_max_size: str | None = None
    mtp: str = _choice("keep", GGUF_MTP)
    indexer: str = _choice("native", GGUF_INDEXER)


@dataclass
class Nvfp4Section:
    """[nvfp4]: an NVFP4 checkpoint of the final model for vLLM / SGLang."""

    format: str = _choice("modelopt", NVFP4_FORMATS)
    device: str = _device()
    exclude: list[str] = field(default_factory=list)
    max_shard_size: str = "5G"


@dataclass
class EvalSection:
    """[eval]: loop evaluation of one [[gguf]] output under llama-server, one run per sampler preset."""

    gguf: str
    prompts: str = "fuzz"
    presets: list[str] = field(default_factory=lambda: ["raw"])
    ctx: int | None = None
    parallel: int = 2
    safety_cap: int = 4096
    temperature: float | None = None
    seed: int = 0
    limit: int | None = None
    draft_mtp: bool = False
    draft_max: int = 3
    draft_p_min: float = 0.0
    baseline: bool = False  # also convert the unpruned source model with the same recipe and evaluate it
    variants: bool = False  # also evaluate the pruned and Router-KD checkpoints (before [lora]) the same way


@dataclass
class KldSection:
    """[kld]: KL divergence of every [[gguf]] output against the final checkpoint converted unquantized."""

    text: str  # a plain-text file, or one of BUILTIN_DATA (written as plain text)
    reference: str = _choice("bf16", KLD_REFERENCES)  # the reference GGUF's type
    ctx: int = 256
    chunks: int | None = None


@dataclass
class CardSection:
    """[card]: what the model cards of the outputs say that no manifest records."""

    base_model: str | None = None  # the source model's Hugging Face repository, org/name
    license: str | None = None  # the license of the source model, e.g. "mit"


SECTIONS: dict[str, type] = {"pipeline": PipelineSection, "data": DataSection, "reap": ReapSection,
                             "kd": KdSection, "lora": LoraSection, "gguf": GgufOutput, "nvfp4": Nvfp4Section,
                             "eval": EvalSection, "launch": LaunchSection, "kld": KldSection, "card": CardSection}
LIST_SECTIONS = frozenset({"gguf"})  # [[gguf]]: several outputs


@dataclass
class Plan:
    """A validated plan; paths are absolute (relative ones resolve against the plan file's directory)."""

    path: Path
    text: str
    base: Path  # relative paths in the plan resolve against this directory
    workdir: Path
    model: str  # a directory or one of BUILTIN_MODELS
    threads: int | None
    data: DataSection
    reap: ReapSection | None
    kd: KdSection | None
    lora: LoraSection | None = None
    gguf: list[GgufOutput] = field(default_factory=list)
    nvfp4: Nvfp4Section | None = None
    eval: EvalSection | None = None
    launch: LaunchSection | None = None
    kld: KldSection | None = None
    card: CardSection | None = None

    def where(self, section: str, key: str | None = None, index: int = 0) -> str:
        """`plan.toml:12` for messages."""
        no = line_of(self.text, section, key, index)
        return f"{self.path}:{no}" if no else str(self.path)

    @property
    def observes(self) -> bool:
        """Calibration statistics are needed (for pruning or for NVFP4 input scales)."""
        return self.reap is not None or self.nvfp4 is not None


def _toml_kind(hint: Any) -> Any:
    """The TOML value type of a section field: str, int, float, bool or [kind] (a list); paths are strings."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return [_toml_kind(typing.get_args(hint)[0])]
    return str if hint is Path else hint


def _type_ok(value: Any, kind: Any) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_type_ok(v, kind[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    return f"a list of {_type_name(kind[0])}" if isinstance(kind, list) else {
        str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]


def _section(raw: dict, name: str, text: str, path: Path, index: int = 0) -> Any:
    """Check one table against its section dataclass (`SECTIONS`): the dataclass, with defaults filled."""
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    here = f"[[{name}]] #{index + 1}" if name in LIST_SECTIONS else f"[{name}]"

    def fail(msg: str, key: str | None = None) -> PlanError:
        no = line_of(text, name, key, index)
        return PlanError(f"{path}:{no or '?'}: {msg}")

    if not isinstance(raw, dict):
        raise fail(f"{here} must be a table")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise fail(f"unknown key '{key}' in {here} (known: {', '.join(fields)})", key)
        kind = _toml_kind(hints[key])
        if not _type_ok(value, kind):
            raise fail(f"{here} {key} must be {_type_name(kind)}, not {value!r}", key)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise fail(f"{here} {key} = {value!r} is not one of {', '.join(choices)}", key)
        each = fields[key].metadata.get("each")
        if each and (bad := [v for v in value if v not in each]):
            raise fail(f"{here} {key}: {', '.join(map(repr, bad))} not among {', '.join(each)}", key)
        if (pattern := fields[key].metadata.get("device")) and (problem := device_problem(value, pattern)):
            raise fail(f"{here} {key}: {problem}", key)
        out[key] = float(value) if kind is float else value
    for key, f in fields.items():
        if key not in out and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise fail(f"{here} needs '{key}'")
    return cls(**out)


def builtin_plans() -> dict[str, Path]:
    """Shipped plans by name (`testbed`: the whole pipeline on the trained tiny testbed)."""
    return {p.stem: p for p in sorted((Path(__file__).parent / "plans").glob("*.toml"))}


def parse_plan(path: str | Path, workdir: str | Path | None = None) -> Plan:
    """Read and check the plan's structure (types, keys, names); `check_inputs` checks files and the model.

    `path` may name a shipped plan; its relative paths then resolve against the current directory (else against
    the plan file's directory). `workdir` overrides the plan's.
    """
    shipped = builtin_plans()
    builtin = isinstance(path, str) and path in shipped
    path = shipped[path] if builtin else Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {e.strerror} (shipped plans: {', '.join(shipped)})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: not valid TOML: {e}") from None
    for name in raw:
        if name not in SECTIONS:
            no = line_of(text, name)
            raise PlanError(f"{path}:{no or '?'}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    if "pipeline" not in raw:
        raise PlanError(f"{path}: the plan needs a [pipeline] section with workdir and model")
    gguf_raw = raw.get("gguf", [])
    if isinstance(gguf_raw, dict):
        raise PlanError(f"{path}:{line_of(text, 'gguf') or '?'}: GGUF outputs are [[gguf]] tables (double brackets)")
    sections = {n: _section(raw[n], n, text, path) for n in SECTIONS if n in raw and n not in LIST_SECTIONS}
    base = Path.cwd() if builtin else path.parent
    pipe: PipelineSection = sections["pipeline"]
    gguf = [_section(g, "gguf", text, path, i) for i, g in enumerate(gguf_raw)]
    for g in gguf:
        g.imatrix = None if g.imatrix is None else (base / g.imatrix).resolve()
    plan = Plan(path=path, text=text, base=base, workdir=Path(workdir or base / pipe.workdir).resolve(),
                model=pipe.model, threads=pipe.threads, data=sections.get("data") or DataSection(),
                reap=sections.get("reap"), kd=sections.get("kd"), lora=sections.get("lora"), gguf=gguf,
                nvfp4=sections.get("nvfp4"),
                eval=sections.get("eval"), launch=sections.get("launch"), kld=sections.get("kld"),
                card=sections.get("card"))
    _check_structure(plan)
    return plan


def _check_structure(plan: Plan) -> None:
    def fail(section: str, key: str | None, msg: str, index: int = 0) -> PlanError:
        return PlanError(f"{plan.where(section, key, index)}: {msg}")

    names = [g.name for g in plan.gguf]
    for i, g in enumerate(plan.gguf):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", g.name):
            raise fail("gguf", "name", f"GGUF output name {g.name!r}: use letters, digits, '.', '_', '-'", i)
        if names.count(g.name) > 1:
            raise fail("gguf", "name", f"two [[gguf]] outputs are named {g.name!r}", i)
    if plan.reap is not None:
        if (plan.reap.keep is None) == (plan.reap.ratio is None):
            raise fail("reap", None, "[reap] needs exactly one of keep or ratio")
        if plan.reap.keep is not None and plan.reap.keep < 1:
            raise fail("reap", "keep", "[reap] keep must be at least 1")
        if plan.reap.ratio is not None and not 0 <= plan.reap.ratio < 1:
            raise fail("reap", "ratio", "[reap] ratio is the pruned fraction, 0 <= ratio < 1")
    if plan.observes and not plan.data.calibration:
        raise fail("data", None, "[reap] and [nvfp4] need calibration text: set [data] calibration")
    if plan.kd is not None:
        if plan.reap is None:
            raise fail("kd", None, "[kd] distills a pruned student: the plan needs a [reap] section too")
        if not plan.data.kd:
            raise fail("data", None, "[kd] needs KD text: set [data] kd")
    if plan.lora is not None:
        _check_lora(plan, fail)
    if plan.eval is not None:
        from glmgguf.eval.run import PRESETS as EVAL_PRESETS

        e = plan.eval
        if e.gguf not in names:
            raise fail("eval", "gguf", f"[eval] gguf = {e.gguf!r} names no [[gguf]] output "
                                       f"(outputs: {', '.join(names) or 'none'})")
        if plan.gguf[names.index(e.gguf)].split_max_size:
            raise fail("eval", "gguf", f"[eval] gguf = {e.gguf!r} is a split output; evaluate an unsplit one")
        _check_draft(plan, fail)
        if e.variants and plan.kd is None:
            raise fail("eval", "variants", "[eval] variants evaluates the pruned and Router-KD checkpoints: the plan "
                                           "needs [reap] and [kd]")
        if e.baseline and plan.reap is None:
            raise fail("eval", "baseline", "[eval] baseline evaluates the unpruned source model: without [reap] the "
                                           "evaluated GGUF is already of it")
        bad = [p for p in e.presets if p not in EVAL_PRESETS]
        if bad or not e.presets or len(set(e.presets)) != len(e.presets):
            raise fail("eval", "presets", f"[eval] presets must be distinct names from {', '.join(EVAL_PRESETS)}"
                                          + (f" (unknown: {', '.join(bad)})" if bad else ""))
    if plan.kld is not None:
        _check_kld(plan, fail)
    for key in ("seq_len", "batch_size"):
        if getattr(plan.data, key) < 1:
            raise fail("data", key, f"[data] {key} must be positive")
    if plan.launch is not None:
        _check_launch(plan, fail)
    elif plan.kd is not None and plan.kd.cpu_offload:
        raise fail("kd", "cpu_offload", "[kd] cpu_offload is for FSDP2, which runs under [launch]")
    _check_sizes(plan, fail)


def _check_lora(plan: Plan, fail: Callable[..., PlanError]) -> None:
    """[lora] trains after [kd], on targets it can serve the way the plan asks."""
    lo = plan.lora
    assert lo is not None
    if plan.kd is None:
        raise fail("lora", None, "[lora] trains adapters after Router-KD to its teacher cache: the plan needs [kd]")
    if not lo.targets or "experts" in lo.targets:
        raise fail("lora", "targets", "[lora] targets: routed experts are stored fused and cannot take adapters; "
                                      "choose from attn, attn_out, shared, dense")
    if lo.serve == "adapter" and (bad := [t for t in lo.targets if t not in LORA_GGUF_TARGETS]):
        raise fail("lora", "targets", f"[lora] serve = \"adapter\": llama.cpp applies no LoRA to {', '.join(bad)} "
                                      f"(q_a/q_b/kv_a/kv_b); use targets from {', '.join(LORA_GGUF_TARGETS)} or "
                                      "serve = \"merged\"")
    for key in ("rank", "steps", "batch_size"):
        if getattr(lo, key) < 1:
            raise fail("lora", key, f"[lora] {key} must be at least 1")
    if not lo.lr > 0 or not lo.alpha > 0 or (lo.gate_lr is not None and not lo.gate_lr > 0):
        raise fail("lora", None, "[lora] lr, gate_lr and alpha must be positive")
    if plan.launch is not None and lo.batch_size % plan.launch.world:
        raise fail("lora", "batch_size", f"[lora] batch_size {lo.batch_size} is not divisible by the "
                                         f"{plan.launch.world} ranks of [launch] (each takes an equal share)")


def _check_launch(plan: Plan, fail: Callable[..., PlanError]) -> None:
    la = plan.launch
    assert la is not None
    for key in ("nproc_per_node", "nnodes"):
        if getattr(la, key) < 1:
            raise fail("launch", key, f"[launch] {key} must be at least 1")
    if not 0 <= la.node_rank < la.nnodes:
        raise fail("launch", "node_rank", f"[launch] node_rank must be in 0..{la.nnodes - 1}")
    if la.nnodes > 1 and not la.rdzv_endpoint:
        raise fail("launch", "nnodes", "[launch] nnodes > 1 needs rdzv_endpoint (HOST:PORT of the rendezvous)")
    if plan.kd is not None and plan.kd.batch_size % la.world:
        raise fail("kd", "batch_size", f"[kd] batch_size {plan.kd.batch_size} is not divisible by the "
                                       f"{la.world} ranks of [launch] (each takes an equal share)")


def _check_sizes(plan: Plan, fail: Callable[..., PlanError]) -> None:
    """Size strings (spill thresholds) parse, before any work."""
    from glmgguf.units import parse_size

    for section, key in (("reap", "spill_threshold"), ("kd", "teacher_spill_threshold")):
        values = getattr(plan, section)
        try:
            if values is not None:
                parse_size(getattr(values, key))
        except ValueError as e:
            raise fail(section, key, f"[{section}] {key}: {e}") from None


def _check_draft(plan: Plan, fail: Callable[..., PlanError]) -> None:
    """[eval] MTP drafting: the evaluated GGUF must keep its MTP block; sane draft settings."""
    e = plan.eval
    assert e is not None
    if not e.draft_mtp:
        return
    g = next(g for g in plan.gguf if g.name == e.gguf)
    if g.mtp != "keep":
        raise fail("eval", "draft_mtp", f"[eval] draft_mtp needs the MTP block in the evaluated GGUF, but "
                                        f"[[gguf]] {g.name!r} has mtp = {g.mtp!r} (use mtp = \"keep\")")
    if e.draft_max < 1:
        raise fail("eval", "draft_max", "[eval] draft_max must be at least 1")
    if not 0.0 <= e.draft_p_min <= 1.0:
        raise fail("eval", "draft_p_min", "[eval] draft_p_min is a probability, 0 <= draft_p_min <= 1")


def _check_kld(plan: Plan, fail: Callable[..., PlanError]) -> None:
    """[kld]: outputs to score and llama-perplexity's limits."""
    k = plan.kld
    assert k is not None
    if all(g.mtp == "only" for g in plan.gguf):
        raise fail("kld", None, "[kld] scores the [[gguf]] outputs: the plan has none (other than MTP-only ones)")
    if k.ctx < 8:
        raise fail("kld", "ctx", "[kld] ctx must be at least 8")
    if k.chunks is not None and k.chunks < 1:
        raise fail("kld", "chunks", "[kld] chunks must be at least 1")
