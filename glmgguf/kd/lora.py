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
`glmgguf.kd.write.write_student`; W + scaling * B @ A in the model's dtype, as PEFT merges; an adapted block-FP8
weight is merged into its dequantized value and stored BF16).

Under `torchrun ... -m glmgguf kd lora ... --fsdp` the student is sharded as Router-KD shards it
(`glmgguf.kd.fsdp.materialize`): built on the meta device, the adapters injected there (their initial values kept
as one process draws them, `attach_meta_adapters`), then sharded with FSDP2: every adapter matrix (`lora_A` [r, in],
`lora_B` [out, r]) and every co-trained gate copy [E, H] is its own float32 unit (master weights, gradients and
their reduction in float32) inside its decoder layer's unit, which stays in the model's dtype; each rank reads only
its rows of the checkpoint. The global batch is split evenly across the ranks and FSDP averages the gradients, so a
step is one process's step (on 1 rank bit for bit; on N ranks up to the order of the sums). Checkpoints are DCP
directories, resumable on any number of ranks (with --fsdp). After training the adapters are gathered whole on
every rank (they are small) and rank 0 writes the adapter directory and the merged checkpoint.
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
from torch import nn

from glmgguf.choices import LORA_TARGETS
from glmgguf.dist import Dist
from glmgguf.kd.checkpoints import clear_work, latest_checkpoint, load_trainable, save_trainable
from glmgguf.kd.errors import KdError, NanLossError
from glmgguf.kd.options import TrainOptions, check_options, lr_at, rows_for_step
from glmgguf.kd.student import Student, router_names
from glmgguf.kd.teacher import TeacherCache
from glmgguf.kd.train import ProgressFn, batch_losses, check_launch, held_out_cache, rank_rows
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
    model: object  # the trained PeftModel (sharded over the ranks with FSDP)


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
    if opts.train.train_bias:
        raise KdError("LoRA-KD trains without the correction bias: drop --train-bias")


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


def attach_meta_adapters(student: Student, opts: LoraOptions) -> tuple[Any, dict[str, torch.Tensor]]:
    """`attach_adapters` on a student built on the meta device. PEFT initialises every adapter on the CPU, then
    moves it to its base layer's device and dtype (meta: the values are dropped) and back to float32. Returns the
    PEFT model and trunk name -> initial value of each adapter, whole, as one process initialises it."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    created: dict[nn.Module, dict[str, torch.Tensor]] = {}

    def keep(module: nn.Module, name: str, param: torch.Tensor | None) -> None:
        if param is not None and not param.is_meta:
            created.setdefault(module, {}).setdefault(name, param)

    handle = register_module_parameter_registration_hook(keep)
    try:
        peft_model = attach_adapters(student, opts)
    finally:
        handle.remove()
    dtype = getattr(torch, opts.train.dtype)
    return peft_model, {f"{m}.{n}": created[mod][n].detach().to(dtype).to(p.dtype)
                        for m, mod in student.model.named_modules() for n, p in mod.named_parameters(recurse=False)
                        if p.requires_grad and n in created.get(mod, {})}


def checkpoint_name(name: str) -> str:
    """The checkpoint's name of a PEFT-wrapped module's tensor (`...q_a_proj.base_layer.weight` ->
    `...q_a_proj.weight`; a co-trained gate's copy reads the gate)."""
    for part in (".base_layer.", ".original_module.", ".modules_to_save.default."):
        name = name.replace(part, ".")
    return name


def load_sharded_lora(student_dir: str | os.PathLike, opts: LoraOptions, dist: Dist) -> tuple[Student, Any, nn.Module]:
    """The student built on the meta device, adapters injected, sharded over the ranks (each adapter and gate
    copy its own float32 FSDP unit, `glmgguf.kd.fsdp.materialize`) and filled: (student, PEFT model, FSDP root)."""
    from glmgguf.kd.fsdp import materialize

    dtype = getattr(torch, opts.train.dtype)
    student = Student(student_dir, dtype=dtype, mtp=False, meta=True)
    student.model.config._name_or_path = str(student_dir)  # as a whole load names it (the adapter's base model)
    for gate in student.gates().values():  # a whole load keeps them in float32 (_keep_in_fp32_modules_strict)
        gate.weight = nn.Parameter(gate.weight.float(), requires_grad=False)
    peft_model, init = attach_meta_adapters(student, opts)
    root = materialize(student, dtype, dist, opts.train.cpu_offload, values=init, rename=checkpoint_name)
    return student, peft_model, root


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
    """The adapters' optimizer and step record, checkpointed to `work` in Router-KD's checkpoint format (DCP when
    sharded over the ranks of `dist`)."""

    peft_model: Any
    opt: torch.optim.AdamW
    work: Path
    state: dict  # what a resumed run must share: cache, student, settings
    records: list[dict] = field(default_factory=list)
    start: int = 0
    dist: Dist | None = None
    root: nn.Module | None = None  # the FSDP root (its forward is the student's)
    held: TeacherCache | None = None  # measured every `eval_every` steps (`--eval-cache`)
    evals: list[dict] = field(default_factory=list)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}

    @property
    def main(self) -> bool:
        """Whether this process writes shared files (rank 0, or the only process)."""
        return self.dist is None or self.dist.main

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def begin(self, resume: bool, force: bool, say: Callable[[str], None]) -> None:
        """Continue the latest checkpoint in `work` (`resume`), or start at step 0 in a clean one."""
        ckpt = latest_checkpoint(self.work)
        if ckpt is not None and not resume and not force:
            raise KdError(f"{self.work} holds a checkpoint of an earlier run: pass --resume to continue it, or "
                          "--force to start over")
        if not resume or ckpt is None:
            self.barrier()  # every rank has looked for a checkpoint before rank 0 clears them
            if self.main:
                clear_work(self.work)
            self.barrier()
            return
        st = json.loads((ckpt / "state.json").read_text())
        if {k: st.get(k) for k in self.state} != self.state:
            raise KdError(f"checkpoint {ckpt} belongs to another student, teacher cache or settings")
        load_trainable(ckpt, self.params, self.opt, self.root)
        self.start, self.records, self.evals = int(st["step"]), list(st["records"]), list(st.get("evals", []))
        say(f"resumed from step {self.start} ({ckpt})")

    def save(self, step: int) -> None:
        save_trainable(self.work, step, self.params, self.opt,
                       {**self.state, "records": self.records, "evals": self.evals}, self.root, self.dist)

    def measure(self, student: Student, step: int, batch_size: int, say: Callable[[str], None]) -> None:
        """KL and top-1 agreement of the adapted student on the held-out cache."""
        from glmgguf.kd.evaluate import evaluate_student

        assert self.held is not None
        res = evaluate_student(student, self.held, batch_size=batch_size)
        self.evals.append({"step": step, "kl": res.kl, "top1": res.top1})
        say(f"step {step}: eval-cache KL {res.kl:.5f}, top-1 agreement {res.top1:.4f}")

    def mean(self, t: torch.Tensor) -> float:
        """A scalar of this rank's share as a float; sharded, the mean over the ranks' equal shares."""
        from glmgguf.kd.fsdp import full_tensor

        t = full_tensor(t).reshape(1)
        return float(t if self.dist is None else self.dist.all_reduce(t, "sum") / self.dist.world)


def _new_run(peft_model, student_dir: str | os.PathLike, layout: GlmLayout, cache: TeacherCache, opts: LoraOptions,
             work: Path, dist: Dist | None, root: nn.Module | None) -> _Run:
    """The run's optimizer and identity (teacher cache, student, the settings a resumed run must share)."""
    state = {"cache_id": cache.cache_id, "student": checkpoint_digest(student_dir, router_names(layout, True, True)),
             "options": json.loads(json.dumps(asdict(opts) | {"train": opts.train.run_key()}))}
    return _Run(peft_model, _optimizer(peft_model, opts.train.lr, opts.gate_lr, opts.train.weight_decay), work, state,
                dist=dist, root=root)


def _train(student: Student, run: _Run, cache: TeacherCache, opts: TrainOptions, progress: ProgressFn | None,
           say: Callable[[str], None]) -> float:
    """Train the adapters (and gates) from `run.start`, each rank its share of every global batch, measuring the
    held-out cache every `eval_every` steps (and before and after); returns the seconds per step (measurements
    left out)."""
    from glmgguf.kd.fsdp import full_tensor

    params = list(run.params.values())
    last_saved = run.start or None
    evaluating = run.held is not None and opts.eval_every > 0
    if evaluating and run.start == 0:
        run.measure(student, 0, opts.batch_size, say)
    student.train(True)
    t0, measuring = time.perf_counter(), 0.0
    for step in range(run.start, opts.steps):
        lr = lr_at(step, opts)
        for g in run.opt.param_groups:
            g["lr"] = lr * g["scale"]
        batch = cache.batch(rank_rows(rows_for_step(step, len(cache), opts.batch_size, opts.seed), run.dist))
        loss, _, _ = batch_losses(run.root or student.forward, batch, opts.mtp_weight)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip if opts.grad_clip > 0 else math.inf)
        loss_v, norm_v = run.mean(loss.detach()), float(full_tensor(norm))
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            kept = f"the checkpoint of step {last_saved} is kept in {run.work}" if last_saved else "nothing written"
            raise NanLossError(f"loss {loss_v}, gradient norm {norm_v} at step {step + 1}: training stopped, {kept}; "
                               "try a lower --lr")
        run.opt.step()
        run.records.append({"step": step + 1, "kl": loss_v, "lr": lr, "grad_norm": norm_v})
        if progress:
            progress(step + 1, opts.steps, run.records[-1])
        if evaluating and ((step + 1) % opts.eval_every == 0 or step + 1 == opts.steps):
            m0 = time.perf_counter()
            run.measure(student, step + 1, opts.batch_size, say)
            student.train(True)
            measuring += time.perf_counter() - m0
        _checkpoint(run, step + 1, opts)
        last_saved = step + 1 if opts.save_every and (step + 1) % opts.save_every == 0 else last_saved
    student.train(False)
    return (time.perf_counter() - t0 - measuring) / max(1, opts.steps - run.start)


def _checkpoint(run: _Run, done: int, opts: TrainOptions) -> None:
    """Save every `save_every` steps; stop after `stop_after_step` (a testing aid, as in Router-KD)."""
    if opts.save_every and (done % opts.save_every == 0 or done == opts.stop_after_step):
        run.save(done)
    if opts.stop_after_step is not None and done == opts.stop_after_step:
        from glmgguf.runner import RunInterrupted

        raise RunInterrupted(f"stopped after step {done}")


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapters' (and co-trained gates') entries of the PEFT model's state dict, whole on the CPU (sharded:
    gathered on every rank, a collective)."""
    from glmgguf.kd.fsdp import full_tensor

    return {k: full_tensor(v) for k, v in peft_model.state_dict().items()
            if ".lora_" in k or ".modules_to_save." in k}


def merged_tensors(adapter: dict[str, torch.Tensor], peft_model, student: Student,
                   opts: LoraOptions) -> dict[str, torch.Tensor]:
    """HF name -> merged weight W + scaling * B @ A (in the model's dtype, as PEFT merges it) of every adapted
    module, and the trained gates; from the `adapter_state` tensors and the checkpoint."""
    dtype = getattr(torch, opts.train.dtype)
    out = {}
    for m in target_modules(student.layout, opts.targets):
        key = f"base_model.model.{m}"
        a, b = adapter[f"{key}.lora_A.default.weight"], adapter[f"{key}.lora_B.default.weight"]
        delta = (b.float() @ a.float()) * peft_model.get_submodule(key).scaling["default"]
        out[f"{m}.weight"] = student.reader.get(f"{m}.weight").to(dtype) + delta.to(dtype)
    if opts.train_gates:
        out.update({f"{m}.weight": adapter[f"base_model.model.{m}.modules_to_save.default.weight"]
                    for m in gate_modules(student.layout)})
    return out


def _log_doc(peft_model, student_dir: str | os.PathLike, cache: TeacherCache, opts: LoraOptions, run: _Run,
             seconds_per_step: float) -> dict:
    n_train, n_total = peft_model.get_nb_trainable_parameters()
    held = None if run.held is None else {"path": run.held.path.resolve().name, "cache_id": run.held.cache_id}
    return {"student": Path(student_dir).resolve().name, "teacher_cache": cache.cache_id,
            "options": asdict(opts), "trainable_parameters": n_train, "total_parameters": n_total,
            "seconds_per_step": seconds_per_step, "steps": run.records, "eval_cache": held, "evals": run.evals}


def _load(student_dir: str | os.PathLike, opts: LoraOptions, dist: Dist | None
          ) -> tuple[Student, Any, nn.Module | None]:
    """(student, PEFT model, FSDP root or None): whole in one process, sharded with `dist`."""
    if dist is not None:
        student, peft_model, root = load_sharded_lora(student_dir, opts, dist)
    else:
        student = Student(student_dir, dtype=getattr(torch, opts.train.dtype), device_map=opts.train.device_map,
                          mtp=False)
        peft_model, root = attach_adapters(student, opts), None
    return student, peft_model, root


def train_lora(student_dir: str | os.PathLike, cache_dir: str | os.PathLike, out: str | os.PathLike,
               options: LoraOptions | None = None, *, merge: str | os.PathLike | None = None,
               work_dir: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
               progress: ProgressFn | None = None, log: Callable[[str], None] | None = None,
               dist: Dist | None = None, eval_cache: str | os.PathLike | None = None) -> LoraResult | None:
    """Train LoRA adapters (and optionally the gates) of `student_dir` to the teacher of `cache_dir`; write the
    PEFT adapter directory `out` and, with `merge`, the merged checkpoint there. `work_dir` (default OUT.work)
    holds the periodic checkpoints; `resume` continues the latest. With `dist` (torchrun) and `options.train.fsdp`
    every rank trains its share of each global batch on the sharded student; rank 0 writes the outputs and returns
    the result, the other ranks return None once they are written."""
    from glmgguf.io.atomic import check_output

    opts = options or LoraOptions()
    check_lora_options(opts)
    dist = check_launch(opts.train, dist, None, "lora")
    main = dist is None or dist.main
    say = (log or (lambda s: None)) if main else (lambda s: None)
    out = Path(out)
    if merge is not None and (Path(merge).resolve().is_relative_to(out.resolve())
                              or out.resolve().is_relative_to(Path(merge).resolve())):
        raise KdError(f"--merge {merge} and --out {out} must be separate folders (one would replace the other)")
    check_output(out, force, [student_dir, cache_dir])
    if merge is not None:
        check_output(Path(merge), force, [student_dir, cache_dir])
    cache = TeacherCache(cache_dir)
    cache.check_student(student_dir)
    if dist is not None:
        from glmgguf.dist import checkpoint_identity

        dist.same("student files", checkpoint_identity(student_dir))
        dist.same("teacher caches", cache.cache_id)
    student, peft_model, root = _load(student_dir, opts, dist)
    if opts.train.gradient_checkpointing:
        student.checkpoint_activations()
    n_train, n_total = peft_model.get_nb_trainable_parameters()
    say(f"trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.4f}%), rank {opts.rank} on "
        f"{','.join(opts.targets)}{' + router gates' if opts.train_gates else ''}")
    run = _new_run(peft_model, student_dir, student.layout, cache, opts,
                   Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work"), dist, root)
    if eval_cache is not None and dist is not None:
        raise KdError("--eval-cache is not supported with --fsdp: measure the adapter with `glmgguf kd eval "
                      "--adapter`")
    run.held = held_out_cache(eval_cache, student_dir, cache, say)
    run.begin(resume, force, say)
    per_step = _train(student, run, cache, opts.train, progress if main else None, say)
    adapter = adapter_state(peft_model)
    if not main:
        run.barrier()  # rank 0 writes
        return None
    doc = _log_doc(peft_model, student_dir, cache, opts, run, per_step)
    report = _write_outputs(peft_model, adapter, student, cache, opts, doc, out, merge, force, say)
    clear_work(run.work)
    run.barrier()
    return LoraResult(out, doc, report, per_step, peft_model)


def _write_outputs(peft_model, adapter: dict[str, torch.Tensor], student: Student, cache: TeacherCache,
                   opts: LoraOptions, doc: dict, out: Path, merge: str | os.PathLike | None, force: bool,
                   say: Callable[[str], None]) -> WriteReport | None:
    """The PEFT adapter directory `out` (with the training log) and, with `merge`, the merged checkpoint."""
    from glmgguf.io.atomic import atomic_dir

    inputs = [student.path, cache.path]
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        peft_model.save_pretrained(tmp, state_dict=adapter)
        (tmp / LOG_NAME).write_text(json.dumps(doc, indent=1) + "\n")
    say(f"wrote the adapter {out}")
    if merge is None:
        return None
    report = write_student(student.path, merge, merged_tensors(adapter, peft_model, student, opts), force=force,
                           metadata={"lora_kd": json.dumps({"cache_id": cache.cache_id, "rank": opts.rank})})
    say(f"wrote the merged checkpoint {merge}: {len(report.changed)} tensors changed, {report.identical} "
        "verified byte-identical to the student")
    return report
