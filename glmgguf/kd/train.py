"""Router-KD training: only the MoE routers of a (pruned) student learn, to match the unpruned teacher.

Trainable: the router gate matrix `mlp.gate.weight` [E, H] of every MoE layer, the MTP block's included (see
`glmgguf.kd.student` for how the MTP block runs and what it is distilled to); with `train_bias` also
`e_score_correction_bias`. Everything else (experts, attention, indexer, embeddings, norms, head) is frozen; for
GLM-5.2 the gates are ~0.016% of the parameters.

Loss: `glmgguf.kd.loss.sparse_kl` (KL(teacher || student) over the cached top-k plus one bucket for the remaining
mass), the mean over all positions of a batch (uniform weighting), plus `mtp_weight` times the same for the MTP
head. AdamW (no weight decay by default: decaying router rows toward zero would change routing by itself),
constant or cosine learning rate with linear warmup, gradient clipping, gradient checkpointing over the decoder
layers. Trainable gates are float32 master weights even when the model runs in BF16; the output stores them in the
checkpoint's dtype.

The correction bias in transformers is a buffer, and it only decides WHICH experts are selected (a top-k), so no
gradient reaches it. With `train_bias` it becomes a parameter with a straight-through gradient: the forward is
unchanged bit for bit, the backward treats the bias of each selected expert as part of that expert's score
(weights = gather(s) + gather(b - b.detach())), so the bias follows the mean gradient of its expert's score over
the tokens that chose it.

Checkpoints (trainable tensors, optimizer state, step, log) go to a work directory every `save_every` steps;
`resume` continues the latest one with the same result as an uninterrupted run. A non-finite loss or gradient
stops training and keeps the last good checkpoint. Under torchrun with `fsdp` the student is sharded over the ranks
and the global batch split across them (`glmgguf.kd.fsdp`; DCP checkpoints, resumable on any number of ranks).
The output is the student with only the trained tensors replaced (`glmgguf.kd.write.write_student`, verified),
a training log (JSON) and the loss curve (PNG).

One module of ~430 lines on purpose: the training loop and the state it carries (`_Training`) are one unit; the
settings and schedules are in `glmgguf.kd.options`, checkpoints in `glmgguf.kd.checkpoints`, sharding in
`glmgguf.kd.fsdp`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from glmgguf.dist import Dist
from glmgguf.kd.checkpoints import clear_work, latest_checkpoint, load_trainable, plot_curve, save_trainable
from glmgguf.kd.errors import KdError, NanLossError
from glmgguf.kd.loss import sparse_kl
from glmgguf.kd.options import TrainOptions, check_options, lr_at, rows_for_step
from glmgguf.kd.routers import free_routers
from glmgguf.kd.student import Student, parameter_counts, router_names
from glmgguf.kd.teacher import TeacherCache
from glmgguf.kd.write import WriteReport, checkpoint_digest, write_student

LOG_NAME = "kd_train_log.json"
CURVE_NAME = "kd_loss.png"


@dataclass
class TrainResult:
    out: Path
    log: dict
    write: WriteReport
    seconds: float
    resumed_from: int | None = None
    records: list[dict] = field(default_factory=list)


ProgressFn = Callable[[int, int, dict], None]


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------

def batch_losses(forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
                 batch: dict[str, torch.Tensor], mtp_weight: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total, trunk KL, MTP KL or None) of one batch, means over positions; `forward` is `Student.forward` (or
    its FSDP root)."""
    logits, mtp_logits = forward(batch["input_ids"])
    dev = logits.device
    tgt = {k: batch[k].to(dev) for k in ("topk_ids", "topk_logprobs", "rest_logprob")}
    trunk = sparse_kl(logits, tgt["topk_ids"], tgt["topk_logprobs"], tgt["rest_logprob"]).mean()
    if mtp_logits is None:
        return trunk, trunk, None
    d = mtp_logits.device
    mtp = sparse_kl(mtp_logits, tgt["topk_ids"][:, 1:].to(d), tgt["topk_logprobs"][:, 1:].to(d),
                    tgt["rest_logprob"][:, 1:].to(d)).mean()
    return trunk + mtp_weight * mtp.to(dev), trunk, mtp


def rank_rows(rows: list[int], dist: Dist | None) -> list[int]:
    """This rank's even share of a global batch's `rows` (all of them in one process)."""
    if dist is None:
        return rows
    per = dist.divide(len(rows), "--batch-size (the global batch)")
    return rows[dist.rank * per:(dist.rank + 1) * per]


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def _open_caches(student_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                 eval_cache: str | os.PathLike | None, data: list[str | os.PathLike] | None,
                 say: Callable[[str], None]) -> tuple[TeacherCache, TeacherCache | None, dict[int, list[int]]]:
    """The training cache (checked against the KD text and the student), the held-out cache, the keep-map."""
    cache = TeacherCache(cache_dir)
    if data:
        cache.check_text(data)
    keep_map = cache.check_student(student_dir)
    return cache, held_out_cache(eval_cache, student_dir, cache, say), keep_map


def held_out_cache(eval_cache: str | os.PathLike | None, student_dir: str | os.PathLike, cache: TeacherCache,
                   say: Callable[[str], None]) -> TeacherCache | None:
    """The `--eval-cache` measured during training, checked against the student's tokenizer (None without one)."""
    if eval_cache is None:
        return None
    held = TeacherCache(eval_cache)
    held.check_tokenizer(student_dir)
    if held.manifest["text"]["token_sha256"] == cache.manifest["text"]["token_sha256"]:
        say("note: the evaluation cache holds the same text as the training cache")
    return held


@dataclass
class _Training:
    """The student with free routers, its optimizer and the training record (steps, held-out evaluations)."""

    student: Student
    params: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    opts: TrainOptions
    cache: TeacherCache
    held: TeacherCache | None
    work: Path
    run_state: dict
    say: Callable[[str], None]
    names: list[str]  # the trained tensors
    counts: tuple[int, int]  # (trainable, total) parameters
    records: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    start: int = 0
    resumed_from: int | None = None
    dist: Dist | None = None  # FSDP over these ranks
    root: nn.Module | None = None  # the FSDP root (its forward is the student's)

    @classmethod
    def prepare(cls, student_dir: str | os.PathLike, opts: TrainOptions, cache: TeacherCache,
                held: TeacherCache | None, work: Path, say: Callable[[str], None],
                dist: Dist | None = None) -> _Training:
        """Load the student, free its routers (with `dist`: shard it) and set up AdamW (decay on gate weights
        only)."""
        student, params, root = _load_student(student_dir, opts, dist)
        layout = student.layout
        names = router_names(layout, mtp=student.mtp is not None, bias=opts.train_bias)
        shapes = {n: i.shape for n, i in student.reader.tensors.items()}
        n_train, n_total = parameter_counts(shapes, layout, mtp=student.mtp is not None, bias=opts.train_bias)
        say(f"trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.4f}%): "
            f"{len(names)} router tensors in {len(student.gates())} MoE layers"
            f"{' (MTP block included)' if student.mtp is not None else ''}")
        if sorted(params) != sorted(names):
            raise KdError(f"routers found in the model {sorted(params)} differ from the layout's {sorted(names)}")
        decay = [p for n, p in params.items() if n.endswith(".weight")]
        no_decay = [p for n, p in params.items() if not n.endswith(".weight")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.999))
        if opts.gradient_checkpointing:
            student.checkpoint_activations()
        student_id = checkpoint_digest(student_dir, router_names(layout, True, True))
        run_state = {"cache_id": cache.cache_id, "student": student_id, "options": opts.run_key()}
        return cls(student, params, opt, opts, cache, held, work, run_state, say, names, (n_train, n_total),
                   dist=dist, root=root)

    @property
    def main(self) -> bool:
        """Whether this process writes shared files (rank 0, or the only process)."""
        return self.dist is None or self.dist.main

    # -- checkpoints ------------------------------------------------------------------------------------------
    def begin(self, resume: bool, force: bool) -> None:
        """Continue the work directory's latest checkpoint (`resume`), or start at step 0 in a clean one."""
        ckpt = latest_checkpoint(self.work)
        if ckpt is not None and not resume and not force:
            raise KdError(f"{self.work} holds a checkpoint of an earlier run (step "
                          f"{json.loads((ckpt / 'state.json').read_text())['step']}): pass --resume to continue it, "
                          "or --force to start over")
        if resume and ckpt is not None:
            self._restore(ckpt)
        else:
            if resume:
                self.say(f"nothing to resume in {self.work}: starting at step 0")
            if self.dist is not None:
                self.dist.barrier()  # every rank has looked for a checkpoint before rank 0 clears them
            if self.main:
                clear_work(self.work, (CURVE_NAME,))
        if self.main:
            self.work.mkdir(parents=True, exist_ok=True)
        if self.dist is not None:
            self.dist.barrier()
        if self.start >= self.opts.steps:
            self.say(f"checkpoint is at step {self.start} >= --steps {self.opts.steps}: writing it")

    def _restore(self, ckpt: Path) -> None:
        st = json.loads((ckpt / "state.json").read_text())
        for key in ("cache_id", "student"):
            if st.get(key) != self.run_state[key]:
                what = "teacher cache" if key == "cache_id" else "student"
                raise KdError(f"checkpoint {ckpt} belongs to another {what}")
        if st.get("options") != self.run_state["options"]:
            diff = {k: (st["options"].get(k), v) for k, v in self.run_state["options"].items()
                    if st["options"].get(k) != v}
            raise KdError(f"checkpoint {ckpt} was made with other settings: {diff} (checkpoint, now)")
        load_trainable(ckpt, self.params, self.opt, self.root)
        self.start = self.resumed_from = int(st["step"])
        self.records = list(st.get("records", []))
        self.evals = list(st.get("evals", []))
        self.say(f"resumed from step {self.start} ({ckpt})")

    def save(self, step: int) -> None:
        state = {**self.run_state, "records": self.records, "evals": self.evals}
        save_trainable(self.work, step, self.params, self.opt, state, self.root, self.dist)

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained tensors, whole, on the CPU (with FSDP gathered on every rank: a collective)."""
        from glmgguf.kd.fsdp import full_tensor

        return {n: full_tensor(p) for n, p in self.params.items()}

    def batch_rows(self, step: int) -> list[int]:
        """The rows of `step`'s global batch this process computes (with FSDP its even share)."""
        return rank_rows(rows_for_step(step, len(self.cache), self.opts.batch_size, self.opts.seed), self.dist)

    def mean_over_ranks(self, values: list[torch.Tensor | None]) -> list[float | None]:
        """Batch means as floats; with FSDP the mean over the ranks' equal shares (the global batch's mean)."""
        present = [v.detach().float().reshape(()) for v in values if v is not None]
        t = torch.stack(present)
        if self.dist is not None:
            t = self.dist.all_reduce(t, "sum") / self.dist.world
        it = iter(t.tolist())
        return [None if v is None else next(it) for v in values]

    # -- steps ------------------------------------------------------------------------------------------------
    def measure(self, step: int) -> None:
        """KL and top-1 agreement on the held-out cache."""
        from glmgguf.kd.evaluate import evaluate_student

        assert self.held is not None
        res = evaluate_student(self.student, self.held, batch_size=self.opts.batch_size)
        self.evals.append({"step": step, "kl": res.kl, "top1": res.top1, "mtp_kl": res.mtp_kl})
        self.say(f"step {step}: eval-cache KL {res.kl:.5f}, top-1 agreement {res.top1:.4f}"
                 + (f", MTP KL {res.mtp_kl:.5f}" if res.mtp_kl is not None else ""))

    def step(self, step: int, last_saved: int | None) -> dict:
        """One optimizer step of 0-based `step`; a non-finite loss or gradient stops training."""
        opts = self.opts
        lr = lr_at(step, opts)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = self.cache.batch(self.batch_rows(step))
        total, trunk, mtp = batch_losses(self.root or self.student.forward, batch, opts.mtp_weight)
        loss, kl, mtp_kl = self.mean_over_ranks([total, trunk, mtp])
        if not math.isfinite(loss):
            kept = (f"the last good checkpoint (step {last_saved}) is kept in {self.work}; continue with --resume "
                    "and a lower --lr" if last_saved is not None else "no checkpoint was saved yet (--save-every)")
            raise NanLossError(f"loss is {loss} at step {step + 1}: training stopped; {kept}")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()),
                                               opts.grad_clip if opts.grad_clip > 0 else float("inf"))
        if isinstance(gnorm, DTensor):
            gnorm = gnorm.full_tensor()
        if not torch.isfinite(gnorm):
            kept = (f"the last good checkpoint (step {last_saved}) is kept in {self.work}" if last_saved is not None
                    else "no checkpoint was saved yet")
            raise NanLossError(f"gradient norm is {gnorm.item()} at step {step + 1}: training stopped; {kept}")
        self.opt.step()
        return {"step": step + 1, "loss": loss, "kl": kl, "lr": lr, "grad_norm": gnorm.item(), "mtp_kl": mtp_kl}

    def run(self, progress: ProgressFn | None) -> float:
        """Train from `start` to `opts.steps` (evaluating and checkpointing on schedule); seconds spent."""
        opts = self.opts
        evaluating = self.held is not None and opts.eval_every > 0
        if evaluating and not any(e["step"] == self.start for e in self.evals):
            self.measure(self.start)
        last_saved = self.start if self.resumed_from is not None else None
        self.student.train(True)
        t0 = time.perf_counter()
        for step in range(self.start, opts.steps):
            rec = self.step(step, last_saved)
            self.records.append(rec)
            if progress:
                progress(step + 1, opts.steps, rec)
            done = step + 1
            if evaluating and (done % opts.eval_every == 0 or done == opts.steps):
                self.student.train(False)
                self.measure(done)
                self.student.train(True)
            if opts.save_every and (done % opts.save_every == 0 or done == opts.steps):
                self.save(done)
                last_saved = done
            if opts.stop_after_step is not None and done == opts.stop_after_step:
                from glmgguf.runner import RunInterrupted

                raise RunInterrupted(f"stopped after step {done}")
        self.student.train(False)
        return time.perf_counter() - t0


def _load_student(student_dir: str | os.PathLike, opts: TrainOptions, dist: Dist | None
                  ) -> tuple[Student, dict[str, nn.Parameter], nn.Module | None]:
    """(student, HF name -> trainable router parameter, FSDP root or None): loaded whole in one process, shard by
    shard with `dist` (`glmgguf.kd.fsdp.load_sharded_student`)."""
    dtype = getattr(torch, opts.dtype)
    if dist is not None:
        from glmgguf.kd.fsdp import load_sharded_student

        student, root, params = load_sharded_student(student_dir, dtype, opts.mtp, opts.train_bias, dist,
                                                     opts.cpu_offload)
        return student, params, root
    student = Student(student_dir, dtype=dtype, device_map=opts.device_map, mtp=opts.mtp)
    return student, free_routers(student, opts.train_bias), None


def _log_doc(t: _Training, student_dir: str | os.PathLike, cache_dir: str | os.PathLike,
             eval_cache: str | os.PathLike | None, keep_map: dict[int, list[int]], train_s: float) -> dict:
    """The training log written beside the output checkpoint."""
    n_train, n_total = t.counts
    n_steps_run = t.opts.steps - t.start
    cache, held, student = t.cache, t.held, t.student
    return {
        "student": Path(student_dir).resolve().name,
        "teacher_cache": {"path": str(Path(cache_dir).resolve().name), "cache_id": cache.cache_id,
                          "top_k": cache.top_k, "seq_len": cache.seq_len, "sequences": len(cache),
                          "teacher": cache.teacher["name"]},
        "eval_cache": None if held is None else {"path": Path(eval_cache).resolve().name, "cache_id": held.cache_id},
        "options": dataclasses.asdict(t.opts),
        "trainable_parameters": n_train,
        "total_parameters": n_total,
        "trainable_fraction": n_train / n_total,
        "trained_tensors": t.names,
        "mtp": "trained with the MTP forward (target: teacher at t+1)" if student.mtp is not None else "not trained",
        "keep_map_layers": {str(k): len(v) for k, v in keep_map.items()},
        "resumed_from": t.resumed_from,
        "seconds_per_step": train_s / n_steps_run if n_steps_run > 0 else None,
        "threads": torch.get_num_threads(),
        "steps": t.records,
        "evals": t.evals,
    }


def _write_output(t: _Training, trained: dict[str, torch.Tensor], student_dir: str | os.PathLike, out: Path,
                  log_doc: dict, force: bool) -> WriteReport:
    """The student with only the `trained` tensors replaced (verified), its loss curve and the training log."""
    curve = t.work / CURVE_NAME
    plot_curve(log_doc, curve)
    t.say(f"writing {out} (only the {len(trained)} router tensors change) and verifying it")
    report = write_student(student_dir, out, trained, force=force, extra_files={CURVE_NAME: curve.read_bytes()},
                           metadata={"kd": json.dumps({"cache_id": t.cache.cache_id, "steps": t.opts.steps,
                                                       "lr": t.opts.lr}, separators=(",", ":"))})
    log_doc["write"] = {"tensors": report.n_tensors, "identical": report.identical, "replaced": report.replaced,
                        "changed": report.changed, "max_abs_change": report.max_abs_change}
    return report


def train_router(student_dir: str | os.PathLike, cache_dir: str | os.PathLike, out: str | os.PathLike,
                 options: TrainOptions | None = None, *, work_dir: str | os.PathLike | None = None,
                 resume: bool = False, force: bool = False, eval_cache: str | os.PathLike | None = None,
                 data: list[str | os.PathLike] | None = None, progress: ProgressFn | None = None,
                 log: Callable[[str], None] | None = None, dist: Dist | None = None) -> TrainResult | None:
    """Distill the routers of `student_dir` to the teacher of `cache_dir`; write the student to `out`.

    `work_dir` (default OUT.work) holds the periodic checkpoints; `resume` continues the latest. `eval_cache`: a
    held-out teacher cache measured every `eval_every` steps. `data`: the KD text files, checked against the
    cache's text hashes. `progress(step, steps, record)` after each step; `log(line)` for messages.
    With `dist` (torchrun) and `options.fsdp` every rank trains its share of each global batch on the sharded
    student; rank 0 writes the output and returns the result, the other ranks return None once it is written.
    """
    from glmgguf.io.atomic import check_output

    t0 = time.perf_counter()
    opts = options or TrainOptions()
    check_options(opts)
    dist = check_launch(opts, dist, eval_cache)
    main = dist is None or dist.main
    say = (log or (lambda s: None)) if main else (lambda s: None)
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    inputs = [student_dir, cache_dir, *([eval_cache] if eval_cache is not None else []), *(data or [])]
    check_output(out, force, inputs)  # before the training, not when writing its result
    cache, held, keep_map = _open_caches(student_dir, cache_dir, eval_cache, data, say)
    if dist is not None:
        from glmgguf.dist import checkpoint_identity

        dist.same("student files", checkpoint_identity(student_dir))
        dist.same("teacher caches", cache.cache_id)
    t = _Training.prepare(student_dir, opts, cache, held, work, say, dist)
    t.begin(resume, force)
    train_s = t.run(progress if main else None)
    trained = t.trained()
    if not main:
        dist.barrier()  # rank 0 writes
        return None
    log_doc = _log_doc(t, student_dir, cache_dir, eval_cache, keep_map, train_s)
    report = _write_output(t, trained, student_dir, out, log_doc, force)
    log_doc["seconds"] = round(time.perf_counter() - t0, 2)
    (out / LOG_NAME).write_text(json.dumps(log_doc, indent=1) + "\n")
    clear_work(work, (CURVE_NAME,))
    if dist is not None:
        dist.barrier()
    return TrainResult(out, log_doc, report, time.perf_counter() - t0, t.resumed_from, t.records)


def check_launch(opts: TrainOptions, dist: Dist | None, eval_cache: str | os.PathLike | None,
                  command: str = "train") -> Dist | None:
    """The process group training uses (None: one process); refuses launches that would not train as asked
    (`command`: the `kd` subcommand, for the message)."""
    if opts.fsdp and dist is None:
        raise KdError("--fsdp shards the student over the ranks of a torchrun launch: "
                      f"torchrun --nproc-per-node N -m glmgguf kd {command} ... --fsdp")
    if dist is None:
        return None
    if not opts.fsdp:
        if dist.world > 1:
            raise KdError(f"launched with {dist.world} ranks but without --fsdp: every rank would train the whole "
                          "student alone; pass --fsdp")
        return None
    if eval_cache is not None:
        raise KdError("--eval-cache is not supported with --fsdp: measure the output with `glmgguf kd eval`")
    dist.divide(opts.batch_size, "--batch-size (the global batch)")
    return dist
