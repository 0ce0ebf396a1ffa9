#!/usr/bin/env python3
"""MTP draft acceptance in llama-server (`--spec-type draft-mtp`): unpruned, REAP-pruned, and after Router-KD.

    python bench/mtp_acceptance.py [--keeps 11 8] [--steps 150] [--prompts 64] [--n-predict 128]

Models: the trained tiny testbed (16 experts, top-4, the MTP block with its own MoE), REAP-pruned (`reap observe`
on 32 x 128 tokens of the train split, `reap prune`, uniform) to keep 11 and 8 of 16 experts in every MoE layer,
the MTP layer included, and each pruned model after Router-KD against the unpruned one (top-1024 teacher cache of
512 x 128 train-split tokens, lr 1e-2, cosine, all routers including the MTP layer's). Each is converted to an F32
GGUF and served by the pinned llama-server (`-np 1 -t 1`), without and with MTP drafting (up to 3 draft tokens
per step, p-min 0: the server's defaults). Prompts: code-continuation prompts cut from held-out standard-library
files (text the testbed never saw).

Measured per model:
- greedy identity: `/completion` (temperature 0, top_k 1, `--n-predict` tokens) with and without drafting, token
  for token; where they differ, the top-2 logit gap of the non-drafting run at the first differing token;
- acceptance = accepted / drafted tokens (the server's `timings.draft_n_accepted / draft_n`) over those greedy
  completions, per draft position (`/metrics`), and generation speed with / without drafting;
- acceptance in `glmgguf eval`'s own runs (greedy stops at a detected loop; raw = T=1, no truncation);
- held-out agreement with the unpruned model (`kd eval` against a full-vocabulary teacher cache): trunk top-1,
  and the MTP head's KL and top-1 (what the drafts are); and, on the same held-out text in transformers, how
  often the MTP head's top-1 equals the model's own next trunk top-1 (a one-token draft's acceptance on text the
  model did not generate: no loops, no dependence on what it writes);
- one-token drafting (`--spec-draft-n-max 1`) on the first prompts: the server's drafted/accepted counts against
  those transformers' MTP layer gives on the same continuation (`glmgguf.eval.draft.reference_drafts`).
Writes bench/results/mtp_acceptance.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# f32 KV caches (trunk and draft): the DSA indexer selects the keys transformers selects
SERVER_ARGS = ["-c", "4096", "-np", "1", "-t", "1", "--metrics", "-ctk", "f32", "-ctv", "f32", "-ctkd", "f32",
               "-ctvd", "f32"]


def continuation_prompts(n: int) -> list:
    """`n` prompts: the 400 characters before a `def` line of a held-out file, plus that line."""
    from glmgguf.eval.probes import Prompt
    from glmgguf.testbed import stdlib_corpus

    out: list[Prompt] = []
    for text in stdlib_corpus("heldout"):
        for m in list(re.finditer(r"^ *def \w+\(.*\):\n", text, re.M))[1::9]:
            out.append(Prompt(id=f"stdlib-{len(out):03d}", source="stdlib", text=text[max(0, m.start() - 400):m.end()]))
            if len(out) == n:
                return out
    return out


def metrics(url: str) -> dict[str, float]:
    """llama-server's Prometheus counters (`--metrics`), name -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("llamacpp:")] = float(value)
    return out


def greedy_completions(srv, prompts: list, n_predict: int) -> list[dict]:
    """Greedy `/completion` of every prompt: token ids, top-2 log-probabilities per token, the server's timings."""
    out = []
    for p in prompts:
        ids = srv.request("/tokenize", {"content": p.text, "add_special": True})["tokens"]
        r = srv.completion(ids, n_predict=n_predict, temperature=0.0, top_k=1, seed=0, return_tokens=True,
                           n_probs=2, cache_prompt=False)
        probs = [[t["logprob"] for t in c["top_logprobs"]] for c in r["completion_probabilities"]]
        out.append({"prompt": ids, "tokens": r["tokens"], "top2": probs, "timings": r["timings"]})
    return out


def identity(plain: list[dict], drafted: list[dict]) -> dict:
    """Token-for-token comparison; for each differing prompt the first differing index and its top-2 logit gap."""
    diffs = []
    for i, (a, b) in enumerate(zip(plain, drafted, strict=True)):
        if a["tokens"] == b["tokens"]:
            continue
        at = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=False)) if x != y),
                  min(len(a["tokens"]), len(b["tokens"])))
        p = a["top2"][at] if at < len(a["top2"]) else []
        diffs.append({"prompt": i, "at": at, "top2_logprobs": p, "logit_gap": p[0] - p[1] if len(p) == 2 else None})
    return {"prompts": len(plain), "identical": len(plain) - len(diffs), "differing": diffs,
            "tokens": sum(len(a["tokens"]) for a in plain)}


def speed(runs: list[dict]) -> float:
    """Generated tokens per second over the runs (the server's own timings)."""
    return sum(r["timings"]["predicted_n"] for r in runs) / (sum(r["timings"]["predicted_ms"] for r in runs) / 1e3)


def serve_and_measure(model: Path, gguf: Path, prompts: list, args: argparse.Namespace, tmp: Path) -> dict:
    """Greedy with and without drafting, per-position acceptance, `glmgguf eval` runs with drafting, and one-token
    drafting against transformers' MTP layer."""
    from glmgguf.eval.draft import draft_args, draft_settings, reference_drafts
    from glmgguf.eval.run import RunSpec, run_probes, sampler_settings
    from glmgguf.llama import LlamaServer

    draft = draft_settings(args.draft_max)
    with LlamaServer(gguf, SERVER_ARGS, log_path=tmp / f"{gguf.stem}-plain.log") as srv:
        plain = greedy_completions(srv, prompts, args.n_predict)
    with LlamaServer(gguf, [*SERVER_ARGS, *draft_args(draft_settings(1))], log_path=tmp / f"{gguf.stem}-n1.log") as srv:
        one = greedy_completions(srv, prompts[:args.reference_prompts], args.n_predict)
    reference = [{"server": [r["timings"].get("draft_n", 0), r["timings"].get("draft_n_accepted", 0)],
                  "transformers": list(reference_drafts(model, r["prompt"], r["tokens"], args.n_predict).values())}
                 for r in one]
    with LlamaServer(gguf, [*SERVER_ARGS, *draft_args(draft)], log_path=tmp / f"{gguf.stem}-mtp.log") as srv:
        drafted = greedy_completions(srv, prompts, args.n_predict)
        m = metrics(srv.url)
        runs = {}
        for preset in ("greedy", "raw"):
            spec = RunSpec(sampler=sampler_settings(preset, {}), prompts="bench", prompts_sha256="-",
                           safety_cap=args.n_predict, draft=draft)
            doc = run_probes(srv.url, prompts, spec, tmp / f"{gguf.stem}-{preset}.json", progress=False)
            runs[preset] = {"loops": doc["summary"]["loops"], "n": doc["summary"]["n"], **doc["summary"]["draft"]}
    n_drafted = sum(r["timings"].get("draft_n", 0) for r in drafted)
    n_accepted = sum(r["timings"].get("draft_n_accepted", 0) for r in drafted)
    steps = m.get("spec_decode_num_drafts_total", 0)
    per_pos = [m.get(f'spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}', 0) / steps if steps else None
               for i in range(args.draft_max)]
    return {"identity": identity(plain, drafted), "drafted": n_drafted, "accepted": n_accepted,
            "acceptance": n_accepted / n_drafted if n_drafted else None, "verify_steps": steps,
            "acceptance_per_position": per_pos, "mean_accepted_per_step": n_accepted / steps if steps else None,
            "tokens_per_s_plain": speed(plain), "tokens_per_s_mtp": speed(drafted), "eval_runs": runs,
            "one_token_drafts_vs_transformers": reference,
            "one_token_drafts_match": all(r["server"] == r["transformers"] for r in reference)}


def convert_f32(model_dir: Path, out: Path) -> Path:
    from click.testing import CliRunner

    from glmgguf.cli import main

    r = CliRunner().invoke(main, ["convert", str(model_dir), str(out), "--outtype", "f32"])
    if r.exit_code != 0:
        raise RuntimeError(f"convert {model_dir}: {r.output.strip()[-500:]}")
    return out


def markdown(res: dict) -> str:
    lines = ["| model | greedy identical (with / without drafting) | acceptance, greedy | accepted per step "
             "(of 3) | per position 1/2/3 | acceptance, greedy stopped at loops | acceptance, raw T=1 | one-token "
             "acceptance on held-out text (transformers) | MTP top-1 vs unpruned | tokens/s without -> with drafting |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in res["variants"]:
        i = v["identity"]
        pos = "/".join("-" if p is None else f"{100 * p:.0f}%" for p in v["acceptance_per_position"])
        h = v.get("heldout") or {}
        lines.append(f"| {v['name']} | {i['identical']}/{i['prompts']} | {100 * v['acceptance']:.1f}% "
                     f"({v['accepted']}/{v['drafted']}) | {v['mean_accepted_per_step']:.2f} | {pos} | "
                     f"{100 * v['eval_runs']['greedy']['acceptance']:.1f}% | "
                     f"{100 * v['eval_runs']['raw']['acceptance']:.1f}% | {100 * h['mtp_vs_own_trunk']:.1f}% | "
                     f"{h['mtp_top1']:.3f} | "
                     f"{v['tokens_per_s_plain']:.1f} -> {v['tokens_per_s_mtp']:.1f} |")
    return "\n".join(lines)


@torch.no_grad()
def self_agreement(model_dir: Path, seqs: torch.Tensor, batch: int = 8) -> float:
    """Share of held-out positions t where the MTP head's top-1 for t + 2 equals the model's own trunk top-1 there:
    the rate at which a one-token draft would be accepted on this text (independent of what the model generates)."""
    from glmgguf.kd.student import Student

    student = Student(model_dir, dtype=torch.float32, mtp=True)
    hits = total = 0
    for i in range(0, len(seqs), batch):
        logits, mtp = student.forward(seqs[i:i + batch])
        same = mtp.argmax(-1) == logits[:, 1:].argmax(-1)
        hits, total = hits + int(same.sum()), total + same.numel()
    return hits / total


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def build_variants(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path, dict | None]]:
    """(name, checkpoint, held-out agreement) of the unpruned, pruned and Router-KD models."""
    from transformers import AutoTokenizer

    from glmgguf.kd.evaluate import evaluate
    from glmgguf.kd.teacher import build_teacher_cache, file_hashes
    from glmgguf.kd.train import TrainOptions, train_router
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.data import pack
    from glmgguf.reap.observe import observe
    from glmgguf.reap.prune import plan_prune, prune_checkpoint
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus, trained_testbed

    teacher = trained_testbed("tiny")
    tok = AutoTokenizer.from_pretrained(teacher)
    train_docs = [d for d in stdlib_corpus("train") if d.strip()]
    held_docs = [d for d in stdlib_corpus("heldout") if d.strip()]
    kd_seqs = pack(train_docs, tok, 128, num_samples=args.kd_seqs, seed=0).sequences
    held_seqs = pack(held_docs, tok, 128, num_samples=48, seed=0).sequences
    kd_file, held_file = write_jsonl(tmp / "kd.jsonl", train_docs), write_jsonl(tmp / "held.jsonl", held_docs)
    kd_cache = build_teacher_cache(teacher, kd_seqs, tmp / "cache-kd", top_k=1024, dtype=torch.float32,
                                   batch_size=8, text={"files": file_hashes([kd_file])}).path
    held_cache = build_teacher_cache(teacher, held_seqs, tmp / "cache-held", top_k=1 << 30, dtype=torch.float32,
                                     batch_size=8, text={"files": file_hashes([held_file])}).path

    def agreement(model: Path) -> dict:
        e = evaluate(model, held_cache, batch_size=8)
        return {"kl": e.kl, "top1": e.top1, "mtp_kl": e.mtp_kl, "mtp_top1": e.mtp_top1,
                "mtp_vs_own_trunk": self_agreement(model, held_seqs)}

    out = [("unpruned", teacher, agreement(teacher))]
    cal = pack(train_docs, tok, 128, num_samples=32, seed=1).sequences
    stats = observe(teacher, chunk_sequences(cal, 8), streaming=False, dtype=torch.float32)
    layout = GlmLayout.from_dir(teacher)
    for keep in args.keeps:
        pruned = tmp / f"pruned{keep}"
        prune_checkpoint(teacher, plan_prune(layout, stats, keep=keep), pruned)
        out.append((f"REAP keep {keep}/16", pruned, agreement(pruned)))
        print(f"keep {keep}: held-out {out[-1][2]}", flush=True)
        kd = tmp / f"kd{keep}"
        opts = TrainOptions(steps=args.steps, lr=args.lr, batch_size=8, schedule="cosine",
                            warmup_steps=max(1, args.steps // 20), save_every=0, gradient_checkpointing=False)
        train_router(pruned, kd_cache, kd, opts, log=lambda s, k=keep: print(f"  [kd keep {k}] {s}", flush=True))
        out.append((f"REAP keep {keep}/16 + Router-KD", kd, agreement(kd)))
        print(f"keep {keep} + KD: held-out {out[-1][2]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", type=int, nargs="+", default=[11, 8])
    ap.add_argument("--steps", type=int, default=150, help="Router-KD steps")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--kd-seqs", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--draft-max", type=int, default=3)
    ap.add_argument("--reference-prompts", type=int, default=4, help="prompts checked against transformers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "mtp_acceptance.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prompts = continuation_prompts(args.prompts)
    res: dict = {"variants": []}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name, model, held in build_variants(args, tmp):
            gguf = convert_f32(model, tmp / f"{model.name}.gguf")
            v = {"name": name, "heldout": held, **serve_and_measure(model, gguf, prompts, args, tmp)}
            res["variants"].append(v)
            print(f"{name}: acceptance {v['acceptance']:.3f}, identical {v['identity']['identical']}/"
                  f"{v['identity']['prompts']}, {v['identity']['differing']}", flush=True)
    res["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    res["settings"]["server_args"] = SERVER_ARGS
    res.update({"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
                "wall_s": round(time.perf_counter() - t0, 1)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print()
    print(markdown(res))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
