"""Loop detector false positives on natural text, and loop rates of the trained tiny testbed by sampler setting.

1. False positives: standard-library source (both splits) in 512-token chunks of the testbed tokenizer, run
   through the detector; every loop verdict there is a false positive.
2. Loop rates: the built-in fuzz suite (48 chat prompts) + code-continuation prompts cut from held-out stdlib
   files, on a q8_0 GGUF of the trained tiny testbed in llama-server, over several sampler settings.

    .venv/bin/python bench/eval_loops.py [--prompts 200] [--safety-cap 512] [--chunks 3000]

Writes bench/results/eval_loops.json and prints the comparison table.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from loop_cases import token_pieces
from tokenizers import Tokenizer

from glmgguf.checkpoint import open_checkpoint
from glmgguf.eval.compare import compare_table
from glmgguf.eval.loops import detect
from glmgguf.eval.probes import Prompt, load_prompts
from glmgguf.eval.run import RunSpec, run_probes, sampler_settings
from glmgguf.eval.stats import wilson
from glmgguf.gguf.convert import convert
from glmgguf.gguf.recipe import load_recipe
from glmgguf.llama import LlamaServer
from glmgguf.testbed.tokenizer import stdlib_corpus
from glmgguf.testbed.train import trained_testbed

RESULTS = Path(__file__).parent / "results" / "eval_loops.json"
SETTINGS = {  # label -> (preset, overrides)
    "greedy": ("greedy", {}),
    "greedy rp1.05": ("greedy", {"repetition_penalty": 1.05}),
    "greedy rp1.10": ("greedy", {"repetition_penalty": 1.10}),
    "raw T=1": ("raw", {}),
    "guarded (min_p .05 rp1.05)": ("guarded", {}),
    "min_p .05 rp1.10": ("guarded", {"repetition_penalty": 1.10}),
}


def false_positives(tok: Tokenizer, max_chunks: int) -> dict:
    chunks = []
    for split in ("heldout", "train"):
        for enc in tok.encode_batch(stdlib_corpus(split), add_special_tokens=False):
            chunks += [enc.ids[i:i + 512] for i in range(0, len(enc.ids) - 511, 512)]
            if len(chunks) >= max_chunks:
                break
    chunks = chunks[:max_chunks]
    pieces = token_pieces(tok)
    t0 = time.perf_counter()
    verdicts = [detect(c, pieces=[pieces[t] for t in c]) for c in chunks]
    loops = sum(loop is not None for loop, _ in verdicts)
    borderline = sum(b for _, b in verdicts)
    return {"chunks": len(chunks), "tokens_per_chunk": 512, "loops": loops, "loop_rate": loops / len(chunks),
            "loop_ci95": wilson(loops, len(chunks)), "borderline": borderline,
            "borderline_rate": borderline / len(chunks), "borderline_ci95": wilson(borderline, len(chunks)),
            "detector_us_per_token": 1e6 * (time.perf_counter() - t0) / (512 * len(chunks))}


def continuation_prompts(n: int) -> list[Prompt]:
    """`n` code-continuation prompts: the 400 characters before a `def` line of a held-out file, plus that line."""
    out: list[Prompt] = []
    for text in stdlib_corpus("heldout"):
        for m in list(re.finditer(r"^ *def \w+\(.*\):\n", text, re.M))[1::7]:
            out.append(Prompt(id=f"stdlib-{len(out):03d}", source="stdlib-continuation",
                              text=text[max(0, m.start() - 400):m.end()]))
            if len(out) == n:
                return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200, help="Total prompts (48 fuzz + the rest continuation).")
    ap.add_argument("--safety-cap", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=3000, help="Natural-text chunks for the false-positive rate.")
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()

    model = trained_testbed("tiny")
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    fp = false_positives(tok, args.chunks)
    print(f"false positives: {fp['loops']}/{fp['chunks']} loops, {fp['borderline']} borderline "
          f"({fp['detector_us_per_token']:.1f} us/token)")

    fuzz, _ = load_prompts("fuzz")
    prompts = fuzz + continuation_prompts(args.prompts - len(fuzz))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "tiny-q8_0.gguf"
        convert(model, gguf, load_recipe("q8_0").chooser(open_checkpoint(model).layout.layers),
                settings={"recipe": "q8_0"}, force=True)
        ctx = args.parallel * (args.safety_cap + 512)
        with LlamaServer(gguf, ["-c", str(ctx), "-np", str(args.parallel), "-t", "1"],
                         log_path=Path(tmp) / "server.log") as srv:
            for label, (preset, overrides) in SETTINGS.items():
                spec = RunSpec(sampler=sampler_settings(preset, overrides), prompts="bench", prompts_sha256="-",
                               safety_cap=args.safety_cap)
                t0 = time.perf_counter()
                doc = run_probes(srv.url, prompts, spec, Path(tmp) / f"{len(runs)}.json", parallel=args.parallel,
                                 progress=False)
                doc["seconds"] = time.perf_counter() - t0
                print(f"{label}: {doc['summary']['loops']}/{doc['summary']['n']} loops in {doc['seconds']:.0f} s")
                runs.append((label, doc))
    table = compare_table(runs)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "false_positives": fp, "prompts": len(prompts), "safety_cap": args.safety_cap, "table": table,
        "runs": {label: {"sampler": d["spec"]["sampler"], "seconds": round(d["seconds"], 1),
                         **d["summary"]} for label, d in runs},
    }, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
