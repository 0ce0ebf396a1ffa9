#!/usr/bin/env python3
"""KL divergence of every shipped recipe against the F32 GGUF, on the trained tiny testbed.

    python bench/recipe_kld.py [--ctx 32 128] [--scored-tokens 8000] [--imatrix-chunks 128] [--threads N]

Converts the trained tiny testbed (`glmgguf.testbed.trained_testbed("tiny")`, cached) to an F32 GGUF, makes an
importance matrix with the pinned `llama-imatrix` on the F32 GGUF over TRAIN text, stores the F32 model's
log-probabilities over HELD-OUT text (`llama-perplexity --kl-divergence-base`), then converts the checkpoint by
every shipped recipe in one pass (`glmgguf convert --recipe`, which equals `glmgguf quantize` of the F32 GGUF
and also covers NVFP4), without and (for recipes with quantized tensors) with the imatrix, and measures each with
`llama-perplexity --kl-divergence` (F32 KV cache in every run, so only the weights differ). Prints a markdown
table per context size (bits per weight over all tensors, file size, mean KLD ± its uncertainty, 99th-percentile
KLD, same top token %) and writes bench/results/recipe_kld.json.

Two context sizes by default. At ctx <= the testbed's `index_topk` (32) the DSA indexer keeps every token, so the
KLD measures the weights' quantization error alone. Above it (ctx 128, the length the testbed trains on) the
indexer picks 32 of up to 127 tokens, and the testbed's indexer is never trained (its top-k selection passes no
gradient): its scores are close together, so any perturbation of the weights flips some selections, and those
flips dominate the mean KLD (BF16 alone: ~20x its dense-regime KLD). A real GLM-5.x indexer is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "recipe_kld.json"
MiB = 2**20


def train_text(path: Path, max_chars: int) -> Path:
    from glmgguf.gguf.kld import write_heldout_text

    return write_heldout_text(path, max_chars=max_chars, split="train")


def row_markdown(rows: list[dict]) -> str:
    head = ("| recipe | imatrix | bpw | size MiB | mean KLD | 99% KLD | same top % |\n"
            "|---|:---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        k = r["kld"]
        p99 = k["kld_percentiles"].get("99.0")
        lines.append(f"| {r['recipe']} | {'yes' if r['imatrix'] else 'no'} | {r['bpw']:.2f} | "
                     f"{r['size_bytes'] / MiB:.2f} | {k['mean_kld']:.5f} ± {k['mean_kld_err']:.5f} | "
                     f"{'-' if p99 is None else f'{p99:.4f}'} | "
                     f"{k['same_top_pct']:.2f} ± {k['same_top_pct_err']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from glmgguf.cache import cache_root
    from glmgguf.checkpoint import open_checkpoint
    from glmgguf.gguf.convert import convert, outtype_chooser
    from glmgguf.gguf.imatrix import load_imatrix
    from glmgguf.gguf.kld import (
        DEFAULT_CTX,
        compute_imatrix,
        gguf_size,
        kld_base,
        kld_candidate,
        write_heldout_text,
    )
    from glmgguf.gguf.qtypes import FLOAT_TYPES
    from glmgguf.gguf.quantize import open_gguf
    from glmgguf.gguf.recipe import builtin_recipes, load_recipe
    from glmgguf.testbed import read_report, trained_testbed

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[32, 128],
                    help=f"chunk sizes of the KLD runs (the tiny testbed trains on 128 tokens, its index_topk is "
                         f"32; `glmgguf kld` default {DEFAULT_CTX})")
    ap.add_argument("--scored-tokens", type=int, default=8000,
                    help="held-out tokens scored per context size (the second half of every chunk is scored)")
    ap.add_argument("--imatrix-chunks", type=int, default=128, help="train-text chunks for llama-imatrix")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--recipes", nargs="*", default=None, help="default: every shipped recipe")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: <glmgguf cache>/bench/kld")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = ap.parse_args(argv)

    work = (args.work_dir or cache_root() / "bench" / "kld").expanduser()
    logs = work / "logs"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model_dir = trained_testbed("tiny")
    report = read_report(model_dir)
    f32 = work / "tiny-trained-f32.gguf"
    print(f"converting {model_dir} to F32 ...", flush=True)
    convert(model_dir, f32, outtype_chooser("f32"), force=True, progress=False)

    # chunks per context size for about --scored-tokens scored tokens; text for them (the testbed's BPE makes a
    # few characters a token: cut generously)
    chunks = {c: -(-args.scored_tokens // (c - 1 - c // 2)) for c in args.ctx}
    need = max(c * n for c, n in chunks.items())
    heldout = write_heldout_text(work / "heldout.txt", max_chars=max(200_000, 8 * need))
    imatrix_ctx = max(args.ctx)
    train = train_text(work / "train.txt", max_chars=max(200_000, 8 * imatrix_ctx * args.imatrix_chunks))

    print("llama-imatrix on the F32 GGUF over train text ...", flush=True)
    imatrix_path = compute_imatrix(f32, train, work / "imatrix.gguf", ctx=imatrix_ctx, chunks=args.imatrix_chunks,
                                   threads=args.threads, log=logs / "imatrix.log")
    imatrix = load_imatrix(imatrix_path)

    base_ppl, logits = {}, {}
    for c in args.ctx:
        print(f"base log-probabilities of the F32 GGUF over held-out text, ctx {c} ...", flush=True)
        logits[c] = work / f"base-logits-c{c}.bin"
        base_ppl[c] = kld_base(f32, heldout, logits[c], ctx=c, chunks=chunks[c], threads=args.threads,
                               log=logs / f"base-c{c}.log")

    names = args.recipes or list(builtin_recipes())
    model = open_gguf(f32)
    layers = open_checkpoint(model_dir).layout.layers
    rows: dict[int, list[dict]] = {c: [] for c in args.ctx}
    for name in names:
        recipe = load_recipe(name)
        resolution = recipe.resolve(model.plan, model.layers)
        quantized = any(c.qtype not in FLOAT_TYPES for c in resolution.choices.values())
        for with_imatrix in (False, True) if quantized else (False,):
            tag = f"{recipe.name}{'-imatrix' if with_imatrix else ''}"
            out = work / f"{tag}.gguf"
            print(f"{tag}: quantize + KLD ...", flush=True)
            t0 = time.perf_counter()
            convert(model_dir, out, recipe.chooser(layers), imatrix=imatrix if with_imatrix else None,
                    threads=args.threads, force=True, progress=False)
            t_convert = time.perf_counter() - t0
            size = gguf_size(out)
            for c in args.ctx:
                stats = kld_candidate(out, logits[c], ctx=c, threads=args.threads, log=logs / f"{tag}-c{c}.log")
                rows[c].append({"recipe": recipe.name, "imatrix": with_imatrix, "bpw": size.bpw,
                                "size_bytes": size.file_bytes, "tensor_bytes": size.tensor_bytes,
                                "convert_s": round(t_convert, 3), "kld": stats.to_dict()})
                print(f"  ctx {c}: bpw {size.bpw:.2f}, mean KLD {stats.mean_kld:.6f} ± {stats.mean_kld_err:.6f}, "
                      f"same top {stats.same_top_pct:.2f} %", flush=True)
            out.unlink()

    res = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                    "cpus": os.cpu_count()},
        "model": {"testbed": "tiny", "trained": str(model_dir.name),
                  "train_report": {k: report.get(k) for k in ("train_tokens_seen", "final_train_loss", "after")
                                   if k in report}},
        "settings": {"imatrix_ctx": imatrix_ctx, "imatrix_chunks": args.imatrix_chunks,
                     "imatrix_text": "stdlib train split", "kld_text": "stdlib held-out split", "kv_cache": "f32",
                     "threads": args.threads},
        "runs": [{"ctx": c, "chunks": chunks[c], "scored_tokens": chunks[c] * (c - 1 - c // 2),
                  "base_ppl": base_ppl[c], "rows": rows[c]} for c in args.ctx],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    for run in res["runs"]:
        print()
        print(f"trained tiny testbed, KLD vs F32 over {run['scored_tokens']} held-out tokens "
              f"(ctx {run['ctx']}, F32 PPL {run['base_ppl']})")
        print(row_markdown(run["rows"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
