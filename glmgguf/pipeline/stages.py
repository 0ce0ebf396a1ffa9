"""The plan as a chain of stages, each one `glmgguf` command writing into its own directory under the workdir.

observe -> prune -> teacher -> kd -> lora (-> lora-gguf) -> gguf-NAME ... -> nvfp4 -> kld-reference -> kld -> eval
(-> baseline-gguf -> eval-baseline-PRESET ...) (-> variant-LABEL-gguf, eval-LABEL-PRESET, heldout-kl-LABEL ... ->
variants-report). The command line of each stage is the stage's settings: the runner fingerprints it
together with the stage's inputs to decide what to redo.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from glmgguf.pipeline.inputs import EVAL_PROMPT_SETS
from glmgguf.pipeline.plan import DataSection, EvalSection, GgufOutput, Plan, ReapSection


@dataclass
class Stage:
    """One step: `glmgguf ARGS...`, reading `inputs`, writing `output` (inside `dir`)."""

    name: str
    dir: Path
    args: list[str]
    output: Path
    inputs: dict[str, Path] = field(default_factory=dict)  # label -> file or directory it reads
    after: list[str] = field(default_factory=list)  # earlier stages whose outputs it reads
    what: str = ""
    output_dir_first: bool = False  # the runner creates `output` (a directory) for the command to write into
    launcher: list[str] = field(default_factory=list)  # torchrun's arguments when it runs on every rank

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"


def _torchrun(plan: Plan) -> list[str]:
    """torchrun's arguments for a stage run on every rank of [launch] (none for one process)."""
    la = plan.launch
    if la is None or la.world == 1:
        return []
    if la.nnodes == 1:
        return ["--standalone", "--nproc-per-node", str(la.nproc_per_node)]
    return ["--nnodes", str(la.nnodes), "--node-rank", str(la.node_rank), "--nproc-per-node",
            str(la.nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(la.rdzv_endpoint)]


def _threads(plan: Plan) -> list[str]:
    return ["--threads", str(plan.threads)] if plan.threads else []


def _text_args(paths: list[Path], d: DataSection, samples: int | None) -> list[str]:
    """--data FILE... and the packing options of a pass over text ([data] settings)."""
    return [*[a for p in paths for a in ("--data", str(p))], "--seq-len", str(d.seq_len),
            *(["--num-samples", str(samples)] if samples else []), "--batch-size", str(d.batch_size),
            "--text-field", d.text_field]


def _texts(paths: list[Path]) -> dict[str, Path]:
    return {f"data:{p.name}": p for p in paths}


@dataclass
class _Chain:
    """What the stage builders share: the plan, its inputs, and the checkpoint the next stage reads (`final`,
    written by the stages `after`; the source model until a stage rewrites it); `adapter`: the llama.cpp LoRA
    adapter GGUF the final model is served with (and the stage writing it), when [lora] serves one."""

    plan: Plan
    model: Path
    data: dict[str, list[Path]]
    final: Path
    after: list[str] = field(default_factory=list)
    adapter: tuple[Path, str] | None = None

    @property
    def workdir(self) -> Path:
        return self.plan.workdir

    @property
    def stats(self) -> Path:
        """The observe stage's statistics (pruning and NVFP4 input scales read them)."""
        return self.workdir / "observe" / "stats.safetensors"

    def final_inputs(self) -> dict[str, Path]:
        """The source model as a fingerprinted input (a later checkpoint is an earlier stage's output)."""
        return {} if self.after else {"model": self.final}

    def produced(self, stage: Stage) -> Stage:
        """`stage` rewrites the checkpoint: later stages read its output."""
        self.final, self.after = stage.output, [stage.name]
        return stage


def build_stages(plan: Plan, model: Path, data: dict[str, list[Path]], recipes: dict[str, str],
                 prompts: str | None, kld_text: Path | None = None) -> list[Stage]:
    """The stages of `plan` for the source checkpoint `model`, text files `data` and resolved recipe refs
    (`kld_text`: the [kld] text file)."""
    c = _Chain(plan, model, data, model)
    stages = [*_observe_stages(c), *_prune_stages(c), *_kd_stages(c), *_lora_stages(c)]
    ggufs = [_gguf_stage(c, g, recipes[g.name]) for g in plan.gguf]
    stages += [*ggufs, *_nvfp4_stages(c), *_kld_stages(c, ggufs, kld_text)]
    evals = _eval_stages(c, prompts, recipes, ggufs)
    return stages + evals + _variant_stages(c, prompts, recipes, ggufs, evals)


def _observe_stages(c: _Chain) -> list[Stage]:
    """REAP statistics of the calibration text (pruning and NVFP4 input scales need them)."""
    if not c.plan.observes:
        return []
    d, r, w = c.plan.data, c.plan.reap or ReapSection(), c.workdir
    args = ["reap", "observe", str(c.model), *_text_args(c.data["calibration"], d, d.calibration_samples),
            "--out", str(c.stats), "--dtype", r.dtype, "--device", r.device]
    if r.streaming:
        args += ["--streaming", "--work-dir", str(w / "observe" / "work"), "--spill-threshold", r.spill_threshold]
    return [Stage("observe", w / "observe", args, c.stats, {"model": c.model, **_texts(c.data["calibration"])},
                  what="REAP statistics on the calibration text", launcher=_torchrun(c.plan))]


def _prune_stages(c: _Chain) -> list[Stage]:
    r = c.plan.reap
    if r is None:
        return []
    out = c.workdir / "prune" / "model"
    count = ["--keep", str(r.keep)] if r.keep is not None else ["--ratio", str(r.ratio)]
    args = ["reap", "prune", str(c.model), "--stats", str(c.stats), *count, "--per-layer", r.per_layer,
            "--metric", r.metric, "--out", str(out)]
    return [c.produced(Stage("prune", c.workdir / "prune", args, out, {"model": c.model}, ["observe"],
                             what="pruned checkpoint"))]


def _teacher_stage(c: _Chain, name: str, paths: list[Path], samples: int | None, what: str) -> Stage:
    """A teacher cache of the unpruned model over `paths`."""
    k, w = c.plan.kd, c.workdir
    assert k is not None
    cache = w / name / "cache"
    args = ["kd", "teacher", str(c.model), *_text_args(paths, c.plan.data, samples), "--out", str(cache),
            "--top-k", str(k.top_k), "--device", k.teacher_device, *_threads(c.plan)]
    if k.teacher_streaming:
        args += ["--streaming", "--work-dir", str(w / name / "work"), "--spill-threshold",
                 k.teacher_spill_threshold]
    return Stage(name, w / name, args, cache, {"model": c.model, **_texts(paths)}, what=what,
                 launcher=_torchrun(c.plan))


def _kd_stages(c: _Chain) -> list[Stage]:
    """The teacher cache(s) and the router-distilled student."""
    k, d, w = c.plan.kd, c.plan.data, c.workdir
    if k is None:
        return []
    teacher = _teacher_stage(c, "teacher", c.data["kd"], d.kd_samples, "teacher top-k cache of the KD text")
    out = w / "kd" / "model"
    args = ["kd", "train", str(c.final), "--teacher-cache", str(teacher.output), "--out", str(out),
            "--lr", str(k.lr), "--steps", str(k.steps), "--batch-size", str(k.batch_size),
            "--schedule", k.schedule, "--warmup", str(k.warmup), "--dtype", k.dtype,
            "--device-map", k.device_map, "--save-every", str(k.save_every), "--resume",
            "--work-dir", str(w / "kd" / "work"), *[a for p in c.data["kd"] for a in ("--data", str(p))],
            *_threads(c.plan)]
    if k.train_bias:
        args.append("--train-bias")
    launcher = _torchrun(c.plan)
    if launcher:
        args += ["--fsdp", *(["--cpu-offload"] if k.cpu_offload else [])]
    stages = [teacher]
    heldout = c.data.get("heldout") or []
    if heldout:
        stages.append(_teacher_stage(c, "teacher-heldout", heldout, d.heldout_samples,
                                     "teacher cache of the held-out text (KD is measured on it)"))
        if not launcher:  # with FSDP the held-out cache is measured after training (`kd eval`), not during it
            args += ["--eval-cache", str(stages[-1].output), "--eval-every", str(max(1, k.steps // 4))]
    after = [*c.after, *(s.name for s in stages)]
    stages.append(c.produced(Stage("kd", w / "kd", args, out, _texts(c.data["kd"]), after,
                                   what="router-distilled checkpoint", launcher=launcher)))
    return stages


def _lora_stages(c: _Chain) -> list[Stage]:
    """LoRA-KD of the Router-KD checkpoint to the same teacher cache: `lora/out/adapter` (PEFT), and either the
    merged checkpoint `lora/out/model` (read by every later stage) or the adapter as a llama.cpp adapter GGUF that
    the GGUF outputs of the Router-KD checkpoint are served with."""
    lo, w = c.plan.lora, c.workdir
    if lo is None:
        return []
    out = w / "lora" / "out"
    args = ["kd", "lora", str(c.final), "--teacher-cache", str(w / "teacher" / "cache"), "--out", str(out / "adapter"),
            "--target", ",".join(lo.targets), "--rank", str(lo.rank), "--alpha", str(lo.alpha), "--lr", str(lo.lr),
            "--steps", str(lo.steps), "--batch-size", str(lo.batch_size), "--schedule", lo.schedule,
            "--warmup", str(lo.warmup), "--dtype", lo.dtype, "--device-map", lo.device_map,
            "--save-every", str(lo.save_every), "--resume", "--work-dir", str(w / "lora" / "work"), *_threads(c.plan)]
    if lo.train_gates:
        args += ["--train-gates", *(["--gate-lr", str(lo.gate_lr)] if lo.gate_lr is not None else [])]
    merged = lo.serve == "merged"
    if merged:
        args += ["--merge", str(out / "model")]
    launcher = _torchrun(c.plan)
    if launcher:
        args += ["--fsdp", *(["--cpu-offload"] if c.plan.kd and c.plan.kd.cpu_offload else [])]
    after = [*c.after, "teacher"]
    if c.data.get("heldout") and not launcher:  # with FSDP: measured after training (the variants' heldout-kl)
        args += ["--eval-cache", str(w / "teacher-heldout" / "cache"), "--eval-every", str(max(1, lo.steps // 4))]
        after.append("teacher-heldout")
    what = "LoRA adapters trained to the teacher" + (", merged into the checkpoint" if merged else "")
    train = Stage("lora", w / "lora", args, out, {}, after, what=what, output_dir_first=True, launcher=launcher)
    if merged:
        c.final, c.after = out / "model", [train.name]
        return [train]
    gguf = w / "lora-gguf" / "adapter.gguf"
    write = Stage("lora-gguf", w / "lora-gguf", ["kd", "lora-gguf", str(out / "adapter"), str(gguf), "--base",
                                                 str(c.final)], gguf, {}, [train.name, *c.after],
                  what="the LoRA adapter as a llama.cpp adapter GGUF (llama-server --lora)")
    c.adapter = (gguf, write.name)
    return [train, write]


def _gguf_stage(c: _Chain, g: GgufOutput, recipe: str, name: str = "") -> Stage:
    """One [[gguf]] output (stage `name`, default gguf-NAME); a split one writes NAME-0000i-of-0000N.gguf files
    into its own directory."""
    w, threads, name = c.workdir, c.plan.threads, name or f"gguf-{g.name}"
    out = w / name / ("split" if g.split_max_size else "") / f"{g.name}.gguf"
    args = ["convert", str(c.final), str(out), "--recipe", recipe, "--mtp", g.mtp, "--indexer", g.indexer,
            *(["-t", str(threads)] if threads else [])]
    inputs = c.final_inputs()
    if g.imatrix is not None:
        args += ["--imatrix", str(g.imatrix)]
        inputs["imatrix"] = g.imatrix
    if recipe.endswith(".toml"):  # a recipe file of the user's (shipped ones are named)
        inputs["recipe"] = Path(recipe)
    if g.split_max_size:
        args += ["--split-max-size", g.split_max_size]
    return Stage(name, w / name, args, out.parent if g.split_max_size else out, inputs,
                 list(c.after), what=f"GGUF, recipe {g.recipe}", output_dir_first=bool(g.split_max_size))


def _nvfp4_stages(c: _Chain) -> list[Stage]:
    n, w = c.plan.nvfp4, c.workdir
    if n is None:
        return []
    out = w / "nvfp4" / "model"
    args = ["nvfp4", "export", str(c.final), str(out), "--format", n.format, "--device", n.device,
            "--max-shard-size", n.max_shard_size, *[a for e in n.exclude for a in ("--exclude", e)],
            *_threads(c.plan)]
    after = list(c.after)
    if c.plan.reap is None:  # a pruned checkpoint carries its statistics; the source model reads observe's
        args += ["--calib", str(c.stats)]
        after.append("observe")
    return [Stage("nvfp4", w / "nvfp4", args, out, c.final_inputs(), after, what=f"NVFP4 checkpoint ({n.format})")]


def _kld_stages(c: _Chain, ggufs: list[Stage], text: Path | None) -> list[Stage]:
    """The final checkpoint converted unquantized, then every GGUF output's KL divergence against it (a split
    output is scored from its first part; an MTP-only one, which cannot predict alone, is not)."""
    k, w = c.plan.kld, c.workdir
    if k is None or text is None:
        return []
    ggufs = [s for s, g in zip(ggufs, c.plan.gguf, strict=True) if g.mtp != "only"]
    ref = _gguf_stage(c, GgufOutput(f"unquantized-{k.reference}", k.reference, mtp="drop"), k.reference,
                      "kld-reference")
    ref.what = f"unquantized {k.reference.upper()} GGUF of the final checkpoint (the KLD reference)"
    out = w / "kld" / "kld.json"
    args = ["kld", str(ref.output), *(str(s.output) for s in ggufs), "--text", str(text), "--ctx", str(k.ctx),
            *(["--chunks", str(k.chunks)] if k.chunks else []), *_threads(c.plan),
            "--logits", str(w / "kld" / "reference-logits.bin"), "--json", str(out)]
    return [ref, Stage("kld", w / "kld", args, out, {"text": text}, [ref.name, *(s.name for s in ggufs)],
                       what=f"KL divergence of {len(ggufs)} GGUF output(s) against the reference")]


def _eval_run_stage(c: _Chain, e: EvalSection, preset: str, prompts: str, gguf: Stage, name: str,
                    adapter: tuple[Path, str] | None = None, label: str = "") -> Stage:
    """One loop evaluation (stage `name`) of the GGUF stage `gguf`'s output under sampler `preset` (with the LoRA
    adapter GGUF `adapter` and the stage writing it), written to `[LABEL-]PRESET.json`."""
    w = c.workdir
    out = w / name / f"{label + '-' if label else ''}{preset}.json"  # compare labels each run by its file name
    args = ["eval", "loops", "--gguf", str(gguf.output), "--prompts", prompts, "--out", str(out), "--preset", preset,
            "--parallel", str(e.parallel), "--safety-cap", str(e.safety_cap), "--seed", str(e.seed), "--quiet",
            *_threads(c.plan)]
    for key in ("ctx", "temperature", "limit"):
        if getattr(e, key) is not None:
            args += [f"--{key}", str(getattr(e, key))]
    if e.draft_mtp:
        args += ["--draft-mtp", "--draft-max", str(e.draft_max), "--draft-p-min", str(e.draft_p_min)]
    after = [gguf.name]
    if adapter is not None:
        args += ["--lora", str(adapter[0])]
        after.append(adapter[1])
    inputs = {} if prompts in EVAL_PROMPT_SETS else {"prompts": Path(prompts)}
    what = (f"loop evaluation, sampler preset {preset}" + (", MTP drafting" if e.draft_mtp else "")
            + (", LoRA adapter" if adapter else ""))
    return Stage(name, w / name, args, out, inputs, after, what=what)


def _eval_stages(c: _Chain, prompts: str | None, recipes: dict[str, str], ggufs: list[Stage]) -> list[Stage]:
    """One evaluation per preset, then their comparison; with `baseline`, the same runs of the unpruned source
    model converted with the same recipe."""
    e = c.plan.eval
    if e is None or prompts is None:
        return []
    g = next(g for g in c.plan.gguf if g.name == e.gguf)
    gguf = next(s for s in ggufs if s.name == f"gguf-{g.name}")
    runs = [_eval_run_stage(c, e, preset, prompts, gguf, f"eval-{preset}", c.adapter) for preset in e.presets]
    report = c.workdir / "eval-report" / "report.md"
    args = ["eval", "compare", *(str(s.output) for s in runs), "--out", str(report),
            "--png", str(report.with_suffix(".png"))]
    stages = [*runs, Stage("eval-report", c.workdir / "eval-report", args, report, {}, [s.name for s in runs],
                           what="comparison of the evaluation runs")]
    if not e.baseline:
        return stages
    source = _Chain(c.plan, c.model, c.data, c.model)
    base = _gguf_stage(source, replace(g, imatrix=None), recipes[g.name], "baseline-gguf")
    base.what = f"the unpruned source model as GGUF, recipe {g.recipe}" + (", without the final model's imatrix"
                                                                          if g.imatrix else "")
    return [*stages, base, *(_eval_run_stage(c, e, p, prompts, base, f"eval-baseline-{p}") for p in e.presets)]


def _variants(c: _Chain, recipes: dict[str, str]) -> list[tuple[str, Stage | None, Path, str]]:
    """The checkpoints before the final one, each as (label, GGUF stage to add or None for the evaluated GGUF
    itself, checkpoint, the stage that wrote it): the pruned one and, when [lora] follows, the Router-KD one."""
    w, e = c.workdir, c.plan.eval
    assert e is not None
    g = next(g for g in c.plan.gguf if g.name == e.gguf)
    out = []
    for label, stage in (("pruned", "prune"), ("router-kd", "kd")):
        model = w / stage / "model"
        if model == c.final and c.adapter is None:
            break
        chain = _Chain(c.plan, c.model, c.data, model, [stage])
        gguf = None if model == c.final else _gguf_stage(chain, replace(g, imatrix=None), recipes[g.name],
                                                        f"variant-{label}-gguf")
        if gguf is not None:
            gguf.what = f"the {label} checkpoint as GGUF, recipe {g.recipe} (compared with the final model)"
        out.append((label, gguf, model, stage))
    return out


def _variant_stages(c: _Chain, prompts: str | None, recipes: dict[str, str], ggufs: list[Stage],
                    evals: list[Stage]) -> list[Stage]:
    """[eval] variants: the same loop runs of the pruned and Router-KD checkpoints (before [lora]), with held-out text
    every checkpoint's KL to the teacher on it (`heldout-kl-LABEL`), and their comparison with the final model's
    runs and the unpruned baseline's (`evals`)."""
    e, w = c.plan.eval, c.workdir
    if e is None or prompts is None or not e.variants:
        return []
    final = next(s for s in ggufs if s.name == f"gguf-{e.gguf}")
    by_name = {s.name: s for s in evals}
    runs: dict[str, dict[str, Stage]] = {}  # label -> preset -> evaluation stage, in the report's order
    if e.baseline:
        runs["unpruned"] = {p: by_name[f"eval-baseline-{p}"] for p in e.presets}
    stages: list[Stage] = []
    models: list[tuple[str, Path, Path | None, str]] = []
    for label, gguf, model, made_by in _variants(c, recipes):
        runs[label] = {p: _eval_run_stage(c, e, p, prompts, gguf or final, f"eval-{label}-{p}", label=label)
                       for p in e.presets}
        stages += [*([gguf] if gguf else []), *runs[label].values()]
        models.append((label, model, None, made_by))
    last = "lora" if c.plan.lora is not None else "router-kd"
    runs[last] = {p: by_name[f"eval-{p}"] for p in e.presets}
    models.append((last, c.final, w / "lora" / "out" / "adapter" if c.adapter else None,
                   "lora" if c.plan.lora is not None else "kd"))
    kls = [_heldout_kl_stage(c, *m) for m in models] if c.data.get("heldout") else []
    return [*stages, *kls, _variants_report(c, runs, kls)]


def _variants_report(c: _Chain, runs: dict[str, dict[str, Stage]], kls: list[Stage]) -> Stage:
    """`eval compare` of every checkpoint's runs (`runs`: label -> preset -> stage), preset by preset, and their
    held-out KL."""
    e, w = c.plan.eval, c.workdir
    assert e is not None
    args = ["eval", "compare", *(f"{label}-{p}={r[p].output}" for p in e.presets for label, r in runs.items())]
    args += [a for s in kls for a in ("--kl", f"{s.name.removeprefix('heldout-kl-')}={s.output}")]
    report = w / "variants-report" / "report.md"
    args += ["--out", str(report), "--png", str(report.with_suffix(".png"))]
    after = [s.name for r in runs.values() for s in r.values()] + [s.name for s in kls]
    return Stage("variants-report", w / "variants-report", args, report, {}, after,
                 what="loop rates and held-out KL of the unpruned, pruned, Router-KD and final checkpoints")


def _heldout_kl_stage(c: _Chain, label: str, model: Path, adapter: Path | None, made_by: str) -> Stage:
    """KL(teacher || checkpoint) on the held-out teacher cache (`kd eval`), the checkpoint written by `made_by`."""
    w = c.workdir
    out = w / f"heldout-kl-{label}" / "kl.json"
    args = ["kd", "eval", str(model), "--teacher-cache", str(w / "teacher-heldout" / "cache"), "--json", str(out),
            *(["--adapter", str(adapter)] if adapter else []), *_threads(c.plan)]
    return Stage(f"heldout-kl-{label}", w / f"heldout-kl-{label}", args, out, {}, [made_by, "teacher-heldout"],
                 what=f"held-out KL of the {label} checkpoint to the teacher")
