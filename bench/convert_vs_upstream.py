#!/usr/bin/env python3
"""Benchmark `glmgguf convert` against the pinned upstream `convert_hf_to_gguf.py` on one testbed checkpoint.

    python bench/convert_vs_upstream.py [--size small] [--outtype bf16] [--repeat 1]

Builds (or reuses) the testbed under `<cache>/bench/`, converts it with both converters (each in a fresh,
measured subprocess), prints wall time, peak RSS and output size side by side, checks that both GGUF files hold
the same tensors with byte-identical data, lists the KV differences (`general.*` and `glmgguf.*` ignored) and
writes everything to bench/results/convert_vs_upstream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from upstream import compare_gguf, run_ours_convert, run_upstream_convert

RESULTS = Path(__file__).resolve().parent / "results" / "convert_vs_upstream.json"
MiB = 2**20


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def warm_page_cache(model_dir: Path) -> None:
    """Read the checkpoint once so neither converter pays for the cold read."""
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def testbed_dir(work: Path, size: str, seed: int) -> Path:
    from glmgguf.testbed.build import build_testbed

    path = work / f"testbed-{size}-seed{seed}"
    if not (path / "config.json").is_file():
        print(f"building the {size} testbed into {path} ...", flush=True)
        build_testbed(path, size=size, seed=seed, force=True)
    return path


def best_of(runs: list[dict]) -> dict:
    """The fastest run's numbers, with the peak RSS over all runs and every wall time."""
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    best["wall_s_all"] = [round(r["wall_s"], 3) for r in runs]
    return best


def print_table(res: dict) -> None:
    up, ours = res["upstream"], res["ours"]
    ck = res["checkpoint"]
    print()
    print(f"{ck['size']} testbed: {ck['layers']} layers + {ck['mtp_layers']} MTP, {ck['experts']} experts, "
          f"{ck['bytes'] / MiB:.1f} MiB on disk; outtype {res['outtype']}")
    print(f"{'':16}{'wall s':>10}{'peak RSS MiB':>15}{'output MiB':>13}")
    for label, r in (("upstream", up), ("glmgguf", ours)):
        print(f"{label:16}{r['wall_s']:>10.2f}{r['peak_rss_bytes'] / MiB:>15.1f}{r['output_bytes'] / MiB:>13.2f}")
    ratio = res["ratios"]
    print(f"{'upstream/ours':16}{ratio['wall']:>9.2f}x{ratio['peak_rss']:>14.2f}x{ratio['output']:>12.3f}x")
    if len(up["wall_s_all"]) > 1:
        print(f"(best of {len(up['wall_s_all'])}: upstream {up['wall_s_all']}, ours {ours['wall_s_all']})")
    busy = [(r["other_cpu_s"] or 0.0) / r["wall_s"] for r in (up, ours)]
    if max(busy) > 0.2:
        print(f"warning: other processes kept {max(busy):.1f} cores busy during the best runs: the timings are "
              "skewed by contention")

    cmp = res["comparison"]
    t = cmp["tensors"]
    print()
    print(f"tensors: upstream {t['count']['upstream']}, ours {t['count']['ours']}, "
          f"{t['identical']} identical (name, shape, type, bytes)")
    for key in ("only_upstream", "only_ours", "shape_mismatch", "type_mismatch"):
        for name, what in t[key].items():
            print(f"  {key}: {name} {what}")
    for name in t["data_mismatch"]:
        print(f"  data differs: {name}")
    print("tensor check:", "IDENTICAL" if cmp["tensors_identical"] else "DIFFERENT")

    kv = cmp["kv"]
    print(f"KV ({', '.join(kv['ignored_prefixes'])} ignored): {kv['equal']} equal")
    for key in ("only_upstream", "only_ours"):
        for name, value in kv[key].items():
            print(f"  {key}: {name} = {value!r}")
    for name, d in kv["differing"].items():
        print(f"  differs: {name}: upstream {d['upstream']!r}, ours {d['ours']!r}")
    print("KV check:", "IDENTICAL" if cmp["kv_identical"] else "DIFFERENT")


def main(argv: list[str] | None = None) -> int:
    from glmgguf.cache import cache_root
    from glmgguf.layout import GlmLayout
    from glmgguf.llama import ensure_toolchain

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--outtype", default="bf16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per converter (alternating); best wall time wins")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP_NUM_THREADS for both converters (default: inherit the environment)")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: <glmgguf cache>/bench")
    ap.add_argument("--keep", action="store_true", help="keep the two GGUF files")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = ap.parse_args(argv)

    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = (args.work_dir or cache_root() / "bench").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = testbed_dir(work, args.size, args.seed)
    source_dir = ensure_toolchain().source_dir
    cfg = json.loads((model_dir / "config.json").read_text())
    layout = GlmLayout.from_config(cfg)

    out_dir = work / "out"
    up_out = out_dir / f"upstream-{args.size}-{args.outtype}.gguf"
    our_out = out_dir / f"ours-{args.size}-{args.outtype}.gguf"
    warm_page_cache(model_dir)
    up_runs, our_runs = [], []
    for i in range(args.repeat):
        order = ("upstream", "ours") if i % 2 == 0 else ("ours", "upstream")
        for which in order:
            print(f"run {i + 1}/{args.repeat}: {which} ...", flush=True)
            if which == "upstream":
                up_runs.append(run_upstream_convert(source_dir, model_dir, up_out, args.outtype,
                                                    log=out_dir / "upstream.log"))
            else:
                our_runs.append(run_ours_convert(model_dir, our_out, args.outtype, log=out_dir / "ours.log"))
    up, ours = best_of(up_runs), best_of(our_runs)
    comparison = compare_gguf(up_out, our_out)

    res = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                    "cpus": os.cpu_count()},
        "outtype": args.outtype,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "checkpoint": {"size": args.size, "seed": args.seed, "bytes": checkpoint_bytes(model_dir),
                       "layers": layout.n_layers, "mtp_layers": layout.n_mtp,
                       "experts": cfg.get("n_routed_experts")},
        "upstream": {k: v for k, v in up.items() if k != "output"},
        "ours": {k: v for k, v in ours.items() if k != "output"},
        "ratios": {"wall": up["wall_s"] / ours["wall_s"],
                   "peak_rss": up["peak_rss_bytes"] / ours["peak_rss_bytes"],
                   "output": up["output_bytes"] / ours["output_bytes"]},
        "comparison": comparison,
    }
    print_table(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    if not args.keep:
        up_out.unlink(missing_ok=True)
        our_out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
