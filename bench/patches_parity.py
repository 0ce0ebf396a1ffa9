#!/usr/bin/env python3
"""Logit parity of the patched llama.cpp against transformers, next to the pinned (unpatched) one.

    python bench/patches_parity.py [--tokens 160] [--long-tokens 1024] [--patched-build DIR]

On the trained tiny testbed (mean KL(transformers || llama.cpp) over every position):
- the spine's parity cases (F32 with native/duplicate indexers, with/without MTP; BF16; Q8_0), unpatched vs patched;
- a non-uniform expert-count prune (per-layer counts) in the patched runtime against the unpruned model with the
  removed experts masked out of routing;
- the indexer k_norm eps: 1e-6 from the GGUF (patched) against eps 0 (a kv override; what the pinned runtime uses),
  at --tokens and --long-tokens;
and on the random-init small testbed at --long-tokens (its MLA head of 288 fits q8_0 blocks; the tiny one's 80
does not): the KV cache type (-ctk/-ctv f32, f16, q8_0) with and without an f32 indexer key cache
(LLAMA_DSA_INDEXER_CACHE_TYPE=f32). Results go to bench/results/patches_parity.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glmgguf.cache import cache_root  # noqa: E402
from glmgguf.gguf.convert import convert, outtype_chooser  # noqa: E402
from glmgguf.gguf.keys import Arch, arch_key  # noqa: E402
from glmgguf.gguf.plan import IndexerMode, MtpMode  # noqa: E402
from glmgguf.llama import ensure_toolchain  # noqa: E402
from glmgguf.llama.build import toolchain_from_build_dir  # noqa: E402
from glmgguf.parity import kl_stats, llama_logits_isolated, masked_transformers_logits  # noqa: E402

RESULTS = REPO / "bench" / "results" / "patches_parity.json"
NON_UNIFORM = {1: 12, 2: 9, 3: 14, 4: 10}  # kept experts per MoE block of the 16-expert tiny testbed (4 = MTP)
EPS_KEY = arch_key(Arch.INDEXER_LAYERNORM_EPS)
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


def token_ids(model_dir: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from glmgguf.testbed.train import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = ""
    for chunk in stdlib_corpus("heldout"):
        text += chunk
        if len(text) > 8 * n:
            break
    ids = tok(text)["input_ids"][:n]
    assert len(ids) == n, f"held-out corpus too short for {n} tokens"
    return ids


def slice_experts(src: Path, out: Path, keep: dict[int, list[int]]) -> Path:
    """The non-uniform testbed: a REAP prune with a hand-made keep-map (kept experts renumbered 0..n-1)."""
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.prune import PrunePlan, prune_checkpoint

    n = {x.index: x.n_experts for x in GlmLayout.from_dir(src).moe_layers}
    return prune_checkpoint(src, PrunePlan(keep=keep, source_experts=n, metric="manual", per_layer="global"),
                            out).out


def stat(ref, got) -> dict:
    s = kl_stats(ref, got)
    return {"mean_kl": s.mean, "max_kl": s.max, "top1_agreement": s.top1_agreement, "positions": s.n_positions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--long-tokens", type=int, default=1024)
    ap.add_argument("--patched-build", type=Path, help="an existing patched build dir (default: build it)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["parity", "nonuniform", "eps", "ctk"])
    args = ap.parse_args()

    from glmgguf.llama import Toolchain
    from glmgguf.testbed import build_testbed, trained_testbed

    plain = ensure_toolchain(progress=False)
    if args.patched_build:
        pb = toolchain_from_build_dir(args.patched_build)
        patched = Toolchain(pb.bin_dir, pb.source_dir, pb.lib_dir, plain.python_package_dir, ["(given build)"])
    else:
        patched = ensure_toolchain(patches=True, progress=False)
    tiny = trained_testbed("tiny")
    results: dict = {"machine": platform.machine(), "tokens": args.tokens, "long_tokens": args.long_tokens,
                     "patched": patched.patched, "testbed": tiny.name}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="patches-parity-") as tmp_s:
        tmp = Path(tmp_s)
        ids = token_ids(tiny, args.tokens)
        ref = masked_transformers_logits(tiny, ids)

        if "parity" not in args.skip:
            rows = []
            cases = [("f32", m, i) for i in ("native", "duplicate") for m in ("keep", "drop")]
            cases += [("bf16", "keep", "native"), ("q8_0", "keep", "native")]
            for outtype, mtp, indexer in cases:
                g = tmp / f"{outtype}-{mtp}-{indexer}.gguf"
                convert(tiny, g, outtype_chooser(outtype), MtpMode(mtp), IndexerMode(indexer), progress=False)
                row = {"outtype": outtype, "mtp": mtp, "indexer": indexer,
                       "unpatched": stat(ref, llama_logits_isolated(plain, g, ids)),
                       "patched": stat(ref, llama_logits_isolated(patched, g, ids))}
                print(f"parity {outtype} mtp={mtp} indexer={indexer}: unpatched {row['unpatched']['mean_kl']:.3e}, "
                      f"patched {row['patched']['mean_kl']:.3e}", flush=True)
                rows.append(row)
            results["parity"] = rows

        if "nonuniform" not in args.skip:
            rng = random.Random(0)
            keep = {L: sorted(rng.sample(range(16), n)) for L, n in NON_UNIFORM.items()}
            src = slice_experts(tiny, tmp / "nonuniform", keep)
            g = tmp / "nonuniform-f32.gguf"
            convert(src, g, outtype_chooser("f32"), progress=False)
            got = llama_logits_isolated(patched, g, ids)
            results["nonuniform"] = {"kept_experts": NON_UNIFORM,
                                     "vs_masked_reference": stat(masked_transformers_logits(tiny, ids, keep), got),
                                     "vs_unpruned_reference": stat(ref, got)}
            print(f"non-uniform: {results['nonuniform']['vs_masked_reference']}", flush=True)

        if "eps" not in args.skip:
            g = tmp / "eps-f32.gguf"
            convert(tiny, g, outtype_chooser("f32"), progress=False)
            rows = []
            for n in (args.tokens, args.long_tokens):
                ids_n = ids if n == args.tokens else token_ids(tiny, n)
                ref_n = ref if n == args.tokens else masked_transformers_logits(tiny, ids_n)
                row = {"tokens": n,
                       "eps_1e-6_patched": stat(ref_n, llama_logits_isolated(patched, g, ids_n)),
                       "eps_0_patched": stat(ref_n, llama_logits_isolated(patched, g, ids_n,
                                                                          kv_overrides={EPS_KEY: 0.0})),
                       "unpatched": stat(ref_n, llama_logits_isolated(plain, g, ids_n))}
                print(f"eps at {n} tokens: 1e-6 {row['eps_1e-6_patched']['mean_kl']:.3e}, "
                      f"0 {row['eps_0_patched']['mean_kl']:.3e}, unpatched {row['unpatched']['mean_kl']:.3e}",
                      flush=True)
                rows.append(row)
            results["indexer_norm_eps"] = rows

        if "ctk" not in args.skip:
            small = cache_root() / "bench" / "testbed-small-seed0"
            if not (small / "config.json").is_file():
                build_testbed(small, size="small", seed=0)
            g = tmp / "small-f32.gguf"
            convert(small, g, outtype_chooser("f32"), progress=False)
            ids_l = token_ids(small, args.long_tokens)
            ref_l = masked_transformers_logits(small, ids_l)
            rows = []
            for name, t in (("f32", GGML_F32), ("f16", GGML_F16), ("q8_0", GGML_Q8_0)):
                for idx in (None, "f32"):
                    if name == "f32" and idx:
                        continue
                    env = {"LLAMA_DSA_INDEXER_CACHE_TYPE": idx} if idx else {}
                    got = llama_logits_isolated(patched, g, ids_l, env=env, type_k=t, type_v=t,
                                                flash_attn=t == GGML_Q8_0)
                    row = {"cache": name, "indexer_cache": idx or name, **stat(ref_l, got)}
                    print(f"ctk {name} indexer {row['indexer_cache']}: {row['mean_kl']:.3e}", flush=True)
                    rows.append(row)
            results["kv_cache_type"] = {"testbed": small.name, "tokens": args.long_tokens, "rows": rows}
    results["seconds"] = round(time.time() - t0, 1)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
