#!/usr/bin/env python3
"""Loop rate of each step of the build in llama-server: unpruned, REAP-pruned, Router-KD, Router-KD + LoRA-KD.

    python bench/lora_loops.py [--limit 48] [--safety-cap 512]

Runs the shipped testbed plan (`glmgguf pipeline testbed`: REAP to 11 of 16 experts, Router-KD, LoRA-KD merged,
q4_protected GGUFs of every step through `[eval] baseline` and `variants`) with the sampler presets raw (T=1, no
truncation: the seeds' protocol), guarded and greedy on the built-in fuzz prompts (all 48 by default), and records
each run's loop and natural-EOS rates with Wilson intervals, the z-test against the unpruned model's run with the
same preset, and each checkpoint's held-out KL to the teacher. Writes bench/results/lora_loops.json (with the
variants report the pipeline wrote) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "lora_loops.json"
PRESETS = ("raw", "guarded", "greedy")
VARIANTS = {"unpruned": "eval-baseline-{}/{}.json", "pruned": "eval-pruned-{}/pruned-{}.json",
            "router-kd": "eval-router-kd-{}/router-kd-{}.json", "lora": "eval-{}/{}.json"}


def plan_text(limit: int, cap: int) -> str:
    from glmgguf.pipeline.plan import builtin_plans

    text = builtin_plans()["testbed"].read_text()
    for old, new in (('presets = ["greedy", "guarded"]', f"presets = {json.dumps(list(PRESETS))}"),
                     ("limit = 16", f"limit = {limit}"), ("safety_cap = 256", f"safety_cap = {cap}")):
        assert old in text, old
        text = text.replace(old, new)
    return text


def summary(run: dict, base: dict | None) -> dict:
    from glmgguf.eval.stats import two_proportion_z

    s = run["summary"]
    out = {k: s[k] for k in ("n", "loops", "loop_rate", "loop_ci95", "eos_rate", "eos_ci95", "distinct4_mean",
                             "median_tokens")}
    out["cap"] = s["counts"]["cap"]
    if base is not None:
        out["loop_z"], out["loop_p"] = two_proportion_z(s["loops"], s["n"], base["summary"]["loops"],
                                                         base["summary"]["n"])
    return out


def table(doc: dict) -> str:
    lines = ["| checkpoint | held-out KL | " + " | ".join(f"{p} loops (95% CI)" for p in PRESETS) + " |",
             "|---|---|" + "---|" * len(PRESETS)]
    for v in VARIANTS:
        kl = doc["heldout_kl"].get(v)
        cells = []
        for p in PRESETS:
            r = doc["runs"][v][p]
            lo, hi = r["loop_ci95"]
            z = f", z {r['loop_z']:+.2f}" if "loop_z" in r else ""
            cells.append(f"{r['loops']}/{r['n']} ({100 * lo:.0f}-{100 * hi:.0f}%{z})")
        lines.append(f"| {v} | {'-' if kl is None else f'{kl:.5f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--safety-cap", type=int, default=512)
    a = ap.parse_args()
    from glmgguf.pipeline.plan import parse_plan
    from glmgguf.pipeline.run import run_plan

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-loops-") as tmp:
        path = Path(tmp) / "plan.toml"
        path.write_text(plan_text(a.limit, a.safety_cap).replace('workdir = "demo-out/pipeline"', 'workdir = "work"'))
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        run_plan(parse_plan(path), quiet=True)
        work = Path(tmp) / "work"
        runs = {v: {p: json.loads((work / f.format(p, p)).read_text()) for p in PRESETS} for v, f in VARIANTS.items()}
        kl = {v: json.loads((work / f"heldout-kl-{v}" / "kl.json").read_text())["kl"]
              for v in ("pruned", "router-kd", "lora")}
        report = (work / "variants-report" / "report.md").read_text()
    doc = {"limit": a.limit, "safety_cap": a.safety_cap, "presets": list(PRESETS), "wall_s": time.perf_counter() - t0,
           "heldout_kl": kl, "runs": {v: {p: summary(r[p], None if v == "unpruned" else runs["unpruned"][p])
                                          for p in PRESETS} for v, r in runs.items()},
           "variants_report": report}
    doc["table"] = table(doc)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["table"])


if __name__ == "__main__":
    main()
