"""Run a plan: each stage in its own process, skipped when its manifest says it is done with the same inputs.

A stage's directory gets `started.json` (its key) when it starts and `manifest.json` (key, command, input and
output fingerprints, times, tool version) when its output is complete. On a re-run, a stage whose manifest key
matches is skipped; one started with another key is cleared; one interrupted with the same key is run again
(the streaming observe/teacher passes and `kd train --resume` continue from their work directories; every
stage writes its output atomically, so an interrupted stage never leaves a complete-looking output).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from glmgguf import __version__
from glmgguf.card.pipeline import write_plan_cards
from glmgguf.errors import GlmggufError
from glmgguf.layout import GlmLayout
from glmgguf.pipeline.inputs import (
    check_inputs,
    data_files,
    data_path,
    eval_prompts,
    kld_text,
    kld_text_path,
    model_config,
    model_path,
    recipe_ref,
    resolve_model,
)
from glmgguf.pipeline.manifest import fingerprint, now, read_json, stage_key, write_json
from glmgguf.pipeline.plan import Plan, PlanError
from glmgguf.pipeline.stages import Stage, build_stages


class StageFailed(GlmggufError, RuntimeError):
    """A stage's command exited with an error."""


@dataclass
class StageResult:
    stage: Stage
    status: str  # "ran" | "skipped"
    seconds: float


def _die_with_parent() -> None:
    """Linux: the stage process gets SIGTERM when the pipeline process dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """One pipeline run per workdir at a time."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlanError(f"another pipeline run is using {workdir}") from None
        yield


def _run_command(stage: Stage, quiet: bool) -> None:
    """`python -m glmgguf ARGS` (under torchrun for a stage of [launch]), its output to `STAGE/log.txt` (and the
    terminal unless quiet)."""
    torchrun = ["torch.distributed.run", *stage.launcher, "-m"] if stage.launcher else []
    cmd = [sys.executable, "-m", *torchrun, "glmgguf", *stage.args]
    log = stage.dir / "log.txt"
    with open(log, "ab") as fh:
        shown = f"torchrun {' '.join(stage.launcher)} -m glmgguf" if stage.launcher else "glmgguf"
        fh.write(f"\n$ {shown} {' '.join(stage.args)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
        assert proc.stdout is not None
        try:
            for chunk in iter(lambda: os.read(proc.stdout.fileno(), 65536), b""):
                fh.write(chunk)
                fh.flush()
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        except BaseException:  # stopped (Ctrl-C, SIGTERM): the stage removes its partial output on SIGTERM too
            proc.terminate()
            raise
        finally:
            rc = proc.wait()
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise StageFailed(f"stage {stage.name} failed (exit status {rc}); last lines of {log}:\n" + "\n".join(tail))


class StageState(NamedTuple):
    status: str  # "done", "to run", "interrupted" or "changed"
    key: str
    output_fingerprint: str | None  # when done
    inputs: dict[str, str]  # fingerprints of the stage's inputs (what the key was made from)


def stage_status(stage: Stage, workdir: Path, upstream: dict[str, str | None]) -> StageState:
    """Where `stage` stands, from its manifest, its inputs and the outputs of the stages it reads.

    `upstream` maps earlier stages to their output fingerprints (None: not done yet, so this one must run); a
    stage whose inputs are not there yet (builtin text is written on the first run) must run too.
    """
    if any(upstream.get(n) is None for n in stage.after) or not all(p.exists() for p in stage.inputs.values()):
        return StageState("to run", "", None, {})
    inputs = {label: fingerprint(path) for label, path in sorted(stage.inputs.items())}
    key = stage_key(stage.args, workdir, inputs, {n: upstream[n] for n in stage.after})
    manifest = read_json(stage.manifest)
    started = read_json(stage.dir / "started.json")
    if manifest and manifest.get("key") == key and stage.output.exists():
        return StageState("done", key, manifest["output_fingerprint"], inputs)
    if manifest or (started and started.get("key") != key):
        return StageState("changed", key, None, inputs)
    return StageState("interrupted" if started else "to run", key, None, inputs)


def run_stage(stage: Stage, workdir: Path, upstream: dict[str, str], quiet: bool,
              echo: Callable[[str], None]) -> tuple[StageResult, str]:
    """Run `stage` unless its manifest matches; returns the result and its output's fingerprint."""
    state = stage_status(stage, workdir, upstream)
    if state.status == "done":
        echo(f"[{stage.name}] done earlier, inputs unchanged: skipped")
        assert state.output_fingerprint is not None
        return StageResult(stage, "skipped", 0.0), state.output_fingerprint
    if state.status == "changed":
        echo(f"[{stage.name}] settings or inputs changed: clearing {stage.dir}")
        shutil.rmtree(stage.dir)
    elif state.status == "interrupted":
        echo(f"[{stage.name}] interrupted earlier: running it again (resumable work is kept)")
    if stage.output.is_dir():
        shutil.rmtree(stage.output)
    elif stage.output.exists():
        stage.output.unlink()
    stage.dir.mkdir(parents=True, exist_ok=True)
    if stage.output_dir_first:
        stage.output.mkdir()
    started_at = now()
    write_json(stage.dir / "started.json", {"key": state.key, "started": started_at})
    echo(f"[{stage.name}] {stage.what}")
    t0 = time.perf_counter()
    _run_command(stage, quiet)
    seconds = time.perf_counter() - t0
    if not stage.output.exists():
        raise StageFailed(f"stage {stage.name} finished but wrote no {stage.output}")
    out_fp = fingerprint(stage.output)
    write_json(stage.manifest, {
        "stage": stage.name, "key": state.key, "command": ["glmgguf", *stage.args], "inputs": state.inputs,
        "upstream": {n: upstream[n] for n in stage.after}, "output": str(stage.output.relative_to(stage.dir)),
        "output_fingerprint": out_fp, "glmgguf_version": __version__, "started": started_at,
        "finished": now(), "seconds": round(seconds, 2),
    })
    (stage.dir / "started.json").unlink()
    echo(f"[{stage.name}] finished in {seconds:.1f} s")
    return StageResult(stage, "ran", seconds), out_fp


def plan_stages(plan: Plan, config_override: Path | None = None) -> tuple[GlmLayout, list[Stage]]:
    """Check the plan's inputs, then its stages (without building the testbed or writing data)."""
    layout = check_inputs(plan, model_config(plan, config_override), check_files=config_override is None)
    data = {k: [data_path(plan, e) for e in getattr(plan.data, k)] for k in ("calibration", "kd", "heldout")}
    recipes = {g.name: recipe_ref(plan, g.recipe) for g in plan.gguf}
    return layout, build_stages(plan, model_path(plan), data, recipes, eval_prompts(plan) if plan.eval else None,
                                kld_text_path(plan) if plan.kld else None)


def run_plan(plan: Plan, quiet: bool = False, echo: Callable[[str], None] = print,
             only: list[str] | None = None) -> list[StageResult]:
    """Run every stage of `plan` in order (or those named in `only` and what they need)."""
    check_inputs(plan, model_config(plan))
    with workdir_lock(plan.workdir):
        model = resolve_model(plan)
        data = {k: data_files(plan, k) for k in ("calibration", "kd", "heldout")}
        recipes = {g.name: recipe_ref(plan, g.recipe) for g in plan.gguf}
        stages = build_stages(plan, model, data, recipes, eval_prompts(plan) if plan.eval else None,
                              kld_text(plan) if plan.kld else None)
        wanted = _needed(stages, only) if only else {s.name for s in stages}
        results, upstream = [], {}
        for stage in stages:
            if stage.name not in wanted:
                continue
            result, upstream[stage.name] = run_stage(stage, plan.workdir, upstream, quiet, echo)
            results.append(result)
        write_plan_cards(plan, stages, echo)
        return results


def _needed(stages: list[Stage], only: list[str]) -> set[str]:
    by_name = {s.name: s for s in stages}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise PlanError(f"unknown stage(s) {', '.join(unknown)}; this plan has: {', '.join(by_name)}")
    need: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend(by_name[name].after)
    return need
