#!/usr/bin/env python3
"""Benchmark mixed-recipe quantization against the pinned upstream tools on one testbed checkpoint.

    python bench/quantize_vs_upstream.py [--size small] [--recipe q4_protected] [--threads N] [--repeat 1] [--fp8]

(a) pipeline: `glmgguf convert SRC OUT --recipe R` (one streaming pass) against upstream `convert_hf_to_gguf.py
    --outtype bf16` followed by `llama-quantize` with the equivalent overrides (what `glmgguf recipes R
    --llama-quantize-args` prints): wall time, bytes written (upstream writes the BF16 intermediate and the
    final file), peak RSS of each step;
(b) GGUF -> GGUF: `glmgguf quantize BF16.gguf OUT --recipe R` against `llama-quantize` on the same BF16 GGUF with
    the same thread count.
With `--fp8` the source is the testbed stored as the block-FP8 release stores it (most users start from
GLM-5.2-FP8), and the upstream intermediate is F32 (`--intermediate`), so that both pipelines quantize the same
dequantized values and must give the same bytes.
Every run is a fresh, measured process (bench/upstream.py). The three quantized files are compared tensor by
tensor (name, shape, type, bytes). Results go to bench/results/quantize_vs_upstream.json (`_fp8.json` with --fp8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from convert_vs_upstream import checkpoint_bytes, testbed_dir, warm_page_cache
from upstream import ConvertRunError, compare_gguf, measure, portable, run_upstream_convert

IGNORED = ("GGUF.", "general.", "glmgguf.", "quantize.")  # KV keys that name files, tools and provenance
RESULTS = Path(__file__).resolve().parent / "results" / "quantize_vs_upstream.json"
RESULTS_FP8 = RESULTS.with_name("quantize_vs_upstream_fp8.json")
MiB = 2**20
GLMGGUF = [sys.executable, "-c", "from glmgguf.cli import main; main()"]
# `glmgguf quantize` minus the command line's start: the library call alone, timed inside a fresh process
_LIBRARY_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
from glmgguf.gguf.encode import default_kernels
from glmgguf.gguf.quantize import quantize_gguf
from glmgguf.gguf.recipe import load_recipe
default_kernels()
t1 = time.perf_counter()
src, out, recipe, threads, result = sys.argv[1:]
quantize_gguf(src, out, load_recipe(recipe), threads=int(threads), force=True, progress=False)
t2 = time.perf_counter()
with open(result, "w") as fh:
    json.dump({"import_s": t1 - t0, "call_s": t2 - t1}, fh)
"""


def checked(stats: dict, what: str, log: Path) -> dict:
    if stats["returncode"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.is_file() else ""
        raise ConvertRunError(f"{what} exited with {stats['returncode']} (log: {log})\n{tail}")
    return stats


def run(cmd: list[str], what: str, log: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    stats = checked(measure([str(c) for c in cmd], dict(os.environ), log), what, log)
    stats["output_bytes"] = out.stat().st_size
    return stats


def best(runs: list[dict], key: str = "wall_s") -> dict:
    """The fastest run, with every run's wall time and the highest peak RSS of all runs."""
    b = dict(min(runs, key=lambda r: r[key]))
    b["wall_s_all"] = [round(r[key], 3) for r in runs]
    b["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    return b


def pipeline(convert: dict, quantize: dict) -> dict:
    """Two measured steps run one after the other: summed time and writes, the higher peak."""
    return {"wall_s": convert["wall_s"] + quantize["wall_s"],
            "peak_rss_bytes": max(convert["peak_rss_bytes"], quantize["peak_rss_bytes"]),
            "write_bytes": convert["write_bytes"] + quantize["write_bytes"],
            "file_bytes_written": convert["output_bytes"] + quantize["output_bytes"],
            "output_bytes": quantize["output_bytes"],
            "other_cpu_s": (convert["other_cpu_s"] or 0.0) + (quantize["other_cpu_s"] or 0.0),
            "steps": {"convert_hf_to_gguf": convert, "llama-quantize": quantize}}


def fmt_row(label: str, r: dict) -> str:
    written = r.get("file_bytes_written", r["output_bytes"])
    return (f"{label:34}{r['wall_s']:>9.2f}{r['peak_rss_bytes'] / MiB:>15.0f}{written / MiB:>14.1f}"
            f"{r['write_bytes'] / MiB:>14.1f}{r['output_bytes'] / MiB:>12.1f}")


def print_table(res: dict) -> None:
    ck = res["checkpoint"]
    print()
    print(f"{ck['size']} testbed: {ck['layers']} layers + {ck['mtp_layers']} MTP, {ck['experts']} experts, "
          f"{ck['bytes'] / MiB:.0f} MiB of {ck['storage']} safetensors; recipe {res['recipe']}, "
          f"{res['threads']} threads")
    head = f"{'':34}{'wall s':>9}{'peak RSS MiB':>15}{'files MiB':>14}{'dirtied MiB':>14}{'output MiB':>12}"
    a, b = res["a_pipeline"], res["b_quantize"]
    print("\n(a) safetensors -> mixed GGUF")
    print(head)
    print(fmt_row(f"upstream convert {res['intermediate']}", a["upstream"]["steps"]["convert_hf_to_gguf"]))
    print(fmt_row("  + llama-quantize", a["upstream"]["steps"]["llama-quantize"]))
    print(fmt_row("  = upstream pipeline", a["upstream"]))
    print(fmt_row("glmgguf convert --recipe", a["ours"]))
    r = a["ratios"]
    print(f"ours/upstream: wall {r['wall']:.3f} (goal <= 0.6), files written {r['file_bytes_written']:.3f}, "
          f"dirtied {r['write_bytes']:.3f}, peak RSS {r['peak_rss']:.2f}")
    print(f"\n(b) {res['intermediate'].upper()} GGUF -> mixed GGUF")
    print(head)
    print(fmt_row("llama-quantize", b["upstream"]))
    print(fmt_row("glmgguf quantize", b["ours"]))
    lib = b["ours_library_call"]
    print(f"{'  quantize_gguf() call alone':34}{lib['call_s']:>9.2f}   (imports {lib['import_s']:.2f} s, process "
          f"{lib['wall_s']:.2f} s)")
    r = b["ratios"]
    print(f"ours/upstream: wall {r['wall']:.3f} (goal <= 1.1), library call alone {r['library_call']:.3f}, "
          f"peak RSS {r['peak_rss']:.2f}")
    print("\ntensor data vs llama-quantize's output:")
    for key, label in (("convert", "glmgguf convert --recipe"), ("quantize", "glmgguf quantize")):
        c = res["comparison"][key]
        t = c["tensors"]
        extra = ", ".join(f"{k}: {len(v)}" for k, v in t.items()
                          if k.startswith(("only_", "shape_", "type_", "data_")) and v)
        print(f"  {label:26} {'IDENTICAL' if c['tensors_identical'] else 'DIFFERENT'} "
              f"({t['identical']}/{t['count']['upstream']} tensors{'; ' + extra if extra else ''})")
    busy = max((x["other_cpu_s"] or 0.0) / x["wall_s"] for x in (a["ours"], a["upstream"], b["ours"], b["upstream"]))
    if busy > 0.2:
        print(f"warning: other processes kept up to {busy:.1f} cores busy during the best runs: timings are skewed "
              "by contention")
    if len(b["ours"]["wall_s_all"]) > 1:
        print(f"(best of {len(b['ours']['wall_s_all'])}: upstream convert "
              f"{a['upstream']['steps']['convert_hf_to_gguf']['wall_s_all']}, llama-quantize "
              f"{b['upstream']['wall_s_all']}, glmgguf convert {a['ours']['wall_s_all']}, glmgguf quantize "
              f"{b['ours']['wall_s_all']})")


def main(argv: list[str] | None = None) -> int:
    from glmgguf.cache import cache_root
    from glmgguf.gguf.quantize import open_gguf, plan_quantize
    from glmgguf.gguf.quantize_args import llama_quantize_args
    from glmgguf.gguf.recipe import load_recipe
    from glmgguf.layout import GlmLayout
    from glmgguf.llama import ensure_toolchain

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--recipe", default="q4_protected")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of llama-quantize and of glmgguf's quantization (default: all cores)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (order alternates); the best wall time wins")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: <glmgguf cache>/bench")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    ap.add_argument("--fp8", action="store_true", help="the testbed stored as the block-FP8 release is")
    ap.add_argument("--intermediate", choices=["bf16", "f32"], default=None,
                    help="upstream converter's output type (default bf16; f32 with --fp8)")
    ap.add_argument("--json", type=Path, default=None, help=f"results file (default {RESULTS} or {RESULTS_FP8})")
    args = ap.parse_args(argv)
    args.json = args.json or (RESULTS_FP8 if args.fp8 else RESULTS)
    intermediate = args.intermediate or ("f32" if args.fp8 else "bf16")

    work = (args.work_dir or cache_root() / "bench").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = testbed_dir(work, args.size, args.seed)
    if args.fp8:
        from glmgguf.testbed.release_fp8 import write_fp8_copy

        fp8_dir = model_dir.with_name(model_dir.name + "-fp8")
        if not (fp8_dir / "config.json").is_file():
            write_fp8_copy(model_dir, fp8_dir, force=True)
        model_dir = fp8_dir
    toolchain = ensure_toolchain()
    cfg = json.loads((model_dir / "config.json").read_text())
    layout = GlmLayout.from_config(cfg)
    recipe = load_recipe(args.recipe)

    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{args.size}{'-fp8' if args.fp8 else ''}-{recipe.name}"
    up_bf16 = out_dir / f"upstream-{tag}-{intermediate}.gguf"
    up_q = out_dir / f"upstream-{tag}.gguf"
    ours_c = out_dir / f"ours-convert-{tag}.gguf"
    ours_q = out_dir / f"ours-quantize-{tag}.gguf"
    warm_page_cache(model_dir)

    lq_cmd: list[str] | None = None
    runs: dict[str, list[dict]] = {"up_convert": [], "up_quantize": [], "ours_convert": [], "ours_quantize": [],
                                   "ours_library": []}
    ours_lib = out_dir / f"ours-library-{tag}.gguf"
    for i in range(args.repeat):
        # upstream first in even rounds, ours first in odd ones; llama-quantize and glmgguf quantize both read
        # the BF16 GGUF the upstream converter has just written (in the page cache)
        order = ["up_convert", "up_quantize", "ours_quantize", "ours_library", "ours_convert"]
        if i % 2:
            order = ["ours_convert", "up_convert", "ours_library", "ours_quantize", "up_quantize"]
        for step in order:
            print(f"round {i + 1}/{args.repeat}: {step} ...", flush=True)
            if step == "up_convert":
                up_bf16.unlink(missing_ok=True)
                runs[step].append(run_upstream_convert(toolchain.source_dir, model_dir, up_bf16, intermediate,
                                                       log=out_dir / "upstream-convert.log"))
                if lq_cmd is None:
                    model = open_gguf(up_bf16)
                    plan, _ = plan_quantize(model, recipe)
                    lq_cmd = llama_quantize_args(plan, up_bf16, up_q, threads=args.threads,
                                                 src_types={t.name: t.ggml_type for t in model.plan},
                                                 binary=str(toolchain.quantize))
            elif step == "up_quantize":
                runs[step].append(run(lq_cmd, "llama-quantize", out_dir / "llama-quantize.log", up_q))
            elif step == "ours_library":
                timing = out_dir / "library-call.json"
                stats = run([sys.executable, "-c", _LIBRARY_CALL, up_bf16, ours_lib, args.recipe, args.threads,
                             timing], "quantize_gguf", out_dir / "ours-library.log", ours_lib)
                stats.update(json.loads(timing.read_text()))
                runs[step].append(stats)
            elif step == "ours_quantize":
                runs[step].append(run([*GLMGGUF, "quantize", up_bf16, ours_q, "--recipe", args.recipe,
                                       "--threads", str(args.threads), "--force"],
                                      "glmgguf quantize", out_dir / "ours-quantize.log", ours_q))
            else:
                runs[step].append(run([*GLMGGUF, "convert", model_dir, ours_c, "--recipe", args.recipe,
                                       "--threads", str(args.threads), "--force"],
                                      "glmgguf convert --recipe", out_dir / "ours-convert.log", ours_c))

    up_convert, up_quantize = best(runs["up_convert"]), best(runs["up_quantize"])
    ours_convert, ours_quantize = best(runs["ours_convert"]), best(runs["ours_quantize"])
    ours_library = best(runs["ours_library"], key="call_s")
    ours_library["call_s_all"] = ours_library.pop("wall_s_all")
    up_pipeline = pipeline(up_convert, up_quantize)
    ours_convert["file_bytes_written"] = ours_convert["output_bytes"]
    res = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                    "cpus": os.cpu_count(), "load_avg_after": os.getloadavg()},
        "recipe": recipe.name,
        "intermediate": intermediate,
        "threads": args.threads,
        "repeat": args.repeat,
        "checkpoint": {"size": args.size, "seed": args.seed, "bytes": checkpoint_bytes(model_dir),
                       "storage": "block-FP8" if args.fp8 else "BF16",
                       "layers": layout.n_layers, "mtp_layers": layout.n_mtp,
                       "experts": cfg.get("n_routed_experts")},
        "llama_quantize_command": [Path(lq_cmd[0]).name, *lq_cmd[1:]],
        "a_pipeline": {
            "upstream": up_pipeline,
            "ours": ours_convert,
            "ratios": {"wall": ours_convert["wall_s"] / up_pipeline["wall_s"],
                       "file_bytes_written": ours_convert["output_bytes"] / up_pipeline["file_bytes_written"],
                       "write_bytes": (ours_convert["write_bytes"] / up_pipeline["write_bytes"]
                                       if up_pipeline["write_bytes"] else None),
                       "peak_rss": ours_convert["peak_rss_bytes"] / up_pipeline["peak_rss_bytes"]},
        },
        "b_quantize": {
            "upstream": up_quantize,
            "ours": ours_quantize,
            "ours_library_call": ours_library,
            "ratios": {"wall": ours_quantize["wall_s"] / up_quantize["wall_s"],
                       "peak_rss": ours_quantize["peak_rss_bytes"] / up_quantize["peak_rss_bytes"],
                       "library_call": ours_library["call_s"] / up_quantize["wall_s"]},
        },
        "comparison": {"convert": compare_gguf(up_q, ours_c, ignore=IGNORED),
                       "quantize": compare_gguf(up_q, ours_q, ignore=IGNORED)},
    }
    print_table(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(portable(res), indent=2) + "\n")
    print(f"\nwrote {args.json}")
    if not args.keep:
        for p in (up_bf16, up_q, ours_c, ours_q, ours_lib):
            p.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
