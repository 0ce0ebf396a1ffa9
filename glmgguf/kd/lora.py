"""LoRA-KD: low-rank adapters on a pruned student, trained with Router-KD's loss to the cached teacher.

PEFT LoRA adapters go on the chosen linear modules of the trunk (`attn`: the MLA projections q_a/q_b/kv_a/kv_b/o
of every layer, the DSA indexer excluded; `attn_out`: o_proj alone, the one llama.cpp applies an adapter to;
`shared`: the shared expert of each MoE layer; `dense`: the MLP of the dense layers); with `train_gates` the MoE
router gates train beside them (PEFT `modules_to_save`, so the adapter directory restores them too). Everything
else is frozen. Routed experts are stored fused (one [E, 2I, H] tensor per layer), which PEFT's LoRA does not
adapt as per-expert linears: they are refused. The MTP block is not adapted (the trunk loss alone trains).

Loss and data are Router-KD's (`glmgguf.kd.train.batch_losses`: sparse KL to the cached teacher top-k;
`rows_for_step`, `lr_at`); checkpoints every `save_every` steps (`glmgguf.kd.checkpoints`), resumable with the
same result; a non-finite loss stops training. Outputs: the PEFT adapter directory
(`PeftModel.from_pretrained(student_model, OUT)`) with a training log, and optionally the merged checkpoint (the
student's layout and names, only the adapted weights and the gates changed, verified by
`glmgguf.kd.write.write_student`; adapted block-FP8 weights are merged into their dequantized values and stored
BF16).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from glmgguf.choices import LORA_TARGETS
from glmgguf.kd.checkpoints import clear_work, latest_checkpoint, save_checkpoint
from glmgguf.kd.errors import KdError, NanLossError
from glmgguf.kd.options import TrainOptions, check_options, lr_at, rows_for_step
from glmgguf.kd.student import Student, router_names
from glmgguf.kd.teacher import TeacherCache
from glmgguf.kd.train import ProgressFn, batch_losses
from glmgguf.kd.write import WriteReport, checkpoint_digest, write_student
from glmgguf.layout import GlmLayout, LayerKind

DEFAULT_TARGETS = ("attn", "shared")
ATTN_PROJ = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LOG_NAME = "lora_train_log.json"


@dataclass
class LoraOptions:
    """Router-KD's training settings (`train`) plus the adapter's."""

    train: TrainOptions = field(default_factory=lambda: TrainOptions(lr=1e-3, mtp=False))
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train_gates: bool = False
    gate_lr: float | None = None  # the gates' learning rate (None: the adapters'); routers like larger ones


@dataclass
class LoraResult:
    out: Path
    log: dict
    merged: WriteReport | None
    seconds_per_step: float
    model: object  # the trained PeftModel (merged into the student's trunk when `merge` was given)


def check_lora_options(opts: LoraOptions) -> None:
    """One clear error for settings LoRA-KD does not train as asked."""
    check_options(opts.train)
    unknown = sorted(set(opts.targets) - set(LORA_TARGETS))
    if unknown or not opts.targets:
        raise KdError(f"--target must be one or more of {', '.join(LORA_TARGETS)}, not {unknown or 'nothing'}")
    if "experts" in opts.targets:
        raise KdError("--target experts: the routed experts are stored fused per layer and PEFT LoRA does not adapt "
                      "them; adapt attn, shared or dense")
    if opts.gate_lr is not None and not (opts.gate_lr > 0 and math.isfinite(opts.gate_lr)):
        raise KdError(f"--gate-lr must be a positive number, not {opts.gate_lr}")
    if opts.rank < 1 or not opts.alpha > 0:
        raise KdError(f"--rank must be at least 1 and --alpha positive, not {opts.rank} and {opts.alpha}")
    if opts.train.fsdp or opts.train.train_bias:
        raise KdError("LoRA-KD trains in one process without the correction bias: drop --fsdp / --train-bias")


def target_modules(layout: GlmLayout, targets: tuple[str, ...]) -> list[str]:
    """Full module names of the trunk's linears that get adapters (the MTP block excluded)."""
    out: list[str] = []
    for x in layout.layers:
        if x.is_mtp:
            continue
        p = f"model.layers.{x.index}"
        if "attn" in targets:
            out += [f"{p}.self_attn.{m}" for m in ATTN_PROJ]
        elif "attn_out" in targets:
            out.append(f"{p}.self_attn.o_proj")
        if "shared" in targets and x.kind is LayerKind.MOE:
            out += [f"{p}.mlp.shared_experts.{m}" for m in MLP_PROJ]
        if "dense" in targets and x.kind is LayerKind.DENSE:
            out += [f"{p}.mlp.{m}" for m in MLP_PROJ]
    if not out:
        raise KdError(f"--target {','.join(targets)}: the student has no such modules")
    return out


def adapter_parameters(layout: GlmLayout, targets: tuple[str, ...], rank: int, train_gates: bool) -> int:
    """Trainable parameters of LoRA-KD: rank x (in + out) per adapted linear, plus [E, H] per trained gate."""
    shapes = layout.expected_hf_tensors()
    n = sum(rank * sum(shapes[f"{m}.weight"][:2]) for m in target_modules(layout, targets))
    return n + (sum(shapes[f"{g}.weight"][0] * layout.hidden_size for g in gate_modules(layout)) if train_gates else 0)


def gate_modules(layout: GlmLayout) -> list[str]:
    """Full module names of the trunk's MoE routers."""
    return [f"model.layers.{x.index}.mlp.gate" for x in layout.moe_layers if not x.is_mtp]


def attach_adapters(student: Student, opts: LoraOptions):
    """Wrap the student's trunk in a PEFT model (adapters initialised, the rest frozen); returns it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(opts.train.seed)
    config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=0.0, bias="none",
                        target_modules=target_modules(student.layout, opts.targets),
                        modules_to_save=gate_modules(student.layout) if opts.train_gates else None)
    peft_model = get_peft_model(student.model, config)
    student.model = peft_model.base_model.model  # the same module, with the adapters injected
    return peft_model


def _optimizer(peft_model, lr: float, gate_lr: float | None, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the adapters (group 0) and the co-trained gates (group 1, `gate_lr`); a group's "scale" is its
    learning rate relative to `lr`."""
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    gates = [p for n, p in named if "modules_to_save" in n]
    adapters = [p for n, p in named if "modules_to_save" not in n]
    groups = [{"params": adapters, "scale": 1.0}]
    if gates:
        groups.append({"params": gates, "scale": (gate_lr or lr) / lr})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


@dataclass
class _Run:
    """The adapters' optimizer and step record, checkpointed to `work` in Router-KD's checkpoint format."""

    peft_model: Any
    opt: torch.optim.AdamW
    work: Path
    state: dict  # what a resumed run must share: cache, student, settings
    records: list[dict] = field(default_factory=list)
    start: int = 0

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}

    def begin(self, resume: bool, force: bool, say: Callable[[str], None]) -> None:
        """Continue the latest checkpoint in `work` (`resume`), or start at step 0 in a clean one."""
        ckpt = latest_checkpoint(self.work)
        if ckpt is not None and not resume and not force:
            raise KdError(f"{self.work} holds a checkpoint of an earlier run: pass --resume to continue it, or "
                          "--force to start over")
        if not resume or ckpt is None:
            clear_work(self.work)
            return
        st = json.loads((ckpt / "state.json").read_text())
        if {k: st.get(k) for k in self.state} != self.state:
            raise KdError(f"checkpoint {ckpt} belongs to another student, teacher cache or settings")
        saved = load_file(str(ckpt / "trainable.safetensors"))
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(saved[n].to(p.device))
        self.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.start, self.records = int(st["step"]), list(st["records"])
        say(f"resumed from step {self.start} ({ckpt})")

    def save(self, step: int) -> None:
        save_checkpoint(self.work, step, self.params, self.opt, {**self.state, "records": self.records})


def _new_run(peft_model, student_dir: str | os.PathLike, layout: GlmLayout, cache: TeacherCache, opts: LoraOptions,
             work: Path) -> _Run:
    """The run's optimizer and identity (teacher cache, student, the settings a resumed run must share)."""
    state = {"cache_id": cache.cache_id, "student": checkpoint_digest(student_dir, router_names(layout, True, True)),
             "options": json.loads(json.dumps(asdict(opts) | {"train": opts.train.run_key()}))}
    return _Run(peft_model, _optimizer(peft_model, opts.train.lr, opts.gate_lr, opts.train.weight_decay), work, state)


def _train(student: Student, run: _Run, cache: TeacherCache, opts: TrainOptions,
           progress: ProgressFn | None) -> float:
    """Train the adapters (and gates) from `run.start`; returns the seconds per step."""
    params = list(run.params.values())
    last_saved = run.start or None
    student.train(True)
    t0 = time.perf_counter()
    for step in range(run.start, opts.steps):
        lr = lr_at(step, opts)
        for g in run.opt.param_groups:
            g["lr"] = lr * g["scale"]
        batch = cache.batch(rows_for_step(step, len(cache), opts.batch_size, opts.seed))
        loss, _, _ = batch_losses(student.forward, batch, opts.mtp_weight)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip if opts.grad_clip > 0 else math.inf)
        loss_v, norm_v = float(loss.detach()), float(norm)
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            kept = f"the checkpoint of step {last_saved} is kept in {run.work}" if last_saved else "nothing written"
            raise NanLossError(f"loss {loss_v}, gradient norm {norm_v} at step {step + 1}: training stopped, {kept}; "
                               "try a lower --lr")
        run.opt.step()
        run.records.append({"step": step + 1, "kl": loss_v, "lr": lr, "grad_norm": norm_v})
        if progress:
            progress(step + 1, opts.steps, run.records[-1])
        _checkpoint(run, step + 1, opts)
        last_saved = step + 1 if opts.save_every and (step + 1) % opts.save_every == 0 else last_saved
    student.train(False)
    return (time.perf_counter() - t0) / max(1, opts.steps - run.start)


def _checkpoint(run: _Run, done: int, opts: TrainOptions) -> None:
    """Save every `save_every` steps; stop after `stop_after_step` (a testing aid, as in Router-KD)."""
    if opts.save_every and (done % opts.save_every == 0 or done == opts.stop_after_step):
        run.save(done)
    if opts.stop_after_step is not None and done == opts.stop_after_step:
        from glmgguf.runner import RunInterrupted

        raise RunInterrupted(f"stopped after step {done}")


def merged_tensors(peft_model, student: Student, opts: LoraOptions) -> dict[str, torch.Tensor]:
    """HF name -> merged weight of every adapted module (and trained gate); merges the adapters in place."""
    gates = {f"{m}.weight": peft_model.get_submodule(f"base_model.model.{m}").modules_to_save["default"].weight
             for m in gate_modules(student.layout)} if opts.train_gates else {}
    gates = {n: w.detach().clone() for n, w in gates.items()}
    base = peft_model.merge_and_unload()
    student.model = base
    out = {f"{m}.weight": base.get_submodule(m).weight.detach().clone()
           for m in target_modules(student.layout, opts.targets)}
    return {**out, **gates}


def _log_doc(peft_model, student_dir: str | os.PathLike, cache: TeacherCache, opts: LoraOptions,
             records: list[dict], seconds_per_step: float) -> dict:
    n_train, n_total = peft_model.get_nb_trainable_parameters()
    return {"student": Path(student_dir).resolve().name, "teacher_cache": cache.cache_id,
            "options": asdict(opts), "trainable_parameters": n_train,
            "total_parameters": n_total, "seconds_per_step": seconds_per_step, "steps": records}


def train_lora(student_dir: str | os.PathLike, cache_dir: str | os.PathLike, out: str | os.PathLike,
               options: LoraOptions | None = None, *, merge: str | os.PathLike | None = None,
               work_dir: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
               progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> LoraResult:
    """Train LoRA adapters (and optionally the gates) of `student_dir` to the teacher of `cache_dir`; write the
    PEFT adapter directory `out` and, with `merge`, the merged checkpoint there. `work_dir` (default OUT.work)
    holds the periodic checkpoints; `resume` continues the latest."""
    from glmgguf.io.atomic import atomic_dir, check_output

    opts = options or LoraOptions()
    check_lora_options(opts)
    say = log or (lambda s: None)
    out = Path(out)
    check_output(out, force, [student_dir, cache_dir])
    if merge is not None:
        check_output(Path(merge), force, [student_dir, cache_dir])
    cache = TeacherCache(cache_dir)
    cache.check_student(student_dir)
    student = Student(student_dir, dtype=getattr(torch, opts.train.dtype), device_map=opts.train.device_map,
                      mtp=False)
    peft_model = attach_adapters(student, opts)
    n_train, n_total = peft_model.get_nb_trainable_parameters()
    say(f"trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.4f}%), rank {opts.rank} on "
        f"{','.join(opts.targets)}{' + router gates' if opts.train_gates else ''}")
    run = _new_run(peft_model, student_dir, student.layout, cache, opts,
                   Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work"))
    run.begin(resume, force, say)
    per_step = _train(student, run, cache, opts.train, progress)
    doc = _log_doc(peft_model, student_dir, cache, opts, run.records, per_step)
    with atomic_dir(out, force=force, inputs=[student_dir, cache_dir]) as tmp:
        peft_model.save_pretrained(tmp)
        (tmp / LOG_NAME).write_text(json.dumps(doc, indent=1) + "\n")
    say(f"wrote the adapter {out}")
    report = None
    if merge is not None:
        report = write_student(student_dir, merge, merged_tensors(peft_model, student, opts), force=force,
                               metadata={"lora_kd": json.dumps({"cache_id": cache.cache_id, "rank": opts.rank})})
        say(f"wrote the merged checkpoint {merge}: {len(report.changed)} tensors changed, {report.identical} "
            "verified byte-identical to the student")
    clear_work(run.work)
    return LoraResult(out, doc, report, per_step, peft_model)
