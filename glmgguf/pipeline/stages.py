"""The plan as a chain of stages, each one `glmgguf` command writing into its own directory under the workdir.

observe -> prune -> teacher -> kd -> gguf-NAME ... -> nvfp4 -> eval. The command line of each stage is the
stage's settings: the runner fingerprints it together with the stage's inputs to decide what to redo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from glmgguf.pipeline.inputs import EVAL_PROMPT_SETS
from glmgguf.pipeline.plan import Plan


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

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"


def _threads(plan: Plan) -> list[str]:
    return ["--threads", str(plan.threads)] if plan.threads else []


def _text_args(paths: list[Path], d: dict, samples: int | None) -> list[str]:
    """--data FILE... and the packing options of a pass over text ([data] settings)."""
    return [*[a for p in paths for a in ("--data", str(p))], "--seq-len", str(d["seq_len"]),
            *(["--num-samples", str(samples)] if samples else []), "--batch-size", str(d["batch_size"]),
            "--text-field", d["text_field"]]


def _texts(paths: list[Path]) -> dict[str, Path]:
    return {f"data:{p.name}": p for p in paths}


def build_stages(plan: Plan, model: Path, data: dict[str, list[Path]], recipes: dict[str, str],
                 prompts: str | None) -> list[Stage]:
    """The stages of `plan` for the source checkpoint `model`, text files `data` and resolved recipe refs."""
    w = plan.workdir
    d = plan.data
    stages: list[Stage] = []
    stats = w / "observe" / "stats.safetensors"
    if plan.observes:
        r = plan.reap or {}
        args = ["reap", "observe", str(model), *_text_args(data["calibration"], d, d["calibration_samples"]),
                "--out", str(stats), "--dtype", r.get("dtype", "bf16"), "--device", r.get("device", "cpu")]
        if r.get("streaming"):
            args += ["--streaming", "--work-dir", str(w / "observe" / "work"), "--spill-threshold",
                     r["spill_threshold"]]
        stages.append(Stage("observe", w / "observe", args, stats, {"model": model, **_texts(data["calibration"])},
                            what="REAP statistics on the calibration text"))
    final = model
    after: list[str] = []
    if plan.reap is not None:
        r = plan.reap
        out = w / "prune" / "model"
        count = ["--keep", str(r["keep"])] if r["keep"] is not None else ["--ratio", str(r["ratio"])]
        stages.append(Stage("prune", w / "prune", ["reap", "prune", str(model), "--stats", str(stats), *count,
                                                   "--per-layer", r["per_layer"], "--metric", r["metric"],
                                                   "--out", str(out)],
                            out, {"model": model}, ["observe"], what="pruned checkpoint"))
        final, after = out, ["prune"]
    if plan.kd is not None:
        k = plan.kd

        def teacher(name: str, paths: list[Path], samples: int | None, what: str) -> Stage:
            cache = w / name / "cache"
            args = ["kd", "teacher", str(model), *_text_args(paths, d, samples), "--out", str(cache),
                    "--top-k", str(k["top_k"]), "--device", k["teacher_device"], *_threads(plan)]
            if k["teacher_streaming"]:
                args += ["--streaming", "--work-dir", str(w / name / "work"), "--spill-threshold",
                         k["teacher_spill_threshold"]]
            return Stage(name, w / name, args, cache, {"model": model, **_texts(paths)}, what=what)

        stages.append(teacher("teacher", data["kd"], d["kd_samples"], "teacher top-k cache of the KD text"))
        out = w / "kd" / "model"
        args = ["kd", "train", str(final), "--teacher-cache", str(stages[-1].output), "--out", str(out),
                "--lr", str(k["lr"]), "--steps", str(k["steps"]), "--batch-size", str(k["batch_size"]),
                "--schedule", k["schedule"], "--warmup", str(k["warmup"]), "--dtype", k["dtype"],
                "--device-map", k["device_map"], "--save-every", str(k["save_every"]), "--resume",
                "--work-dir", str(w / "kd" / "work"), *[a for p in data["kd"] for a in ("--data", str(p))],
                *_threads(plan)]
        if k["train_bias"]:
            args.append("--train-bias")
        heldout = data.get("heldout") or []
        if heldout:
            stages.append(teacher("teacher-heldout", heldout, d["heldout_samples"],
                                  "teacher cache of the held-out text (KD is measured on it)"))
            args += ["--eval-cache", str(stages[-1].output), "--eval-every", str(max(1, k["steps"] // 4))]
        stages.append(Stage("kd", w / "kd", args, out, _texts(data["kd"]),
                            [*after, "teacher", *(["teacher-heldout"] if heldout else [])],
                            what="router-distilled checkpoint"))
        final, after = out, ["kd"]
    for g in plan.gguf:
        # split output: NAME-0000i-of-0000N.gguf files in their own directory, the stage's output
        out = w / f"gguf-{g.name}" / ("split" if g.split_max_size else "") / f"{g.name}.gguf"
        args = ["convert", str(final), str(out), "--recipe", recipes[g.name], "--mtp", g.mtp,
                "--indexer", g.indexer, *(["-t", str(plan.threads)] if plan.threads else [])]
        inputs: dict[str, Path] = {} if after else {"model": final}
        if g.imatrix is not None:
            args += ["--imatrix", str(g.imatrix)]
            inputs["imatrix"] = g.imatrix
        if recipes[g.name].endswith(".toml"):  # a recipe file of the user's (shipped ones are named)
            inputs["recipe"] = Path(recipes[g.name])
        if g.split_max_size:
            args += ["--split-max-size", g.split_max_size]
        stages.append(Stage(f"gguf-{g.name}", w / f"gguf-{g.name}", args, out.parent if g.split_max_size else out,
                            inputs, list(after), what=f"GGUF, recipe {g.recipe}",
                            output_dir_first=bool(g.split_max_size)))
    if plan.nvfp4 is not None:
        n = plan.nvfp4
        out = w / "nvfp4" / "model"
        args = ["nvfp4", "export", str(final), str(out), "--format", n["format"], "--device", n["device"],
                "--max-shard-size", n["max_shard_size"], *[a for e in n["exclude"] for a in ("--exclude", e)],
                *_threads(plan)]
        if plan.reap is None:
            args += ["--calib", str(stats)]
        stages.append(Stage("nvfp4", w / "nvfp4", args, out, {} if after else {"model": final},
                            [*after, "observe"] if plan.reap is None else list(after),
                            what=f"NVFP4 checkpoint ({n['format']})"))
    if plan.eval is not None and prompts is not None:
        e = plan.eval
        gguf = w / f"gguf-{e['gguf']}" / f"{e['gguf']}.gguf"
        runs = []
        for preset in e["presets"]:
            out = w / f"eval-{preset}" / f"{preset}.json"  # compare labels each run by its file name
            args = ["eval", "loops", "--gguf", str(gguf), "--prompts", prompts, "--out", str(out),
                    "--preset", preset, "--parallel", str(e["parallel"]), "--safety-cap", str(e["safety_cap"]),
                    "--seed", str(e["seed"]), "--quiet", *_threads(plan)]
            for key in ("ctx", "temperature", "limit"):
                if e[key] is not None:
                    args += [f"--{key}", str(e[key])]
            if e["draft_mtp"]:
                args += ["--draft-mtp", "--draft-max", str(e["draft_max"]), "--draft-p-min", str(e["draft_p_min"])]
            inputs = {} if prompts in EVAL_PROMPT_SETS else {"prompts": Path(prompts)}
            what = f"loop evaluation, sampler preset {preset}" + (", MTP drafting" if e["draft_mtp"] else "")
            stages.append(Stage(f"eval-{preset}", w / f"eval-{preset}", args, out, inputs,
                                [f"gguf-{e['gguf']}"], what=what))
            runs.append(out)
        report = w / "eval-report" / "report.md"
        stages.append(Stage("eval-report", w / "eval-report",
                            ["eval", "compare", *map(str, runs), "--out", str(report),
                             "--png", str(report.with_suffix(".png"))], report, {},
                            [f"eval-{p}" for p in e["presets"]], what="comparison of the evaluation runs"))
    return stages
