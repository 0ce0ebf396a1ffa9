"""Every measured number in README.md stands on a committed JSON under bench/results/ (written by a bench script).

CLAIMS pairs README phrases with the JSON values they state: each phrase is formatted from the JSON and must appear
in the README word for word, so a README figure and its JSON cannot disagree. The scan below checks that every
number in the benchmark tables of the README is a value of that section's JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIB = 2**20


def _readme() -> str:
    return " ".join((ROOT / "README.md").read_text().split())


def _json(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _get(doc: object, path: str) -> object:
    for key in path.split("/"):
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    return doc


def _sci(v: float) -> str:
    """3.8e-3 / 4.0e18: the README's way of writing `f"{v:.1e}"`."""
    mantissa, exp = f"{v:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _runs(n: int) -> str:
    return "one run each" if n == 1 else f"best of {n}"


def _kd(keep: int) -> Callable[[dict], dict]:
    def fields(d: dict) -> dict:
        s = next(s for s in d["students"] if s["keep"] == keep)
        b, a = s["heldout_before"], s["heldout_after"]
        return {"before": b["kl"], "after": a["kl"], "red": 100 * s["recovery"], "t0": b["top1"], "t1": a["top1"],
                "m0": b["mtp_kl"], "m1": a["mtp_kl"], "lr": s["chosen_lr"]}
    return fields


def _recipe(ctx: int, recipe: str) -> Callable[[dict], dict]:
    def fields(d: dict) -> dict:
        run = next(r for r in d["runs"] if r["ctx"] == ctx)
        row = next(r for r in run["rows"] if r["recipe"] == recipe and not r["imatrix"])
        return {"bpw": row["bpw"], "mib": row["size_bytes"] / MIB, "same": row["kld"]["same_top_pct"],
                "tokens": run["scored_tokens"]}
    return fields


def _speed(d: dict) -> dict:
    a, b = d["a_pipeline"], d["b_quantize"]
    return {"au": a["upstream"]["wall_s"], "ao": a["ours"]["wall_s"], "ar": a["ratios"]["wall"],
            "wu": a["upstream"]["file_bytes_written"] / MIB, "wo": a["ours"]["file_bytes_written"] / MIB,
            "wr": a["ratios"]["file_bytes_written"], "ru": a["upstream"]["peak_rss_bytes"] / MIB,
            "ro": a["ours"]["peak_rss_bytes"] / MIB, "rr": a["ratios"]["peak_rss"], "bu": b["upstream"]["wall_s"],
            "bo": b["ours"]["wall_s"], "br": b["ratios"]["wall"], "bl": b["ours_library_call"]["call_s"],
            "blr": b["ratios"]["library_call"], "bru": b["upstream"]["peak_rss_bytes"] / MIB,
            "bro": b["ours"]["peak_rss_bytes"] / MIB, "brr": b["ratios"]["peak_rss"], "runs": _runs(d["repeat"])}


def _memory(d: dict) -> dict:
    m, x = d["measured"]["modes"], d["glm52_extrapolation"]
    one, eight = x["one_h100_streaming"], x["eight_h100"]
    return {**{k.replace("-", "_"): m[k]["peak_rss_bytes"] / MIB for k in m},
            **{f"{k.replace('-', '_')}_up": v for k, v in d["measured"]["above_floor_mib"].items()},
            "one_lo": one["total_min_activations_in_ram"], "one_hi": one["total_min_activations_on_nvme"],
            "eight_lo": eight["total_min_best"], "eight_hi": eight["total_min_worst"]}


def _speeds(d: dict) -> dict:
    m = d["measured"]["modes"]
    base = m["in-memory"]["tokens_per_s"]
    return {"ram": m["streaming"]["tokens_per_s"] / base, "spill": m["streaming-spill"]["tokens_per_s"] / base}


def _kd_cost(d: dict) -> dict:
    g, s = d["glm52"], d["small_testbed"]
    ck, nock = s["gradient checkpointing"], s["no checkpointing"]
    return {"ck": ck["seconds_per_step"], "ckm": ck["peak_rss_mib"], "no": nock["seconds_per_step"],
            "nom": nock["peak_rss_mib"], "flops": _sci(g["flops"]),
            "trainable": g["trainable_params"] / 1e6,
            "h200": g["gpus"]["H200"]["hours_device_map_auto"], "b200": g["gpus"]["B200"]["hours_device_map_auto"]}


def _fsdp_hours(d: dict) -> dict:
    g = d["glm52_fsdp_kd"]["gpus"]
    assert g["H100"]["hours_cpu_offload"] == g["H200"]["hours_cpu_offload"]
    return {"h100": g["H100"]["hours_cpu_offload"], "b200": g["B200"]["hours"], "b200o": g["B200"]["hours_cpu_offload"]}


def _lora(d: dict) -> dict:
    kd, pruned = d["router_kd"]["held"]["kl"], d["pruned"]["kl"]
    default, r32 = d["lora"][0]["held"]["kl"], next(r for r in d["lora"] if r["rank"] == 32)["held"]["kl"]
    return {"vs_kd": 100 * (1 - default / kd), "kd2": 100 * (1 - d["router_kd_2x"]["held"]["kl"] / kd),
            "vs_pruned": 100 * (1 - default / pruned), "r32": 100 * (1 - r32 / pruned)}


def _gptq_quality(d: dict) -> dict:
    return {"ga": d["gptq_all"]["mean_kl"], "gat": d["gptq_all"]["top1_agreement"], "ra": d["rtn_all"]["mean_kl"],
            "rat": d["rtn_all"]["top1_agreement"], "ge": d["gptq_experts"]["mean_kl"],
            "re": d["rtn_experts"]["mean_kl"], "ne": d["nvfp4_experts"]["mean_kl"],
            "q4": d["llama_cpp"]["q4_protected"]["mean_kl"]}


def _gptq_export(d: dict) -> dict:
    m = d["testbed_export"]["modules"]
    return {"ts": d["testbed_export"]["seconds"], "gu": d["glm52_expert_gate_up"]["gptq_s"],
            "gd": d["glm52_expert_down"]["gptq_s"], "gh": d["glm52_168_experts_hours"]["total"],
            "g": m["gptq"], "r": m["rtn_few_tokens"]}


def _sizes(d: dict) -> dict:
    m = d["models"]["unpruned"]
    q4 = m["recipes"]["q4_protected"]
    return {"bpw": q4["bpw"], "gb": q4["tensor_bytes"] / 1e9, "params": m["parameters"] / 1e9}


def _nvfp4(d: dict) -> dict:
    r = d["runs"][0]
    return {"gbs": r["expert_gb_per_s"], "cpu": r["total_gb_per_cpu_s"], "core_h": r["glm52_cpu_core_hours"],
            "h": r["glm52_expert_export_hours"], "tb": d["glm52_expert_bytes"] / 1e12}


def _nvfp4_kl(d: dict) -> dict:
    return {k: _sci(v["mean_kl"]) for k, v in d.items() if isinstance(v, dict) and "mean_kl" in v} | {
        f"{k}_top1": 100 * v["top1_agreement"] for k, v in d.items() if isinstance(v, dict) and "mean_kl" in v}


def _convert(d: dict) -> dict:
    u, o = d["upstream"], d["ours"]
    return {"runs": _runs(len(u["wall_s_all"])), "u": u["wall_s"], "um": u["peak_rss_bytes"] / MIB, "o": o["wall_s"],
            "om": o["peak_rss_bytes"] / MIB, "x": d["ratios"]["wall"], "m": d["ratios"]["peak_rss"],
            "same": d["comparison"]["tensors"]["identical"]}


def _scale(d: dict) -> dict:
    full, small = d["sources"]["fp8-256"], d["sources"]["fp8-32"]
    st, sm = full["stages"], small["stages"]
    ratio = small["ratios"]["upstream-q8_0 / convert-q8_0"]
    return {"gb": full["slice"]["bytes"] / 1e9, "q4_cpu": st["convert-q4_protected"]["cpu_s"],
            "q4_core_h": st["convert-q4_protected"]["extrapolation"]["glm52_cpu_core_h"],
            "q4_rss": st["convert-q4_protected"]["peak_rss_gib"],
            "prune_s": st["reap-prune"]["wall_s"], "prune_h": st["reap-prune"]["extrapolation"]["glm52_h"],
            "prune_rss": st["reap-prune"]["peak_rss_gib"],
            "nv_cpu": st["nvfp4-export"]["cpu_s"],
            "nv_core_h": st["nvfp4-export"]["extrapolation"]["glm52_cpu_core_h"],
            "nv_rss": st["nvfp4-export"]["peak_rss_gib"], "obs_rss": st["reap-observe"]["peak_rss_gib"],
            "killed": st["upstream-q8_0"]["killed_at_rss_gib"], "up_rss": sm["upstream-q8_0"]["peak_rss_gib"],
            "ours_rss": sm["convert-q8_0"]["peak_rss_gib"], "x": ratio["wall"], "m": ratio["peak_rss"],
            "trunc_s": st["truncated-shard"]["wall_s"], **_scale_pipeline(small["ratios"]), **_scale_more(d)}


def _scale_more(d: dict) -> dict:
    """The BF16 slice, the slice with an MoE trunk layer, the full disk and dequantize at 256 experts."""
    full, bf, mt = (d["sources"][k]["stages"] for k in ("fp8-256", "bf16-256", "fp8-256-moe-trunk"))
    for failed in (full["full-disk"], bf["full-disk"], full["truncated-shard"]):
        assert failed["returncode"] == 1 and failed["output_left"] == [] and failed["last_line"].startswith("Error: ")
    return {"bf_q4_rss": bf["convert-q4_protected"]["peak_rss_gib"], "mt_obs_rss": mt["reap-observe"]["peak_rss_gib"],
            "mt_kd_rss": mt["kd-teacher"]["peak_rss_gib"], "dq_rss": full["nvfp4-dequantize"]["peak_rss_gib"],
            "fd_s": full["full-disk"]["wall_s"], "bf_fd_s": bf["full-disk"]["wall_s"]}


def _scale_pipeline(r: dict) -> dict:
    pipe, q = r["upstream-bf16 + llama-quantize / convert-q4_protected"], r["llama-quantize / quantize"]
    return {"pw": pipe["wall"], "pm": pipe["peak_rss"], "pb": pipe["bytes_written"], "qw": 1 / q["wall"],
            "qm": q["peak_rss"]}


def _dev_seeds(d: dict) -> dict:
    """The loop families found per development seed of bench/loop_detection.py: prose and nested listed ("199, 198
    and 200"), the least of the others."""
    dev = list(d["dev_seeds"].values())

    def listed(family: str) -> str:
        found = [str(f[family]) for f in dev]
        return ", ".join(found[:-1]) + " and " + found[-1]

    seeds = sorted(map(int, d["dev_seeds"]))
    others = min(v for f in dev for k, v in f.items() if k not in ("prose", "nested"))
    return {"seeds": f"{seeds[0]}-{seeds[-1]}", "prose": listed("prose"), "nested": listed("nested"), "others": others}


# (README phrase with {fields}, the JSON it comes from, the fields read from that JSON)
CLAIMS: list[tuple[str, str, Callable[[dict], dict]]] = [
    ("quantized linear {ga:.4f} (top-1 {gat:.1%}) against round-to-nearest {ra:.4f} ({rat:.1%})", "gptq_quality",
     _gptq_quality),
    ("GPTQ {ge:.4f}, round-to-nearest {re:.4f}, NVFP4 {ne:.4f} (4.5 bits); `q4_protected` GGUF in llama.cpp"
     " {q4:.4f}",
     "gptq_quality", _gptq_quality),
    ("the testbed exports in {ts:.1f} s; at GLM-5.2's widths one expert's gate+up takes {gu:.0f} s, its down "
     "{gd:.0f} s",
     "gptq_export", _gptq_export),
    ("about {gh:.0f} CPU-thread hours", "gptq_export", _gptq_export),
    ("(on the testbed: {g} modules GPTQ, {r} round-to-nearest", "gptq_export", _gptq_export),
    ("each in a fresh process, {runs}: upstream {u:.1f} s / {um:.0f} MiB peak RSS, glmgguf {o:.1f} s / {om:.0f} "
     "MiB: **{x:.1f}x faster, {m:.1f}x less memory**", "convert_vs_upstream", _convert),
    ("tensors byte-identical ({same} of {same})", "convert_vs_upstream", _convert),
    ("2 threads, {runs} fresh processes (alternating order)", "quantize_vs_upstream", _speed),
    ("`glmgguf convert --recipe q4_protected` | {au:.1f} s | {ao:.1f} s | **{ar:.2f}**", "quantize_vs_upstream",
     _speed),
    ("| (a) bytes written to disk | {wu:.0f} MiB | {wo:.0f} MiB | **{wr:.2f}** |", "quantize_vs_upstream", _speed),
    ("| (a) peak RSS | {ru:.0f} MiB | {ro:.0f} MiB | **{rr:.2f}** |", "quantize_vs_upstream", _speed),
    ("`llama-quantize` vs `glmgguf quantize` | {bu:.1f} s | {bo:.1f} s | **{br:.2f}**", "quantize_vs_upstream",
     _speed),
    ("called in a warm process | {bu:.1f} s | {bl:.1f} s | {blr:.2f} |", "quantize_vs_upstream", _speed),
    ("| (b) peak RSS | {bru:.0f} MiB | {bro:.0f} MiB | **{brr:.2f}** |", "quantize_vs_upstream", _speed),
    ("| (a) FP8 safetensors -> q4_protected GGUF | {au:.1f} s | {ao:.1f} s | **{ar:.2f}** |",
     "quantize_vs_upstream_fp8", _speed),
    ("| (a) bytes written to disk | {wu:.0f} MiB | {wo:.0f} MiB | **{wr:.2f}** |", "quantize_vs_upstream_fp8",
     _speed),
    ("| (a) peak RSS | {ru:.0f} MiB | {ro:.0f} MiB | **{rr:.2f}** |", "quantize_vs_upstream_fp8", _speed),
    ("`glmgguf quantize` | {bu:.1f} s | {bo:.1f} s | {br:.2f} |", "quantize_vs_upstream_fp8", _speed),
    ("{runs} fresh processes on an otherwise idle 2-core machine", "quantize_vs_upstream_fp8", _speed),
    ("ctx 32 ({tokens} scored tokens)", "recipe_kld", _recipe(32, "f32")),
    ("ctx 128 ({tokens} scored tokens", "recipe_kld", _recipe(128, "bf16")),
    *[(f"| `{r}` | {{bpw:.2f}} | {{mib:.1f}} |", "recipe_kld", _recipe(32, r))
      for r in ("f32", "bf16", "q8_0", "q4_protected", "nvfp4_experts", "q3_protected", "q2_protected")],
    ("q4_protected is {bpw:.2f} bpw: {gb:.1f} GB for {params:.1f} B parameters", "glm52_sizes", _sizes),
    *[(f"| {keep} ({pct}% pruned) | {{before:.5f}} | {{after:.5f}} | **{{red:.1f}}%** | {{t0:.3f}} -> {{t1:.3f}} | "
       "{m0:.4f} -> {m1:.4f} | {lr:g} |", "kd_recovery", _kd(keep)) for keep, pct in ((11, 31), (8, 50))],
    ("| activation checkpointing (default) | {ck:.2f} | {ckm:.0f} MiB |", "kd_cost", _kd_cost),
    ("| `--no-gradient-checkpointing` | {no:.2f} | {nom:.0f} MiB |", "kd_cost", _kd_cost),
    ("{flops} FLOPs (forward", "kd_cost", _kd_cost),
    ("{trainable:.1f} M trainable parameters", "kd_cost", _kd_cost),
    ("one GPU at a time: {h200:.1f} h on 8 x H200, {b200:.1f} h on 8 x B200", "kd_cost", _kd_cost),
    ("| {h100:.1f} h on 8 x H100 or H200 offloaded, {b200:.1f} h on 8 x B200 ({b200o:.1f} h offloaded)",
     "dist_scaling", _fsdp_hours),
    ("| in-memory | {in_memory:.0f} MiB | {in_memory_up:.0f} MiB |", "reap_memory", _memory),
    ("| `--streaming` (activations in RAM) | {streaming:.0f} MiB | {streaming_up:.0f} MiB |", "reap_memory", _memory),
    ("| `--streaming`, spilled to disk | {streaming_spill:.0f} MiB | {streaming_spill_up:.0f} MiB |", "reap_memory",
     _memory),
    ("| total | **{one_lo:.0f}-{one_hi:.0f} min** | **{eight_lo:.0f}-{eight_hi:.0f} min** |", "reap_memory", _memory),
    ("{one_lo:.0f}-{one_hi:.0f} min on one H100, {eight_lo:.0f}-{eight_hi:.0f} min on eight", "reap_memory",
     _memory),
    ("streaming ran at {ram:.2f}x the in-memory speed with its activations in RAM and {spill:.2f}x spilled to disk",
     "reap_memory", _speeds),
    ("mean KL of {dequantized_modelopt} (top-1 agreement {dequantized_modelopt_top1:.1f}%, both layouts)",
     "nvfp4_quality", _nvfp4_kl),
    ("the KL is {w4a4_emulated_modelopt} (top-1 {w4a4_emulated_modelopt_top1:.1f}%)", "nvfp4_quality", _nvfp4_kl),
    ("within KL {gguf_nvfp4_experts_vs_f32_gguf} of its F32 GGUF (top-1 {gguf_nvfp4_experts_vs_f32_gguf_top1:.1f}%;"
     " `q4_protected` on the same 160 held-out tokens: {gguf_q4_protected_vs_f32_gguf}, top-1 "
     "{gguf_q4_protected_vs_f32_gguf_top1:.1f}%)", "nvfp4_quality", _nvfp4_kl),
    ("I/O bound: {prune_h:.1f} h at the rate measured on the real-width slice ({prune_s:.0f} s for {gb:.1f} GB, one "
     "tensor at a time in {prune_rss:.2f} GiB", "scale", _scale),
    ("q4_protected from GLM-5.2-FP8: {q4_core_h:.1f} core-hours of CPU, extrapolated per MoE layer from the "
     "real-width slice ({q4_cpu:.0f} CPU-seconds for {gb:.1f} GB)", "scale", _scale),
    ("CPU: {nv_core_h:.1f} core-hours for GLM-5.2, extrapolated per MoE layer from the real-width slice ({nv_cpu:.0f} "
     "CPU-seconds)", "scale", _scale),
    ("`convert --recipe q4_protected` {q4_rss:.2f} GiB (from BF16 {bf_q4_rss:.2f} GiB), `reap observe --streaming` "
     "{obs_rss:.2f} GiB (the two-MoE-layer slice: {mt_obs_rss:.2f} GiB), `kd teacher --streaming` through a real-width "
     "MoE layer {mt_kd_rss:.2f} GiB, `nvfp4 export` {nv_rss:.2f} GiB, `nvfp4 dequantize` {dq_rss:.2f} GiB, "
     "`reap prune` {prune_rss:.2f} GiB", "scale", _scale),
    ("a full disk (`convert --recipe q4_protected` into a 1 GiB file system, which fills mid-way) ends it after "
     "{fd_s:.1f} s (FP8) and {bf_fd_s:.1f} s (BF16)", "scale", _scale),
    ("at 256 experts it passed {killed:.1f} GiB resident and was stopped", "scale", _scale),
    ("it took **{x:.1f}x our wall time and {m:.1f}x our peak RSS** ({up_rss:.2f} GiB against {ours_rss:.2f} GiB)",
     "scale", _scale),
    ("ends `convert` after {trunc_s:.1f} s with one error", "scale", _scale),
    ("took {pw:.2f}x the wall time of `glmgguf convert --recipe q4_protected`, {pm:.1f}x its peak RSS and wrote "
     "{pb:.2f}x the bytes; `glmgguf quantize` on the same BF16 GGUF took {qw:.2f}x the wall time of `llama-quantize` "
     "with {qm:.1f}x less peak RSS", "scale", _scale),
    ("{gbs:.3f} GB/s of experts end to end, {cpu:.3f} GB per CPU second, i.e. GLM-5.2's {tb:.2f} TB of expert "
     "weights in ~{core_h:.1f} core-hours of CPU ({h:.1f} h on this contended machine)", "nvfp4_export", _nvfp4),
    ("{tables}", "loop_detection", lambda d: {"tables": " ".join(d["tables"].split())}),
    ("{natural_chunks} natural chunks", "loop_detection", lambda d: d),
    ("seeds {seeds} were looked at while developing the rules, and there the same detector finds prose {prose} of "
     "200, nested {nested}, and every other family at least {others} of 200 in each", "loop_detection", _dev_seeds),
    ("The detector costs {nat:.0f} us per token on the natural chunks and {loops:.0f} on the loops", "loop_detection",
     lambda d: {"nat": d["false_positives"]["us_per_token"], "loops": d["recall"]["us_per_token"]}),
    ("{table}", "lora_recovery", lambda d: {"table": " ".join(d["table"].split())}),
    ("{table}", "lora_loops", lambda d: {"table": " ".join(d["table"].split())}),
    ("LoRA-KD lowers the held-out KL of this milder pruning by {red:.1f}% against Router-KD", "lora_loops",
     lambda d: {"red": 100 * (1 - d["heldout_kl"]["lora"] / d["heldout_kl"]["router-kd"])}),
    ("LoRA-KD takes the held-out KL {vs_kd:.1f}% below Router-KD at rank 8 on attention and shared experts; Router-KD "
     "run twice as long gets only {kd2:.1f}% lower. Against the pruned model that is {vs_pruned:.1f}%, and "
     "{r32:.1f}% at rank 32", "lora_recovery", _lora),
    ("({steps} steps x {batch} x {seq_len} tokens)", "lora_recovery", lambda d: d["glm52"]["assume"]),
    ("{params:,} trainable parameters ({bf16:.0f} MB as BF16), {state:.1f} GB of float32 weights", "lora_recovery",
     lambda d: {"params": d["glm52"]["rank8_attn_shared_gates"]["adapter_parameters"],
                "bf16": d["glm52"]["rank8_attn_shared_gates"]["adapter_bf16_bytes"] / 1e6,
                "state": d["glm52"]["rank8_attn_shared_gates"]["train_state_bytes"] / 1e9}),
    ("({ratio:.2f}x measured, within the machine's noise)", "lora_recovery",
     lambda d: {"ratio": d["glm52"]["measured_step_ratio"]}),
]


@pytest.mark.parametrize(("phrase", "name", "fields"), CLAIMS, ids=[f"{c[1]}-{i}" for i, c in enumerate(CLAIMS)])
def test_readme_phrase_matches_its_json(phrase, name, fields):
    doc = _json(name)
    fields = fields(doc)
    assert all(v is not None for v in fields.values()), fields
    want = phrase.format(**fields)
    assert want in _readme(), f"README.md does not say {want!r} (from bench/results/{name}.json)"


def test_no_time_for_a_student_that_does_not_fit():
    """Where the student does not fit the GPUs, no time is given: kd_cost's 8 x H100 with device_map "auto", and
    dist_scaling's FSDP2 without offload on 8 x H100 / H200; the README gives none either."""
    assert _json("kd_cost")["glm52"]["gpus"]["H100"]["hours_device_map_auto"] is None
    assert "8 x H100 (640 GB) needs CPU offload: no time without it here" in _readme()
    g = _json("dist_scaling")["glm52_fsdp_kd"]["gpus"]
    for gpu in ("H100", "H200"):
        assert not g[gpu]["fits"] and g[gpu]["hours"] is None
        row = f"| {gpu} | {g[gpu]['memory_gb']} GB | {g[gpu]['per_gpu_gb']:.0f} GB (does not fit) | - | - |"
        assert row in _readme()


# --- the scan: every number in the README's benchmark tables is a value of the section's JSON ------------------

TABLE_SECTIONS = {  # README heading -> the JSONs its tables come from
    "### Quality per recipe (`bench/recipe_kld.py`)": ["recipe_kld"],
    "### Speed against the reference tools (`bench/quantize_vs_upstream.py`)": ["quantize_vs_upstream",
                                                                                 "quantize_vs_upstream_fp8"],
    "### Does REAP pick better experts? (`bench/reap_quality.py`)": ["reap_quality"],
    "### Memory and speed (`bench/reap_memory.py`)": ["reap_memory"],
    "### How much does it recover? (`bench/kd_recovery.py`)": ["kd_recovery"],
    "### Cost (`bench/kd_cost.py`)": ["kd_cost"],
    "### What LoRA recovers (`bench/lora_recovery.py`)": ["lora_recovery", "lora_loops"],
    "## Evaluation": ["eval_loops", "loop_detection"],
    "### MTP drafting (`--draft-mtp`)": ["mtp_acceptance"],
    "### The patch series": ["patches_parity"],
    "### Scaling and memory (`bench/dist_scaling.py`)": ["dist_scaling"],
    "### Measured at real width (`bench/scale.py`)": ["scale"],
}
SCALES = (1, 100, 1 / MIB, 1 / 1e9, 1 / 1e6, 1 / 60, 1 / 3600)
CONSTANTS = {  # numbers in those tables that are settings, not measurements
    "### Memory and speed (`bench/reap_memory.py`)": {"128": "1024 samples / 8 processes", "640": "8 x 80 GB"},
}
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


def _section(heading: str) -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "### "))), len(lines))
    return lines[start + 1:end]


def _leaves(doc: object) -> Iterator[float]:
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _leaves(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _leaves(v)
    elif isinstance(doc, int | float) and not isinstance(doc, bool):
        yield float(doc)
    elif isinstance(doc, str):  # tables the bench scripts render into their JSON
        yield from (float(n) for n in NUMBER.findall(doc))


def _matches(text: str, values: list[float]) -> bool:
    """Whether some JSON value, in some unit, rounds to `text` at its written precision."""
    x = float(text)
    if "e" in text:
        digits = len(text.split("e")[0].replace(".", "")) - 1
        tol = 0.5 * 10 ** (math.floor(math.log10(x)) - digits) if x else 0
    else:
        tol = 0.5 * 10 ** -len(text.split(".")[1]) if "." in text else 0.5
    return any(abs(v * k - x) <= tol * 1.0001 for v in values for k in SCALES)


def _is_rule(line: str) -> bool:
    return line.startswith("|") and set(line) <= set("|-: ")


def _table_numbers(heading: str) -> Iterator[str]:
    """Numbers in the table body cells of a README section (header rows and first columns aside)."""
    lines = _section(heading)
    for line, nxt in zip(lines, [*lines[1:], ""], strict=True):
        if line.startswith("|") and not _is_rule(line) and not _is_rule(nxt):
            cells = line.strip("|").split("|")
            for cell in cells[1:]:  # the first column names the row
                yield from NUMBER.findall(cell.replace("`", ""))


@pytest.mark.parametrize("heading", list(TABLE_SECTIONS))
def test_every_table_number_is_in_its_json(heading):
    values = [v for name in TABLE_SECTIONS[heading] for v in _leaves(_json(name))]
    known = set(CONSTANTS.get(heading, {}))
    missing = sorted({n for n in _table_numbers(heading) if n not in known and not _matches(n, values)})
    assert not missing, f"{heading}: numbers in its tables that no JSON of {TABLE_SECTIONS[heading]} holds: {missing}"


def _recipe_table(ctx: int) -> dict[str, list[str]]:
    """README's recipe rows (recipe -> cells) under the `ctx N` paragraph of the quality section."""
    rows, current = {}, None
    for line in _section("### Quality per recipe (`bench/recipe_kld.py`)"):
        if line.startswith("ctx "):
            current = int(line.split()[1])
        elif current == ctx and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


@pytest.mark.parametrize("ctx", [32, 128])
def test_recipe_quality_rows_are_the_json_values(ctx):
    """Each KLD, its error, the same-top share and the imatrix KLD: the JSON's value at the README's precision."""
    run = next(r for r in _json("recipe_kld")["runs"] if r["ctx"] == ctx)
    table = _recipe_table(ctx)
    assert len(table) >= 6, table
    for recipe, cells in table.items():
        plain = next(r for r in run["rows"] if r["recipe"] == recipe and not r["imatrix"])
        with_im = next((r for r in run["rows"] if r["recipe"] == recipe and r["imatrix"]), None)
        kld, same, im = cells[-3:]
        want = [plain["kld"]["mean_kld"], plain["kld"]["mean_kld_err"]]
        for text, value in zip(NUMBER.findall(kld), want, strict=False):
            assert _matches(text, [value]), (recipe, ctx, kld, value)
        assert _matches(same, [plain["kld"]["same_top_pct"]]), (recipe, ctx, same)
        if NUMBER.fullmatch(im):
            assert with_im is not None and _matches(im, [with_im["kld"]["mean_kld"]]), (recipe, ctx, im)


def test_results_md_is_generated_from_the_jsons():
    """bench/RESULTS.md is what `bench/run_all.py --report-only` writes from the committed JSONs (its provenance
    lines, which name commit or file dates, aside)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("[`results/")]

    report = (ROOT / "bench" / "RESULTS.md").read_text()
    want = run_all.report_text(chart="results/summary.png" in report)
    assert body(report) == body(want), "bench/RESULTS.md is stale: run `python bench/run_all.py --report-only`"
