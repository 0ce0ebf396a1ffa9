#!/usr/bin/env python3
"""Every stage at GLM-5.2's real width, measured: a slice with the released dimensions on this machine.

    python bench/scale.py [--experts 256] [--sources fp8 bf16] [--stages convert-q4_protected,reap-observe]
                          [--tokens 512] [--threads N] [--work-dir DIR] [--keep-slice] [--rss-limit 18]
    python bench/scale.py --report-only   # recompute the ratios and tables of the results file

The slice (`glmgguf testbed --size glm52-slice --layers 1 --dense-layers 1`) is one dense layer plus the MTP layer:
embeddings and head at the full 154,880 x 6144, one dense layer of width 12288 and one full MoE layer (256 experts
of 2048 plus the shared expert, its own indexer), i.e. everything GLM-5.2 has, each kind once. The MTP layer is an
MoE layer like the 75 trunk ones, so one slice measures the per-MoE-layer cost without a second 10-19 GB layer on
disk. FP8 is how the release stores it (`zai-org/GLM-5.2-FP8`); BF16 is the other official build.

Each stage runs in a fresh, measured process (`bench/upstream.measure`: wall, user+sys CPU, peak RSS from the OS,
bytes written); its output is deleted once no later stage reads it, and the slice after the last stage that reads
it unless `--keep-slice`. The upstream converter and `llama-quantize` run on the same slice beside ours. A stage
whose processes hold more than `--rss-limit` GiB is stopped and recorded as not fitting (the machine is shared).
Results are keyed by source and expert count (`fp8-256`) and saved after every stage; a run updates only the
stages it ran. Disk at 256 experts (FP8): the slice is 14 GB, the upstream BF16 GGUF that `llama-quantize` and
`glmgguf quantize` read 25 GB, the NVFP4 export dequantized to BF16 22 GB: to stay within ~40 GB, run
`upstream-bf16,llama-quantize,quantize` on their own (the slice then goes right after `upstream-bf16`) or compare
them with fewer `--experts` (no extrapolation then). `truncated-shard` converts the slice with its last shard cut
in the middle of a tensor and records the error, the time to it and what was left on disk; `full-disk` converts
into a 1 GiB file system that fills mid-way (a tmpfs in a private mount namespace, `unshare --map-root-user`).

Per stage the results file holds wall, CPU, peak RSS, bytes read (the stage's input files) and written (its output
files), GB/s (read / wall), the machine's load average around the run and the CPU time other processes took, and
the extrapolation to GLM-5.2:

    glm52_s = wall_s x B_glm52 / B_slice,   B_glm52 = 76 x B_moe + 3 x B_dense + B_global

where B_moe, B_dense, B_global are the slice's stored bytes of its MoE layer, its dense layer and the tensors
outside layers (so B_glm52 is GLM-5.2's stored size) - the stage's measured rate applied per MoE layer, with the
3 dense layers and the embeddings once. For `reap observe` / `kd teacher` the token count is the slice's
(`--tokens`). Peak RSS is not extrapolated: each stage holds one tensor / one expert at a time, so it is what
GLM-5.2 needs. Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from upstream import measure, portable, upstream_command, upstream_env

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
GLMGGUF = [sys.executable, "-c", "from glmgguf.cli import main; main()"]
GLM52_MOE_LAYERS = 76  # 75 trunk MoE layers + the MTP layer
GLM52_DENSE_LAYERS = 3
GLM52_EXPERTS = 256
RECIPE = "q4_protected"
GiB, GB = 2**30, 1e9

# `llama-server` on a GGUF: load it (mmap), generate a few tokens, stop. argv: gguf, threads, n_predict, result.json
_SERVE = r"""
import json, sys, time
from glmgguf.llama.server import LlamaServer
gguf, threads, n_predict, result = sys.argv[1:]
t0 = time.perf_counter()
with LlamaServer(gguf, ["-c", "512", "-t", threads, "-np", "1"], startup_timeout=1800) as srv:
    t1 = time.perf_counter()
    reply = srv.completion("The capital of France is", n_predict=int(n_predict), temperature=0, seed=0)
    t2 = time.perf_counter()
with open(result, "w") as fh:
    json.dump({"load_s": t1 - t0, "generate_s": t2 - t1, "tokens": reply["tokens_predicted"],
               "text": reply["content"]}, fh)
"""


@dataclass
class Context:
    """What the stages of one source share: the slice, the work directory, the tools, the outputs so far."""

    source: str  # "fp8" or "bf16"
    slice_dir: Path
    work: Path
    args: argparse.Namespace
    calib: Path
    files: dict[str, Path] = field(default_factory=dict)

    def out(self, name: str) -> Path:
        return self.work / f"{self.source}-{name}"


@dataclass(frozen=True)
class Stage:
    """A measured command: `build(ctx)` -> (command, input paths, output path or None, extra environment)."""

    name: str
    build: Callable[[Context], tuple[list[str], list[Path], Path, dict[str, str]]]
    reads: tuple[str, ...] = ("slice",)  # "slice" or the names of the stages whose output it reads
    sources: tuple[str, ...] = ("fp8", "bf16")
    expect_failure: bool = False  # bad input: one clear error, no output and no `.partial` left
    note: str = ""  # why its time does not extrapolate per MoE layer
    trunk_only: bool = False  # runs the trunk, not the MTP layer (the KD teacher): extrapolated from the trunk's bytes


def _glmgguf(*args: object) -> list[str]:
    return [*GLMGGUF, *(str(a) for a in args)]


def _convert(flags: list[str], name: str) -> Callable[[Context], tuple]:
    def build(ctx: Context) -> tuple:
        out = ctx.out(f"{name}.gguf")
        return (_glmgguf("convert", ctx.slice_dir, out, *flags, "--threads", ctx.args.threads, "--force"),
                [ctx.slice_dir], out, {})
    return build


def _upstream(outtype: str) -> Callable[[Context], tuple]:
    def build(ctx: Context) -> tuple:
        from glmgguf.llama import ensure_toolchain

        src = ensure_toolchain().source_dir
        out = ctx.out(f"upstream-{outtype}.gguf")
        out.unlink(missing_ok=True)
        return upstream_command(src, ctx.slice_dir, out, outtype), [ctx.slice_dir], out, upstream_env(src)
    return build


def _inspect(ctx: Context) -> tuple:
    gguf = ctx.files["convert-q4_protected"]
    return _glmgguf("inspect", gguf), [gguf], None, {}


def _serve(ctx: Context) -> tuple:
    gguf = ctx.files["convert-q4_protected"]
    result = ctx.out("llama-server.json")
    return ([sys.executable, "-c", _SERVE, str(gguf), str(ctx.args.threads), "8", str(result)], [gguf], result, {})


def _text_run(cmd: str, name: str) -> Callable[[Context], tuple]:
    def build(ctx: Context) -> tuple:
        out = ctx.out(name)
        extra = ["--top-k", "64"] if cmd == "teacher" else []
        group = ["kd", "teacher"] if cmd == "teacher" else ["reap", "observe"]
        return (_glmgguf(*group, ctx.slice_dir, "--data", ctx.calib, "--seq-len", ctx.args.seq_len,
                         "--max-tokens", ctx.args.tokens, "--batch-size", 2, "--streaming", "--out", out,
                         "--work-dir", ctx.out(f"{name}.work"), *extra, "--force"), [ctx.slice_dir], out, {})
    return build


def _prune(ctx: Context) -> tuple:
    out = ctx.out("pruned")
    keep = max(1, ctx.args.experts * 3 // 4)
    return (_glmgguf("reap", "prune", ctx.slice_dir, "--stats", ctx.files["reap-observe"], "--keep", keep,
                     "--out", out, "--force"), [ctx.slice_dir], out, {})


def _llama_quantize(ctx: Context) -> tuple:
    from glmgguf.gguf.quantize import open_gguf, plan_quantize
    from glmgguf.gguf.quantize_args import llama_quantize_args
    from glmgguf.gguf.recipe import load_recipe
    from glmgguf.llama import ensure_toolchain

    src = ctx.files["upstream-bf16"]
    out = ctx.out("llama-quantize.gguf")
    model = open_gguf(src)
    plan, _ = plan_quantize(model, load_recipe(RECIPE))
    cmd = llama_quantize_args(plan, src, out, threads=ctx.args.threads,
                              src_types={t.name: t.ggml_type for t in model.plan},
                              binary=str(ensure_toolchain().quantize))
    return cmd, [src], out, {}


def _quantize(ctx: Context) -> tuple:
    src = ctx.files["upstream-bf16"]
    out = ctx.out("glmgguf-quantize.gguf")
    return (_glmgguf("quantize", src, out, "--recipe", RECIPE, "--threads", ctx.args.threads, "--force"),
            [src], out, {})


def _nvfp4_export(ctx: Context) -> tuple:
    out = ctx.out("nvfp4")
    return (_glmgguf("nvfp4", "export", ctx.slice_dir, out, "--calib", ctx.files["reap-observe"],
                     "--threads", ctx.args.threads, "--force"), [ctx.slice_dir], out, {})


def _nvfp4_dequantize(ctx: Context) -> tuple:
    src = ctx.files["nvfp4-export"]
    out = ctx.out("nvfp4-dequantized")
    return _glmgguf("nvfp4", "dequantize", src, out, "--dtype", "bf16", "--force"), [src], out, {}


def _truncated(ctx: Context) -> tuple:
    """`convert` of the slice with its last shard cut in the middle of a tensor (the other files linked)."""
    from glmgguf.io.reader import read_header

    bad = ctx.out("truncated")
    remove(bad)
    bad.mkdir()
    shards = sorted(ctx.slice_dir.glob("*.safetensors"))
    for f in ctx.slice_dir.iterdir():
        if f != shards[-1]:
            (bad / f.name).symlink_to(f)
    infos, _ = read_header(shards[-1])
    cut = max(infos.values(), key=lambda i: i.nbytes)
    size = cut.offset + cut.nbytes // 2
    with open(shards[-1], "rb") as src, open(bad / shards[-1].name, "wb") as dst:
        while dst.tell() < size:
            dst.write(src.read(min(1 << 24, size - dst.tell())))
    out = ctx.out("truncated.gguf")
    return _glmgguf("convert", bad, out, "--recipe", RECIPE, "--force"), [bad], out, {}


def _full_disk(ctx: Context) -> tuple:
    """`convert --recipe q4_protected` of the slice into a 1 GiB file system (a tmpfs mounted in a private mount
    namespace: no root needed), which fills mid-way; what the output folder holds afterwards is listed into
    `<name>.listing`, since the file system goes with the namespace."""
    disk = ctx.out("full-disk")
    disk.mkdir(exist_ok=True)
    convert = " ".join(map(shlex.quote, _glmgguf("convert", ctx.slice_dir, disk / "out.gguf", "--recipe", RECIPE,
                                                 "--threads", ctx.args.threads)))
    listing = shlex.quote(str(ctx.out("full-disk.listing")))
    script = (f"mount -t tmpfs -o size=1G tmpfs {shlex.quote(str(disk))} || exit 99; {convert}; rc=$?; "
              f"ls -A {shlex.quote(str(disk))} > {listing}; exit $rc")
    return ["unshare", "--mount", "--map-root-user", "sh", "-c", script], [ctx.slice_dir], disk / "out.gguf", {}


STAGES: list[Stage] = [
    Stage("convert-q4_protected", _convert(["--recipe", RECIPE], RECIPE)),
    Stage("truncated-shard", _truncated, expect_failure=True),
    Stage("full-disk", _full_disk, expect_failure=True),
    Stage("inspect", _inspect, reads=("convert-q4_protected",)),
    Stage("llama-server", _serve, reads=("convert-q4_protected",)),
    Stage("convert-q8_0", _convert(["--outtype", "q8_0"], "q8_0")),
    Stage("upstream-q8_0", _upstream("q8_0")),
    Stage("reap-observe", _text_run("observe", "reap_stats.safetensors"), sources=("fp8",)),
    Stage("kd-teacher", _text_run("teacher", "teacher"), sources=("fp8",), trunk_only=True,
          note="the teacher runs the trunk, which in this slice is its dense layer (the MoE layer is the MTP "
               "block): see the slice with an MoE trunk layer (--dense-layers 0)"),
    Stage("reap-prune", _prune, reads=("slice", "reap-observe"), sources=("fp8",)),
    Stage("nvfp4-export", _nvfp4_export, reads=("slice", "reap-observe"), sources=("fp8",)),
    Stage("nvfp4-dequantize", _nvfp4_dequantize, reads=("nvfp4-export",), sources=("fp8",)),
    Stage("upstream-bf16", _upstream("bf16"), sources=("fp8",)),
    Stage("llama-quantize", _llama_quantize, reads=("upstream-bf16",), sources=("fp8",)),
    Stage("quantize", _quantize, reads=("upstream-bf16",), sources=("fp8",)),
]
BY_NAME = {s.name: s for s in STAGES}


def path_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def slice_parts(slice_dir: Path) -> dict[str, int]:
    """The slice's stored bytes: its MoE layers, its dense layers, the tensors outside layers (FP8 scales included),
    and how many layers of each kind it has."""
    from glmgguf.io import CheckpointReader
    from glmgguf.layout import GlmLayout, parse_hf_name

    reader = CheckpointReader(slice_dir)
    layout = GlmLayout.from_config(reader.config)
    moe = {x.index for x in layout.moe_layers}
    parts = {"moe": 0, "dense": 0, "global": 0, "moe_layers": len(moe),
             "dense_layers": len(layout.layers) - len(moe)}
    infos = [*reader.tensors.values(), *reader.scales.values()]
    for info in infos:
        p = parse_hf_name(info.name.removesuffix("_scale_inv"))
        layer = p.layer if p is not None else None
        parts["global" if layer is None else "moe" if layer in moe else "dense"] += info.nbytes
    return parts


def stored_bytes(parts: dict[str, int]) -> int:
    return parts["moe"] + parts["dense"] + parts["global"]


def glm52_bytes(parts: dict[str, int]) -> int:
    """GLM-5.2's stored bytes: the slice's per-layer bytes times GLM-5.2's layer counts, plus the global tensors."""
    dense = GLM52_DENSE_LAYERS * parts["dense"] / parts["dense_layers"] if parts.get("dense_layers") else 0
    return round(GLM52_MOE_LAYERS * parts["moe"] / parts.get("moe_layers", 1) + dense + parts["global"])


def build_slice(ctx: Context) -> dict:
    """Build the slice in a measured process (skipped when it is there)."""
    if (ctx.slice_dir / "config.json").is_file():
        return {}
    cmd = _glmgguf("testbed", ctx.slice_dir, "--size", "glm52-slice", "--layers", 1,
                   "--dense-layers", ctx.args.dense_layers,
                   "--experts", ctx.args.experts, "--real-tokenizer", "5.2", "--force",
                   *(["--fp8"] if ctx.source == "fp8" else []))
    print(f"[{ctx.source}] building the slice into {ctx.slice_dir} ...", flush=True)
    return run_measured("testbed", cmd, [], ctx.slice_dir, {}, ctx)


@contextmanager
def rss_guard(limit: int) -> Iterator[dict]:
    """Kill this process's descendants (but the measuring wrappers, its children, which then report) if their
    resident memory together exceeds `limit` bytes: the machine is shared, so a stage that would not fit is
    stopped and recorded, not left to the OOM killer."""
    import psutil

    state = {"killed_at_bytes": None}
    stop = threading.Event()

    def watch() -> None:
        me = psutil.Process()
        while not stop.wait(0.5):
            procs = me.children(recursive=True)
            rss = 0
            for p in procs:
                with suppress(psutil.Error):
                    rss += p.memory_info().rss
            if rss > limit:
                state["killed_at_bytes"] = rss
                for p in procs:
                    with suppress(psutil.Error):
                        if p.ppid() != me.pid:
                            p.kill()
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join()


def run_measured(name: str, cmd: list[str], inputs: list[Path], out: Path | None, env: dict[str, str],
                 ctx: Context) -> dict:
    log = ctx.work / "logs" / f"{ctx.source}-{name}.log"
    load_before = os.getloadavg()
    with rss_guard(int(ctx.args.rss_limit * GiB)) as guard:
        stats = measure(cmd, {**os.environ, **env}, log)
    if guard["killed_at_bytes"] is not None:
        print(f"[{ctx.source}] {name}: stopped at {guard['killed_at_bytes'] / GiB:.1f} GiB resident", flush=True)
        return {"killed_at_rss_gib": round(guard["killed_at_bytes"] / GiB, 2), "wall_s": stats["wall_s"],
                "rss_limit_gib": ctx.args.rss_limit}
    if stats["returncode"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{name} exited with {stats['returncode']} (log {log}):\n{tail}")
    read = sum(path_bytes(p) for p in inputs)
    stats.update(load_avg_before=[round(x, 2) for x in load_before],
                 load_avg_after=[round(x, 2) for x in os.getloadavg()],
                 cpu_s=round(stats["user_s"] + stats["sys_s"], 2), bytes_read=read,
                 bytes_written=path_bytes(out) if out is not None else 0,
                 read_gb_per_s=round(read / stats["wall_s"] / GB, 4) if read else None,
                 peak_rss_gib=round(stats["peak_rss_bytes"] / GiB, 3))
    return stats


def failed_run(name: str, cmd: list[str], inputs: list[Path], out: Path, ctx: Context) -> dict:
    """Run a command that must fail: its exit code, last line, time to fail, and what it left behind."""
    log = ctx.work / "logs" / f"{ctx.source}-{name}.log"
    stats = measure(cmd, dict(os.environ), log)
    lines = log.read_text(errors="replace").strip().splitlines()
    listing = out.parent.with_name(out.parent.name + ".listing")
    if listing.is_file():  # the output's file system is gone: what it held at the end
        leftovers = listing.read_text().split()
        listing.unlink()
        out.parent.rmdir()
    else:
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]
    return {"returncode": stats["returncode"], "wall_s": round(stats["wall_s"], 2),
            "peak_rss_gib": round(stats["peak_rss_bytes"] / GiB, 3), "last_line": lines[-1] if lines else "",
            "output_left": [n for n in leftovers if not n.endswith(".lock")],
            "input": {"shards": len(list(inputs[0].glob("*.safetensors"))),
                      "bytes": sum(p.stat().st_size for p in inputs[0].iterdir())}}


def extrapolate(name: str, stats: dict, parts: dict[str, int]) -> dict:
    """GLM-5.2's time for a stage from its run on the slice (the module docstring's formula)."""
    stage = BY_NAME.get(name)
    if stage is None or "slice" not in stage.reads:
        return {"note": "not a pass over the slice: scale it with what it reads"}
    moe_layer = parts["moe"] / parts.get("moe_layers", 1)
    slice_bytes, glm52 = stored_bytes(parts), glm52_bytes(parts)
    if stage.trunk_only:  # neither the slice's nor GLM-5.2's MTP layer is run
        if parts.get("moe_layers", 1) < 2:
            return {"note": stage.note}
        slice_bytes, glm52 = slice_bytes - moe_layer, glm52 - moe_layer
    elif stage.note:
        return {"note": stage.note}
    factor = glm52 / slice_bytes
    return {"per_moe_layer_s": round(stats["wall_s"] * moe_layer / slice_bytes, 1),
            "glm52_s": round(stats["wall_s"] * factor, 1), "glm52_h": round(stats["wall_s"] * factor / 3600, 2),
            "glm52_cpu_core_h": round(stats["cpu_s"] * factor / 3600, 2)}


def extra_result(name: str, out: Path | None) -> dict:
    """What a stage reports beyond its measurements (llama-server's timings and generated text)."""
    if name == "llama-server" and out is not None and out.is_file():
        return json.loads(out.read_text())
    return {}


def with_inputs(stages: list[Stage]) -> list[Stage]:
    """`stages` in order, each preceded by the stages whose output it reads (when not selected before it)."""
    out: list[Stage] = []
    for stage in stages:
        for dep in stage.reads:
            if dep != "slice" and BY_NAME[dep] not in out:
                out += with_inputs([BY_NAME[dep]])
        if stage not in out:
            out.append(stage)
    return out


def run_source(source: str, names: list[str], args: argparse.Namespace, calib: Path,
               save: Callable[[dict], None]) -> dict:
    """Run the selected stages on one source's slice; `save(results so far)` after each stage."""
    ctx = Context(source, args.work_dir / f"slice-{source}-{args.experts}{trunk_suffix(args)}", args.work_dir, args,
                  calib)
    selected = with_inputs([BY_NAME[n] for n in names if source in BY_NAME[n].sources])
    res: dict = {"stages": {}}
    if not selected:
        return res
    built = build_slice(ctx)
    if built:
        res["stages"]["testbed"] = built
    parts = slice_parts(ctx.slice_dir)
    trunk = "1 dense" if args.dense_layers else "1 MoE"
    res["slice"] = {"bytes": stored_bytes(parts), "parts": parts, "glm52_bytes": glm52_bytes(parts),
                    "experts": args.experts, "layers": f"{trunk} + the MTP (MoE) layer"}
    last_slice = max(i for i, s in enumerate(selected) if "slice" in s.reads)
    for i, stage in enumerate(selected):
        run_stage(stage, ctx, res)
        save(res)
        drop_unread(ctx, selected[i + 1:])
        if i == last_slice and not args.keep_slice:
            remove(ctx.slice_dir)
    for path in ctx.files.values():
        remove(path)
    return res


def run_stage(stage: Stage, ctx: Context, res: dict) -> None:
    cmd, inputs, out, env = stage.build(ctx)
    free = shutil.disk_usage(ctx.work).free
    print(f"[{ctx.source}] {stage.name} ({free / GB:.1f} GB free) ...", flush=True)
    if stage.expect_failure:
        res["stages"][stage.name] = failed_run(stage.name, cmd, inputs, out, ctx)
        print(f"[{ctx.source}] {stage.name}: {res['stages'][stage.name]}", flush=True)
        if inputs[0] != ctx.slice_dir:
            remove(inputs[0])
        return
    stats = run_measured(stage.name, cmd, inputs, out, env, ctx)
    res["stages"][stage.name] = stats
    if "killed_at_rss_gib" in stats:
        if out is not None:
            for p in out.parent.glob(out.name + "*"):
                remove(p)
        return
    stats.update(extra_result(stage.name, out))
    if out is not None:
        ctx.files[stage.name] = out
    print(f"[{ctx.source}] {stage.name}: {stats['wall_s']:.1f} s wall, {stats['cpu_s']:.1f} s CPU, "
          f"peak RSS {stats['peak_rss_gib']:.2f} GiB, read {stats['bytes_read'] / GB:.2f} GB, "
          f"wrote {stats['bytes_written'] / GB:.2f} GB", flush=True)


def drop_unread(ctx: Context, later: list[Stage]) -> None:
    """Delete the outputs no later stage reads (disk is the constraint at real width)."""
    needed = {d for s in later for d in s.reads}
    for name in [n for n in ctx.files if n not in needed]:
        remove(ctx.files.pop(name))


def ratios(stages: dict) -> dict:
    """Upstream against ours, on the same slice (>1: ours is faster / smaller)."""
    out = {}
    for ours, theirs in (("convert-q8_0", "upstream-q8_0"), ("quantize", "llama-quantize")):
        if all("peak_rss_bytes" in stages.get(n, {}) for n in (ours, theirs)):
            a, b = stages[theirs], stages[ours]
            out[f"{theirs} / {ours}"] = {"wall": round(a["wall_s"] / b["wall_s"], 2),
                                         "peak_rss": round(a["peak_rss_bytes"] / b["peak_rss_bytes"], 2)}
    pipeline = [stages.get(n, {}) for n in ("upstream-bf16", "llama-quantize", "convert-q4_protected")]
    if all("peak_rss_bytes" in st for st in pipeline):
        up_bf16, lq, ours = pipeline
        out["upstream-bf16 + llama-quantize / convert-q4_protected"] = {
            "wall": round((up_bf16["wall_s"] + lq["wall_s"]) / ours["wall_s"], 2),
            "peak_rss": round(max(up_bf16["peak_rss_bytes"], lq["peak_rss_bytes"]) / ours["peak_rss_bytes"], 2),
            "bytes_written": round((up_bf16["bytes_written"] + lq["bytes_written"]) / ours["bytes_written"], 2)}
    return out


def merge(res: dict, key: str, new: dict) -> None:
    """`res`'s entry `key` (source and expert count): the stages it had (from an earlier results file) updated
    with this run's, so a `--stages` run refreshes only those."""
    old = res["sources"].get(key, {})
    entry = {**old, **{k: v for k, v in new.items() if k != "stages"}}
    entry["stages"] = {**old.get("stages", {}), **new["stages"]}
    for name, st in entry["stages"].items():
        if "cpu_s" in st and "parts" in entry.get("slice", {}):
            st["extrapolation"] = (extrapolate(name, st, entry["slice"]["parts"])
                                   if entry["slice"]["experts"] == GLM52_EXPERTS
                                   else {"note": f"{entry['slice']['experts']} experts: compare, do not extrapolate"})
    entry["ratios"] = ratios(entry["stages"])
    entry["table"] = table(entry)
    res["sources"][key] = entry


def table(entry: dict) -> str:
    """The README's table of one source: per stage the slice's measurements and the GLM-5.2 extrapolation."""
    rows = ["| stage | wall (slice) | CPU | peak RSS | read | GLM-5.2, extrapolated |", "|---|---|---|---|---|---|"]
    for name, st in entry["stages"].items():
        if "killed_at_rss_gib" in st:
            rows.append(f"| `{name}` | did not fit: stopped at {st['killed_at_rss_gib']:.1f} GiB resident | | | | |")
        if "cpu_s" not in st:
            continue
        x = st.get("extrapolation", {})
        rate = f"{st['read_gb_per_s']:.3f} GB/s" if st.get("read_gb_per_s") else "-"
        glm = f"{x['glm52_h']:.1f} h ({x['glm52_cpu_core_h']:.1f} core-h)" if "glm52_h" in x else "-"
        rows.append(f"| `{name}` | {st['wall_s']:.0f} s | {st['cpu_s']:.0f} s | {st['peak_rss_gib']:.2f} GiB | "
                    f"{rate} | {glm} |")
    return "\n".join(rows)


def trunk_suffix(args: argparse.Namespace) -> str:
    """The results key's suffix of a slice whose one trunk layer is an MoE layer (none for the default dense one)."""
    return "" if args.dense_layers else "-moe-trunk"


def write_calibration(path: Path, max_bytes: int = 200_000) -> Path:
    """Calibration text: the standard library's source (what the testbeds train on), enough for --tokens."""
    from glmgguf.testbed import stdlib_corpus

    path.write_text("\n\n".join(stdlib_corpus("train", max_bytes=max_bytes)))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=GLM52_EXPERTS,
                    help="routed experts of the slice's MoE layer (fewer: comparisons only, no extrapolation)")
    ap.add_argument("--sources", nargs="+", choices=["fp8", "bf16"], default=["fp8", "bf16"])
    ap.add_argument("--stages", default=",".join(BY_NAME), help=f"comma-separated subset of {','.join(BY_NAME)}")
    ap.add_argument("--dense-layers", type=int, choices=[0, 1], default=1,
                    help="0: the slice's one trunk layer is an MoE layer (the teacher then runs a real-width MoE "
                         "layer; 24 GB of FP8 disk), keyed `fp8-256-moe-trunk`")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens of reap observe / kd teacher")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "glmgguf-scale")
    ap.add_argument("--rss-limit", type=float, default=18.0,
                    help="GiB: a stage whose processes together hold more is stopped and recorded as not fitting")
    ap.add_argument("--keep-slice", action="store_true", help="keep the slice after its last stage")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="recompute the ratios and tables of --json")
    args = ap.parse_args(argv)
    if args.report_only:
        res = json.loads(args.json.read_text())
        for key, entry in res["sources"].items():
            merge(res, key, {**entry, "stages": {}})
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        return 0
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {list(BY_NAME)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    calib = write_calibration(args.work_dir / "calibration.txt")
    res = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                       "cpus": os.cpu_count(), "ram_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                  * os.sysconf("SC_PHYS_PAGES") / GiB, 1)},
           "threads": args.threads, "tokens": args.tokens, "seq_len": args.seq_len,
           "formula": "glm52_s = wall_s * (76 * B_moe + 3 * B_dense + B_global) / B_slice; "
                      "per_moe_layer_s = wall_s * B_moe / B_slice",
           "sources": json.loads(args.json.read_text()).get("sources", {}) if args.json.is_file() else {}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for source in args.sources:
        key, before = f"{source}-{args.experts}{trunk_suffix(args)}", json.loads(json.dumps(res["sources"]))

        def save(partial: dict, key: str = key, before: dict = before) -> None:
            res["sources"] = json.loads(json.dumps(before))
            merge(res, key, partial)
            text = json.dumps(portable(res), indent=1).replace(str(args.work_dir), "<work-dir>")
            args.json.write_text(text + "\n")

        save(run_source(source, names, args, calib, save))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
