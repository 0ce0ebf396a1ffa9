"""Run the benchmarks under bench/ and write bench/RESULTS.md (and bench/results/summary.png) from their JSONs.

    python bench/run_all.py [--only NAME ...] [--skip NAME ...]   # run each script, then write the report
    python bench/run_all.py --report-only                         # only regenerate the report from the JSONs
    python bench/run_all.py --list                                # the scripts and their runtime on 2 cores

Each script runs in its own subprocess (`sys.executable bench/NAME.py`), its output in bench/results/logs/NAME.log;
a failing script is reported and the others still run. The wall time of every run goes to
bench/results/run_all.json. Every number in the report is read from a JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
TIMINGS = RESULTS / "run_all.json"
REPORT = BENCH / "RESULTS.md"
CHART = RESULTS / "summary.png"
MIB = 1 << 20

# name -> one-line description (the run order)
SCRIPTS: dict[str, str] = {
    "convert_vs_upstream": "`glmgguf convert --outtype bf16` vs the pinned upstream `convert_hf_to_gguf.py`",
    "quantize_vs_upstream": "mixed-recipe quantization vs upstream `convert_hf_to_gguf.py` + `llama-quantize`",
    "recipe_kld": "KL divergence of every shipped recipe against the F32 GGUF (`llama-perplexity`)",
    "reap_quality": "REAP vs EAN / frequency / random expert pruning, held-out KL",
    "reap_memory": "`reap observe` peak memory and speed, in-memory vs `--streaming`; GLM-5.2 extrapolation",
    "nvfp4_export": "`glmgguf nvfp4 export` throughput on GLM-5.2-shaped experts",
    "nvfp4_quality": "NVFP4 experts' KL to the unquantized testbed: transformers, emulated W4A4, llama.cpp GGUF",
    "patches_parity": "logit parity of the patched llama.cpp vs transformers, next to the pinned one",
    "eval_loops": "loop detector false positives and loop rates of the tiny testbed by sampler",
    "kd_recovery": "Router-KD: held-out KL of REAP-pruned students before and after KD",
    "kd_cost": "Router-KD step time and peak memory on the `small` testbed; GLM-5.2 extrapolation",
    "lora_recovery": "LoRA-KD after Router-KD: held-out KL by rank and target modules, step time, memory; GLM-5.2",
    "lora_loops": "loop rates in llama-server of the unpruned, pruned, Router-KD and LoRA-KD testbed (raw, guarded, "
                  "greedy)",
    "mtp_acceptance": "MTP draft acceptance in llama-server: unpruned, REAP-pruned, after Router-KD",
    "dist_scaling": "torchrun with 1 vs 2 CPU ranks (observe, FSDP Router-KD); per-GPU memory of FSDP KD for GLM-5.2",
    "glm52_sizes": "GGUF size and bits per weight of every shipped recipe at GLM-5.2's size (from its config)",
}


# ---------------------------------------------------------------- formatting helpers


def num(v: float | None, spec: str = ".3g") -> str:
    """Format a number, '-' for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v + 0.0 if isinstance(v, float) else v, spec)  # + 0.0: no '-0'


def mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:.0f} MiB"


def pct(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else f"{100 * v:{spec}}%"


def ratio(ours: float | None, ref: float | None) -> float | None:
    return None if not ours or not ref else ours / ref


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def goal_cell(r: float | None, goal: float) -> str:
    return "-" if r is None else f"<= {goal} ({'met' if r <= goal else 'missed'})"


# ---------------------------------------------------------------- JSON access


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def json_date(path: Path) -> str:
    """Last commit date of a result file, else (not committed yet) its modification date."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return f"{out} (JSON last committed)"
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d (JSON file date)")


def machine_line(name: str, doc: dict) -> str:
    """Where and when a result was taken, from what its JSON records."""
    m = doc.get("machine")
    m = {**doc, **m} if isinstance(m, dict) else {**doc, "platform": m}
    parts = [m.get("platform"), m.get("cpus") and f"{m['cpus']} CPUs", m.get("python") and f"Python {m['python']}",
             m.get("torch") and f"torch {m['torch']}"]
    when = doc.get("when") or json_date(RESULTS / f"{name}.json")
    return " · ".join([f"[`results/{name}.json`](results/{name}.json)", when, ", ".join(p for p in parts if p)]
                      ).rstrip(" ·")


def runtime_from_json(name: str, doc: dict) -> tuple[float, bool] | None:
    """(seconds, complete) recorded in a benchmark's JSON; complete=False when only the measured runs are."""
    try:
        return RUNTIME[name](doc)
    except (KeyError, TypeError):
        return None


def _convert_s(d: dict) -> tuple[float, bool]:
    return sum(d["upstream"]["wall_s_all"]) + sum(d["ours"]["wall_s_all"]), False


def _quantize_s(d: dict) -> tuple[float, bool]:
    a, b = d["a_pipeline"], d["b_quantize"]
    steps = sum(sum(s["wall_s_all"]) for s in a["upstream"]["steps"].values())
    lib = b.get("ours_library_call", {})
    return steps + sum(a["ours"]["wall_s_all"]) + sum(b["ours"]["wall_s_all"]) + sum(lib.get("call_s_all", [])), False


RUNTIME: dict[str, Callable[[dict], tuple[float, bool]]] = {
    "convert_vs_upstream": _convert_s,
    "quantize_vs_upstream": _quantize_s,
    "recipe_kld": lambda d: (d["seconds"], True),
    "reap_quality": lambda d: (d["wall_s"], True),
    "reap_memory": lambda d: (sum(m["process_wall_s"] for m in d["measured"]["modes"].values()), False),
    "nvfp4_export": lambda d: (sum(r["export_wall_s"] for r in d["runs"]), False),
    "patches_parity": lambda d: (d["seconds"], True),
    "eval_loops": lambda d: (sum(r["seconds"] for r in d["runs"].values()), False),
    "kd_recovery": lambda d: (d["wall_s"], True),
    "lora_loops": lambda d: (d["wall_s"], True),
    "lora_recovery": lambda d: (sum(r["wall_s"] for k in ("router_kd_lrs", "lora_lrs", "lora") for r in d[k])
                                + d["router_kd_2x"]["wall_s"], False),
    "mtp_acceptance": lambda d: (d["wall_s"], True),
    "dist_scaling": lambda d: (sum(v["process_wall_s"] for p in ("observe", "kd") for k, v in d["measured"][p].items()
                                   if k != "speedup"), False),
}


# ---------------------------------------------------------------- sections


def sec_convert(d: dict) -> list[str]:
    up, ours, cmp = d["upstream"], d["ours"], d["comparison"]
    n = len(ours.get("wall_s_all", [])) or 1
    rows = [[f"wall time (best of {n})", f"{up['wall_s']:.1f} s", f"{ours['wall_s']:.1f} s",
             num(ratio(ours["wall_s"], up["wall_s"]), ".2f")],
            ["peak RSS", mib(up["peak_rss_bytes"]), mib(ours["peak_rss_bytes"]),
             num(ratio(ours["peak_rss_bytes"], up["peak_rss_bytes"]), ".2f")],
            ["output file", mib(up["output_bytes"]), mib(ours["output_bytes"]),
             num(ratio(ours["output_bytes"], up["output_bytes"]), ".3f")]]
    ck, t = d["checkpoint"], cmp["tensors"]
    return [f"`{ck['size']}` testbed ({ck['bytes'] / 1e6:.0f} MB safetensors), `--outtype {d['outtype']}`, "
            "each converter in a fresh measured process.", "",
            *table(["", "upstream `convert_hf_to_gguf.py`", "`glmgguf convert`", "ours/upstream"], rows), "",
            f"Tensors: {t['identical']} byte-identical of {t['count']['ours']} (ours) / {t['count']['upstream']} "
            f"(upstream); only in upstream: {len(t['only_upstream'])}, only in ours: {len(t['only_ours'])}, "
            f"data mismatches: {len(t['data_mismatch'])}. KV: {cmp['kv']['equal']} equal, "
            f"{len(cmp['kv']['only_ours'])} only in ours, {len(cmp['kv']['differing'])} differing."]


def sec_quantize(d: dict) -> list[str]:
    a, b = d["a_pipeline"], d["b_quantize"]
    au, ao, bu, bo = a["upstream"], a["ours"], b["upstream"], b["ours"]
    rows = [["(a) safetensors -> GGUF wall time", f"{au['wall_s']:.1f} s", f"{ao['wall_s']:.1f} s",
             num(ratio(ao["wall_s"], au["wall_s"]), ".2f"), goal_cell(ratio(ao["wall_s"], au["wall_s"]), 0.6)],
            ["(a) bytes written", mib(au["file_bytes_written"]), mib(ao["file_bytes_written"]),
             num(ratio(ao["file_bytes_written"], au["file_bytes_written"]), ".2f"), "-"],
            ["(a) peak RSS", mib(au["peak_rss_bytes"]), mib(ao["peak_rss_bytes"]),
             num(ratio(ao["peak_rss_bytes"], au["peak_rss_bytes"]), ".2f"), "-"],
            ["(b) BF16 GGUF -> GGUF wall time", f"{bu['wall_s']:.1f} s", f"{bo['wall_s']:.1f} s",
             num(ratio(bo["wall_s"], bu["wall_s"]), ".2f"), goal_cell(ratio(bo["wall_s"], bu["wall_s"]), 1.1)],
            ["(b) peak RSS", mib(bu["peak_rss_bytes"]), mib(bo["peak_rss_bytes"]),
             num(ratio(bo["peak_rss_bytes"], bu["peak_rss_bytes"]), ".2f"), "-"]]
    lib = b.get("ours_library_call")
    if lib:
        rows.append(["(b) in-process library call (no interpreter start)", f"{bu['wall_s']:.1f} s",
                     f"{lib['call_s']:.1f} s", num(ratio(lib["call_s"], bu["wall_s"]), ".2f"), "-"])
    cmp = d["comparison"]
    ident = ", ".join(f"{k}: {'byte-identical' if v['tensors_identical'] else 'DIFFER'}" for k, v in cmp.items())
    return [f"Recipe `{d['recipe']}` on the `{d['checkpoint']['size']}` testbed, {d['threads']} threads, best of "
            f"{d['repeat']} fresh processes. (a) upstream = `convert_hf_to_gguf.py --outtype bf16` + `llama-quantize`,"
            f" ours = `glmgguf convert --recipe {d['recipe']}` (one pass); (b) `llama-quantize` vs `glmgguf quantize` "
            "on the same BF16 GGUF.", "",
            *table(["", "upstream", "glmgguf", "ours/upstream", "goal"], rows), "",
            f"Quantized tensors vs upstream ({ident}). Load average after the runs: "
            f"{', '.join(f'{x:.1f}' for x in d['machine'].get('load_avg_after', []))} (shared machine)."]


def sec_recipe_kld(d: dict) -> list[str]:
    out = [f"Trained tiny testbed, each recipe converted in one pass; KLD vs the F32 GGUF on held-out text "
           f"(`{d['settings']['kld_text']}`), KV cache {d['settings']['kv_cache']}; imatrix from "
           f"`{d['settings']['imatrix_text']}`."]
    for run in d["runs"]:
        out += ["", f"ctx {run['ctx']} ({run['chunks']} chunks, {run['scored_tokens']} scored tokens):", ""]
        out += table(["recipe", "bpw", "size MiB", "mean KLD", "99% KLD", "same top %", "mean KLD with imatrix"],
                     recipe_rows(run["rows"]))
    return out


def recipe_rows(rows: list[dict]) -> list[list[str]]:
    plain = {r["recipe"]: r for r in rows if not r["imatrix"]}
    imat = {r["recipe"]: r for r in rows if r["imatrix"]}
    out = []
    for name, r in sorted(plain.items(), key=lambda kv: -kv[1]["bpw"]):
        k, ki = r["kld"], imat.get(name, {}).get("kld", {})
        out.append([f"`{name}`", f"{r['bpw']:.2f}", f"{r['size_bytes'] / MIB:.1f}",
                    f"{num(k['mean_kld'], '.3g')} ± {num(k['mean_kld_err'], '.1g')}",
                    num(k.get("kld_percentiles", {}).get("99.0"), ".3g"), num(k["same_top_pct"], ".2f"),
                    num(ki.get("mean_kld"), ".3g")])
    return out


def sec_reap_quality(d: dict) -> list[str]:
    rows = []
    for m in d["models"]:
        for ratio_s, methods in m["summary"].items():
            cells = [f"{v['kl_mean']:.4f}" + (f" ± {v['kl_std']:.4f}" if v["kl_std"] else "")
                     for v in methods.values()]
            lowest = min(methods, key=lambda k: methods[k]["kl_mean"])
            rows.append([m["label"], f"{100 * float(ratio_s):.0f}%", *cells, lowest])
    methods = list(d["models"][0]["summary"].values())[0].keys()
    cal, ev = d["calibration"], d["eval"]
    return [f"KL(unpruned || pruned) per token on {ev['source']} ({ev['seqs']} x {ev['seq_len']}), each plan written "
            f"as a real pruned checkpoint; mean ± std over {len(cal['samples'])} calibration samples "
            f"({cal['seqs']} x {cal['seq_len']} tokens, {cal['source']}).", "",
            *table(["model", "pruned", *methods, "lowest KL"], rows)]


def sec_reap_memory(d: dict) -> list[str]:
    m, g = d["measured"], d["glm52_extrapolation"]
    rows = [[mode, mib(v["peak_rss_bytes"]), f"{m['above_floor_mib'][mode]:.0f} MiB", num(v.get("tokens_per_s")),
             num(v.get("wall_s"), ".0f")] for mode, v in m["modes"].items()]
    one, eight = g["one_h100_streaming"], g["eight_h100"]
    diffs = ", ".join(f"{k} {v:g}" for k, v in m["stats_max_rel_diff_vs_in_memory"].items())
    return [f"{m['model']} ({m['weights_bytes'] / MIB:.0f} MiB {m['dtype']} weights), {m['seqs']} x {m['seq_len']} "
            "tokens, each mode in a fresh process; `floor` imports the same libraries and does nothing.", "",
            *table(["mode", "peak RSS", "above floor", "tokens/s", "observe s"], rows), "",
            f"Statistics vs in-memory, max relative difference: {diffs}.", "",
            f"GLM-5.2 extrapolation ({g['samples']} x {g['seq_len']} tokens, assumptions in the JSON):", "",
            *table(["", "one H100, streaming", "eight H100"],
                   [["GPU memory", f"{one['gpu_memory_gb']} GB", f"{eight['gpu_memory_gb_each']} GB each"],
                    ["total time", f"{one['total_min_activations_in_ram']}-{one['total_min_activations_on_nvme']} min",
                     f"{eight['total_min_best']}-{eight['total_min_worst']} min"],
                    ["in-memory feasible", "-", str(eight["in_memory_feasible"])]])]


def sec_nvfp4(d: dict) -> list[str]:
    rows = [[r["device"], r["threads"], num(r["expert_gb_per_s"]), num(r["kernel_gb_per_s"]),
             num(r["total_gb_per_cpu_s"]), num(r["glm52_expert_export_hours"]), num(r.get("glm52_cpu_core_hours"))]
            for r in d["runs"]]
    ck = d["checkpoint"]
    return [f"Synthetic checkpoint with GLM-5.2-shaped experts ({ck['experts_per_layer']} per layer, "
            f"{ck['moe_layers']} MoE layers, {ck['expert_shape']} BF16); extrapolated to "
            f"{d['glm52_expert_bytes'] / 1e12:.2f} TB of GLM-5.2 expert weights. Load average (1 min): "
            f"{d['machine'].get('load_avg_1m')}.", "",
            *table(["device", "threads", "export GB/s", "kernel GB/s", "GB per CPU s", "GLM-5.2 export h",
                    "GLM-5.2 CPU core-h"], rows)]


def sec_nvfp4_quality(d: dict) -> list[str]:
    rows = [[k, num(v["mean_kl"]), num(v["max_kl"]), f"{v['top1_agreement']:.3f}", v["positions"]]
            for k, v in d.items() if isinstance(v, dict) and "mean_kl" in v]
    return ["Trained tiny testbed; float64 KL(reference || NVFP4) per position.", "",
            *table(["case", "mean KL", "max KL", "top-1 agreement", "positions"], rows)]


def sec_patches(d: dict) -> list[str]:
    rows = [[f"{p['outtype']}, MTP {p['mtp']}, indexer {p['indexer']}", num(p["unpatched"]["mean_kl"]),
             num(p["patched"]["mean_kl"]), num(p["patched"]["top1_agreement"], ".4f")] for p in d["parity"]]
    nu = d["nonuniform"]
    kept = ", ".join(f"{v}" for v in nu["kept_experts"].values())
    rows.append([f"non-uniform prune (kept experts per layer: {kept}) vs masked reference", "-",
                 num(nu["vs_masked_reference"]["mean_kl"]), num(nu["vs_masked_reference"]["top1_agreement"], ".4f")])
    eps = [[e["tokens"], num(e["eps_1e-6_patched"]["mean_kl"]), num(e["eps_0_patched"]["mean_kl"]),
            num(e["unpatched"]["mean_kl"])] for e in d.get("indexer_norm_eps", [])]
    kv = [[f"-ctk/-ctv {r['cache']}, indexer cache {r['indexer_cache']}", num(r["mean_kl"]),
           num(r["top1_agreement"], ".4f")] for r in d["kv_cache_type"]["rows"]]
    return [f"Mean KL(transformers || llama.cpp) over {d['tokens']} positions, trained tiny testbed; patches: "
            + ", ".join(f"`{p}`" for p in d["patched"]) + ".", "",
            *table(["case", "pinned (unpatched)", "patched", "top-1 agreement (patched)"], rows), "",
            "Indexer k_norm eps (mean KL):", "",
            *table(["tokens", "eps 1e-6 from GGUF (patched)", "eps 0 (patched, kv override)", "unpatched"], eps), "",
            f"KV cache type ({d['kv_cache_type']['testbed']}, {d['kv_cache_type']['tokens']} tokens, patched):", "",
            *table(["cache", "mean KL", "top-1 agreement"], kv)]


def sec_eval_loops(d: dict) -> list[str]:
    fp = d["false_positives"]
    rows = [[label, r["n"], pct(r["loop_rate"]), f"{pct(r['loop_ci95'][0])}-{pct(r['loop_ci95'][1])}",
             r.get("borderline", "-"), num(r.get("distinct4_mean"), ".3f"), num(r.get("median_tokens"), ".0f")]
            for label, r in d["runs"].items()]
    return [f"False positives on natural text: {fp['loops']} loops in {fp['chunks']} chunks of "
            f"{fp['tokens_per_chunk']} tokens (95% CI up to {pct(fp['loop_ci95'][1], '.2f')}), "
            f"{fp['borderline']} borderline; detector {fp['detector_us_per_token']:.1f} µs/token.", "",
            f"Loop rates of the trained tiny testbed (q8_0 GGUF in llama-server), {d['prompts']} prompts, "
            f"safety cap {d['safety_cap']} tokens:", "",
            *table(["sampler", "n", "loop rate", "95% CI", "borderline", "distinct-4", "median tokens"], rows)]


def sec_kd(d: dict) -> list[str]:
    rows = []
    for st in d.get("students", []):
        b, a = st.get("heldout_before", {}), st.get("heldout_after", {})
        chosen = next((r for r in st.get("runs", []) if r.get("lr") == st.get("chosen_lr")), {})
        rows.append([f"{st.get('keep')}/16 ({pct(st.get('pruned_fraction'), '.0f')} pruned)", num(b.get("kl"), ".5f"),
                     num(a.get("kl"), ".5f"), pct(st.get("recovery")), pct(st.get("recovery_float64")),
                     f"{num(b.get('top1'), '.3f')} -> {num(a.get('top1'), '.3f')}", num(st.get("chosen_lr"), "g"),
                     num(chosen.get("seconds_per_step"), ".2f"), num((st.get("gguf_parity") or {}).get("mean_kl"))])
    out = ["Held-out KL(teacher || student) of the REAP-pruned trained tiny testbed, before and after Router-KD "
           "(learning rate chosen on a validation set).", "",
           *table(["kept experts", "KL before", "KL after", "reduction", "reduction (float64 KL)", "top-1",
                   "chosen lr", "s/step", "llama.cpp vs transformers KL"], rows)]
    tr = d.get("glm52_trainable")
    if tr:
        out += ["", "Router-KD's trainable share of GLM-5.2: " + "; ".join(
            f"{k} {v['trainable']:,} of {v['total']:,} ({v['fraction']:.2e})" for k, v in tr.items()) + "."]
    if (RESULTS / "kd_recovery.png").exists():
        out += ["", "Curves: [`results/kd_recovery.png`](results/kd_recovery.png)"]
    return out


def sec_lora(d: dict) -> list[str]:
    g = d["glm52"]["rank8_attn_shared_gates"]
    rows = [[f"8 x {gpu}", f"{v['lora_bytes'] / 1e9:.1f} GB", f"{v['lora_s_per_step']:.1f} s",
             f"{v['lora_hours']:.1f} h"] for gpu, v in g["per_gpu"].items()]
    return [f"Trained tiny testbed pruned to {d['keep']}/16 experts, {d['steps']} steps each, learning rates chosen "
            "on a validation set; held-out KL (exact, full vocabulary):", "", d["table"].rstrip(), "",
            f"GLM-5.2 at {d['glm52']['assume']['keep']} experts, rank 8 on attention + shared experts + gates: "
            f"{g['adapter_parameters']:,} trainable parameters, LoRA / Router-KD step time "
            f"{d['glm52']['measured_step_ratio']:.2f}x measured ({d['glm52']['step_ratio']:.2f}x used), "
            f"{d['glm52']['assume']['steps']} steps offloaded:", "",
            *table(["GPUs", "per GPU", "s/step", "time"], rows)]


def sec_lora_loops(d: dict) -> list[str]:
    return [f"The shipped testbed plan's checkpoints as q4_protected GGUFs, the first {d['limit']} fuzz prompts, "
            f"safety cap {d['safety_cap']} tokens; loops / prompts (95% Wilson CI, z against the unpruned run):", "",
            d["table"].rstrip()]


def sec_glm52_sizes(d: dict) -> list[str]:
    models = d["models"]
    names = list(next(iter(models.values()))["recipes"])
    rows = [[f"`{n}`", *(f"{m['recipes'][n]['tensor_bytes'] / 1e9:.1f} GB / {m['recipes'][n]['bpw']:.2f}"
                          for m in models.values())] for n in names]
    counts = ", ".join(f"{k} {m['parameters'] / 1e9:.1f} B parameters" for k, m in models.items())
    return [f"Tensor bytes from `examples/glm52_config.json` alone ({counts}); bits per weight over all tensors.", "",
            *table(["recipe", *(f"{k}: size / bpw" for k in models)], rows)]


def _hours(v: float | None) -> str:
    return "- (needs CPU offload)" if v is None else f"{v:.1f} h"


def sec_kd_cost(d: dict) -> list[str]:
    out = []
    small = d.get("small_testbed")
    if small:
        rows = [[label, num(v["seconds_per_step"], ".2f"), f"{v['peak_rss_mib']:.0f} MiB"]
                for label, v in small.items()]
        out += ["`small` testbed pruned to 42 of 64 experts, `glmgguf kd train` (batch 4 x 256 tokens):", "",
                *table(["mode", "s/step", "peak RSS"], rows), ""]
    else:
        out += ["Small-testbed measurement not in the JSON (run without `--no-run`).", ""]
    g, a = d["glm52"], d["assume"]
    rows = [[f"8 x {gpu}", f"{v['memory_8_gpus_gb']} GB", "yes" if v["fits_8_gpus"] else "no",
             _hours(v["hours_device_map_auto"]), _hours(v["hours_if_pipelined"])] for gpu, v in g["gpus"].items()]
    return out + [f"GLM-5.2 pruned to {a['keep']} experts, {a['steps']} steps x {a['batch']} x {a['seq_len']} tokens "
                  f"({g['flops']:.2e} FLOPs at {a['mfu']:.0%} MFU); frozen student {g['student_bf16_gb']:.0f} GB BF16, "
                  f"{g['trainable_params']:,} trainable parameters:", "",
                  *table(["GPUs", "memory", "student fits", "device_map auto", "if pipelined"], rows)]


def sec_mtp(d: dict) -> list[str]:
    rows = []
    for v in d["variants"]:
        i, h = v["identity"], v.get("heldout") or {}
        rows.append([v["name"], f"{i['identical']}/{i['prompts']}", f"{pct(v['acceptance'])} "
                     f"({v['accepted']}/{v['drafted']})", num(v["mean_accepted_per_step"], ".2f"),
                     "/".join(pct(p, ".0f") for p in v["acceptance_per_position"]),
                     pct(v["eval_runs"]["raw"]["acceptance"]), pct(h.get("mtp_vs_own_trunk")),
                     f"{v['tokens_per_s_plain']:.0f} -> {v['tokens_per_s_mtp']:.0f}"])
    s = d["settings"]
    return [f"F32 GGUFs of the trained tiny testbed in llama-server `--spec-type draft-mtp` (up to {s['draft_max']} "
            f"drafts per step), {s['prompts']} held-out code prompts x {s['n_predict']} greedy tokens:", "",
            *table(["model", "greedy identical", "acceptance (greedy)", "accepted / step", "per position",
                    "acceptance (T=1)", "one-token acceptance, held-out text", "tokens/s without -> with"], rows)]


def sec_dist_scaling(d: dict) -> list[str]:
    m, g, a = d.get("measured"), d["glm52_fsdp_kd"], d["assume"]
    out = []
    if m:
        rows = [[what, num(m[what]["1"][key], ".2f"), num(m[what]["2"][key], ".2f"), num(m[what]["speedup"], ".2f")]
                for what, key in (("observe", "tokens_per_s"), ("kd", "steps_per_s"))]
        out += ["Trained tiny testbed, float32, one thread per rank, gloo (tokens/s for observe, steps/s for KD):", "",
                *table(["pass", "1 process", "2 ranks", "ratio"], rows), ""]
    rows = [[f"8 x {gpu}", f"{v['memory_gb']} GB", f"{v['per_gpu_gb']:.0f} GB", _hours(v["hours"]),
             f"{v['per_gpu_gb_cpu_offload']:.0f} GB", _hours(v["hours_cpu_offload"])] for gpu, v in g["gpus"].items()]
    return out + [f"GLM-5.2 pruned to {a['keep']} experts ({g['student_bf16_gb']:.0f} GB BF16), `kd train --fsdp`, "
                  f"{a['steps']} steps x {a['batch']} x {a['seq_len']} tokens at {a['mfu']:.0%} MFU:", "",
                  *table(["GPUs", "memory", "per GPU", "time", "per GPU, --cpu-offload", "time, --cpu-offload"],
                         rows)]


SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "convert_vs_upstream": sec_convert, "quantize_vs_upstream": sec_quantize, "recipe_kld": sec_recipe_kld,
    "reap_quality": sec_reap_quality, "reap_memory": sec_reap_memory, "nvfp4_export": sec_nvfp4,
    "patches_parity": sec_patches, "eval_loops": sec_eval_loops, "kd_recovery": sec_kd, "kd_cost": sec_kd_cost,
    "lora_recovery": sec_lora, "lora_loops": sec_lora_loops,
    "glm52_sizes": sec_glm52_sizes,
    "nvfp4_quality": sec_nvfp4_quality,
    "mtp_acceptance": sec_mtp,
    "dist_scaling": sec_dist_scaling,
}


# ---------------------------------------------------------------- report


def section(name: str) -> list[str]:
    """One benchmark's section: heading, provenance line and its tables (or why there are none)."""
    head = [f"## {name}", "", f"{SCRIPTS[name]} (`bench/{name}.py`).", ""]
    doc = load(name)
    if doc is None:
        return head + [f"Not run yet: no `results/{name}.json` (run `python bench/run_all.py --only {name}`).", ""]
    try:
        body = SECTIONS[name](doc)
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError) as e:
        body = [f"Could not summarize `results/{name}.json` ({type(e).__name__}: {e}); see the JSON."]
    return head + [machine_line(name, doc), "", *body, ""]


def overview() -> list[str]:
    """The ours/upstream ratios in one table."""
    rows = [[label, f"{r:.2f}", "-" if goal is None else f"<= {goal} ({'met' if r <= goal else 'missed'})"]
            for label, r, goal in key_ratios()]
    return table(["ours / upstream", "ratio", "goal"], rows) if rows else []


def key_ratios() -> list[tuple[str, float, float | None]]:
    """(label, ours/upstream, goal) from the convert and quantize JSONs."""
    out: list[tuple[str, float, float | None]] = []
    c, q = load("convert_vs_upstream"), load("quantize_vs_upstream")
    if c:
        for key, label in (("wall_s", "wall"), ("peak_rss_bytes", "peak RSS"), ("output_bytes", "bytes written")):
            out.append((f"convert bf16: {label}", c["ours"][key] / c["upstream"][key], None))
    if q:
        a, b = q["a_pipeline"], q["b_quantize"]
        for key, label, goal in (("wall_s", "wall", 0.6), ("peak_rss_bytes", "peak RSS", None),
                                 ("file_bytes_written", "bytes written", None)):
            out.append((f"convert+quantize ({q['recipe']}): {label}", a["ours"][key] / a["upstream"][key], goal))
        for key, label, goal in (("wall_s", "wall", 1.1), ("peak_rss_bytes", "peak RSS", None),
                                 ("output_bytes", "bytes written", None)):
            out.append((f"quantize GGUF ({q['recipe']}): {label}", b["ours"][key] / b["upstream"][key], goal))
    return out


def write_report() -> None:
    chart = write_chart()
    REPORT.write_text(report_text(chart))
    print(f"wrote {REPORT.relative_to(ROOT)}" + (f" and {CHART.relative_to(ROOT)}" if chart else ""))


def report_text(chart: bool) -> str:
    """bench/RESULTS.md from the JSONs (`chart`: link the summary chart)."""
    lines = ["# Benchmark results", "",
             "<!-- generated by bench/run_all.py; do not edit by hand -->",
             "Generated by `python bench/run_all.py --report-only` from the JSON files under `bench/results/` "
             "(`python bench/run_all.py` reruns the benchmarks first). Do not edit by hand. Ratios are "
             "ours / reference tool: below 1 is faster, smaller or less memory. Timings come from a shared "
             "2-core machine and are noisy.", "", *overview(), ""]
    if chart:
        lines += [f"![key ratios](results/{CHART.name})", ""]
    for name in SCRIPTS:
        lines += section(name)
    return "\n".join(lines).rstrip() + "\n"


def write_chart() -> bool:
    """bench/results/summary.png: ours/upstream ratios and recipe KLD vs bits per weight. False if no data."""
    ratios, kld = key_ratios(), load("recipe_kld")
    if not ratios and not kld:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100, gridspec_kw={"width_ratios": [1.2, 1]})
    plot_ratios(axes[0], ratios)
    plot_kld(axes[1], kld)
    fig.tight_layout()
    fig.savefig(CHART, metadata={"Software": None})
    plt.close(fig)
    return True


def plot_ratios(ax, ratios: list[tuple[str, float, float | None]]) -> None:
    labels = [r[0] for r in ratios][::-1]
    values = [r[1] for r in ratios][::-1]
    goals = [r[2] for r in ratios][::-1]
    colors = ["tab:red" if g and v > g else "tab:green" if v <= 1 else "tab:orange"
              for v, g in zip(values, goals, strict=True)]
    ax.barh(labels, values, color=colors)
    for i, (v, goal) in enumerate(zip(values, goals, strict=True)):
        ax.text(max(v, goal or 0) + 0.03, i, f"{v:.2f}" + (f" (goal <= {goal})" if goal else ""), va="center",
                fontsize=8)
        if goal:
            ax.plot([goal, goal], [i - 0.4, i + 0.4], color="k", lw=1.5)
    ax.axvline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_xlim(0, max(values + [1.0]) * 1.35)
    ax.set_xlabel("ours / upstream (below 1 is better; black tick: goal, red: goal missed)")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title("glmgguf vs convert_hf_to_gguf.py / llama-quantize", fontsize=10)


def plot_kld(ax, kld: dict | None) -> None:
    if not kld:
        ax.set_axis_off()
        return
    for run, marker in zip(kld["runs"], "os^v", strict=False):
        pts = [(r["bpw"], r["kld"]["mean_kld"], r["recipe"]) for r in run["rows"]
               if not r["imatrix"] and r["kld"].get("mean_kld") and r["kld"]["mean_kld"] > 0]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"ctx {run['ctx']}")
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all tensors, tiny testbed)")
    ax.set_ylabel("mean KLD vs F32 GGUF")
    ax.set_title("Recipe KLD vs F32 (recipe_kld.py, no imatrix)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


# ---------------------------------------------------------------- running


def run_script(name: str) -> tuple[int, float]:
    """Run bench/NAME.py in a subprocess, output to results/logs/NAME.log: (return code, seconds)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{name}.log"
    print(f"[{name}] running, log in {log.relative_to(ROOT)}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, str(BENCH / f"{name}.py")], cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    dt = time.perf_counter() - t0
    print(f"[{name}] {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {duration(dt)}", flush=True)
    return rc, dt


def record_timing(name: str, rc: int, seconds: float) -> None:
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    timings[name] = {"seconds": round(seconds, 1), "returncode": rc,
                     "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")}
    TIMINGS.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")


def run_all(names: list[str]) -> list[str]:
    """Run the scripts in turn; the names of those that failed."""
    failed = []
    for name in names:
        rc, dt = run_script(name)
        record_timing(name, rc, dt)
        if rc != 0:
            failed.append(name)
    return failed


def typical_runtime(name: str) -> str:
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    if timings.get(name, {}).get("returncode") == 0:
        return f"{duration(timings[name]['seconds'])} (last run_all run)"
    doc = load(name)
    got = runtime_from_json(name, doc) if doc else None
    if got is None:
        return "unknown (no JSON yet)" if doc is None else "unknown"
    seconds, complete = got
    return f"{'' if complete else '>= '}{duration(seconds)} ({'total' if complete else 'measured runs'} in JSON)"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def list_scripts() -> None:
    width = max(map(len, SCRIPTS))
    for name, what in SCRIPTS.items():
        print(f"{name:<{width}}  {typical_runtime(name):<38}  {what}")


def select(only: list[str] | None, skip: list[str] | None) -> list[str]:
    unknown = sorted((set(only or []) | set(skip or [])) - set(SCRIPTS))
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(SCRIPTS)}")
    return [n for n in SCRIPTS if (not only or n in only) and n not in (skip or [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    ap.add_argument("--skip", nargs="+", metavar="NAME", help="do not run these benchmarks")
    ap.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md and the chart")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their runtime, then exit")
    args = ap.parse_args()
    if args.list:
        return list_scripts()
    failed = [] if args.report_only else run_all(select(args.only, args.skip))
    write_report()
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (logs in {LOGS.relative_to(ROOT)}/)")


if __name__ == "__main__":
    main()
