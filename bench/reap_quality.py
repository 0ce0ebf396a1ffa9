#!/usr/bin/env python3
"""Does REAP pick better experts than frequency or random pruning? KL(unpruned || pruned) on held-out text.

    python bench/reap_quality.py [--ratios 0.25 0.5] [--calib-seeds 0 1 2] [--random-seeds 0 1 2 3 4]

Models: the trained tiny testbed (16 experts, top-4, 3 MoE layers + MTP), whose expert loads are skewed (trained
without load balancing), and the same model with its correction biases tuned for balanced loads, as GLM's own
auxiliary-loss-free balancing leaves them. Calibration: standard-library source of the train split, packed to
128-token sequences, one independent sample per calibration seed. Each plan is written
as a real pruned checkpoint (`prune_checkpoint`) and loaded in transformers; KL is measured per token in float64
on the held-out split (files never trained on), averaged over positions, then over calibration samples (or random
seeds). Writes bench/results/reap_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from upstream import portable

RESULTS = Path(__file__).resolve().parent / "results" / "reap_quality.json"
METRICS = ("reap", "ean", "frequency")


def kl_and_loss(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return float(kl), float(ce)


@torch.no_grad()
def logits_of(model_dir: Path, seqs: torch.Tensor, batch: int = 8) -> torch.Tensor:
    from glmgguf.reap.observe import load_in_memory_model

    model = load_in_memory_model(model_dir, torch.float32, None)
    return torch.cat([model(seqs[i:i + batch]).logits for i in range(0, len(seqs), batch)])


def load_entropy(stats) -> dict[int, float]:
    return {L: stats.layer_summary(L)["load_entropy"] for L in sorted(stats.layers)}


@torch.no_grad()
def balanced_variant(model_dir: Path, out_dir: Path, seqs: torch.Tensor, iters: int = 80,
                     step: float = 0.02) -> Path:
    """The model with its routers' `e_score_correction_bias` tuned until expert loads are near-uniform.

    The update is DeepSeek-V3 / GLM's auxiliary-loss-free balancing rule (bias -= step * sign(load - mean load)),
    run on calibration text instead of during training: the trained testbed's skewed loads come from training
    without any balancing, the real GLM-5.x is trained with it. Only the correction bias changes (selection
    only; the weights g_j do not depend on it). The MTP block keeps its bias (it does not affect the trunk).
    """
    from glmgguf.io import CheckpointReader, ShardedWriter
    from glmgguf.reap.observe import load_in_memory_model

    model = load_in_memory_model(model_dir, torch.float32, None)
    gates = {i: layer.mlp.gate for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}
    counts: dict[int, torch.Tensor] = {}
    hooks = [g.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(
        i, counts[i] + torch.bincount(o[2].reshape(-1), minlength=m.num_experts))) for i, g in gates.items()]
    for _ in range(iters):
        for i, g in gates.items():
            counts[i] = torch.zeros(g.num_experts, dtype=torch.long)
        for b in range(0, len(seqs), 8):
            model.model(input_ids=seqs[b:b + 8])
        for i, g in gates.items():
            c = counts[i].double()
            g.e_score_correction_bias -= step * torch.sign(c - c.mean()).float()
    for h in hooks:
        h.remove()
    reader = CheckpointReader(model_dir)
    new = {f"model.layers.{i}.mlp.gate.e_score_correction_bias": g.e_score_correction_bias.detach().clone()
           for i, g in gates.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = [(n, reader.info(n).shape, reader.info(n).torch_dtype) for n in reader.names()]
    with ShardedWriter(out_dir, plan, max_shard_bytes=1 << 40) as w:
        for n, _, dt in plan:
            w.add(n, new[n].to(dt) if n in new else reader.get(n))
    (out_dir / "config.json").write_text(json.dumps(reader.config, indent=2))
    for f in reader.extra_files():
        (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


def compare(model: Path, label: str, args, tmp: Path) -> dict:
    """KL(unpruned || pruned) on held-out text for every metric and ratio."""
    from transformers import AutoTokenizer

    from glmgguf.layout import GlmLayout
    from glmgguf.reap.data import pack
    from glmgguf.reap.observe import observe
    from glmgguf.reap.prune import plan_prune, prune_checkpoint
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus
    from glmgguf.testbed.train import heldout_batch

    layout = GlmLayout.from_dir(model)
    tok = AutoTokenizer.from_pretrained(model)
    docs = stdlib_corpus("train")
    held = heldout_batch(args.eval_seqs, args.seq_len)
    inputs, targets = held[:, :-1], held[:, 1:]
    ref = logits_of(model, inputs)
    _, base_ce = kl_and_loss(ref, ref, targets)

    stats = {}
    for s in args.calib_seeds:
        cal = pack(docs, tok, args.seq_len, num_samples=args.calib_seqs, seed=s).sequences
        stats[s] = observe(model, chunk_sequences(cal, 8), streaming=False, dtype=torch.float32)
        print(f"[{label}] calibration sample {s}: {cal.numel()} tokens observed", flush=True)

    rows: list[dict] = []

    def evaluate(ratio: float, metric: str, calib_seed: int | None, seed: int) -> None:
        st = stats[calib_seed if calib_seed is not None else args.calib_seeds[0]]
        plan = plan_prune(layout, st, ratio=ratio, metric=metric, seed=seed)
        out = tmp / f"{label}-{metric}-{ratio}-{calib_seed}-{seed}"
        prune_checkpoint(model, plan, out)
        kl, ce = kl_and_loss(ref, logits_of(out, inputs), targets)
        rows.append({"ratio": ratio, "metric": metric, "calib_seed": calib_seed, "seed": seed,
                     "kept": plan.uniform_count, "kl": kl, "heldout_ce": ce})
        print(f"[{label}] ratio {ratio} {metric:9s} calib {calib_seed} seed {seed}: KL {kl:.4f}  CE {ce:.4f}",
              flush=True)

    for ratio in args.ratios:
        for metric in METRICS:
            for s in args.calib_seeds:
                evaluate(ratio, metric, s, 0)
        for seed in args.random_seeds:
            evaluate(ratio, "random", None, seed)

    summary: dict[str, dict[str, dict]] = {}
    for ratio in args.ratios:
        summary[str(ratio)] = {}
        for metric in (*METRICS, "random"):
            kls = [r["kl"] for r in rows if r["ratio"] == ratio and r["metric"] == metric]
            ces = [r["heldout_ce"] for r in rows if r["ratio"] == ratio and r["metric"] == metric]
            summary[str(ratio)][metric] = {
                "kl_mean": statistics.fmean(kls), "kl_std": statistics.pstdev(kls), "n": len(kls),
                "kl_min": min(kls), "kl_max": max(kls), "heldout_ce_mean": statistics.fmean(ces)}
    reap_wins = {r: all(summary[r]["reap"]["kl_mean"] < summary[r][m]["kl_mean"] for m in ("frequency", "random"))
                 for r in summary}
    return {
        "label": label, "experts": layout.uniform_experts, "experts_per_tok": layout.experts_per_tok,
        "moe_layers": [x.index for x in layout.moe_layers],
        "load_entropy": load_entropy(stats[args.calib_seeds[0]]),
        "unpruned_heldout_ce": base_ce,
        "summary": summary, "reap_beats_frequency_and_random": reap_wins, "runs": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences per sample")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-seqs", type=int, default=48)
    ap.add_argument("--models", default="skewed,balanced",
                    help="which models to (re)run; results of the others are kept from the existing output file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from glmgguf.reap.data import pack
    from glmgguf.testbed import stdlib_corpus, trained_testbed

    t0 = time.perf_counter()
    model = trained_testbed("tiny")
    which = set(args.models.split(","))
    labels = {"skewed": "trained testbed (skewed loads)", "balanced": "same, bias-balanced loads"}
    results = []
    if args.out.is_file():
        results = [m for m in json.loads(args.out.read_text()).get("models", [])
                   if m["label"] not in {labels[w] for w in which}]
    with tempfile.TemporaryDirectory() as tmp:
        if "skewed" in which:
            results.append(compare(model, labels["skewed"], args, Path(tmp)))
        if "balanced" in which:
            tok = AutoTokenizer.from_pretrained(model)
            bal_seqs = pack(stdlib_corpus("train"), tok, args.seq_len, num_samples=32, seed=99).sequences
            balanced = balanced_variant(model, Path(tmp) / "balanced", bal_seqs)
            results.append(compare(balanced, labels["balanced"], args, Path(tmp)))
    results.sort(key=lambda m: list(labels.values()).index(m["label"]))
    result = {
        "models": results,
        "settings_of_last_run": vars(args) | {"out": str(args.out)},
        "calibration": {"seqs": args.calib_seqs, "seq_len": args.seq_len, "samples": args.calib_seeds,
                        "source": "stdlib train split"},
        "eval": {"seqs": args.eval_seqs, "seq_len": args.seq_len, "source": "stdlib heldout split"},
        "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(portable(result), indent=1) + "\n")
    print()
    print(markdown(result))
    print(f"wrote {args.out}")


def markdown(result: dict) -> str:
    ms = ("reap", "ean", "frequency", "random")
    lines = ["| model | pruned | kept | " + " | ".join(f"{m} KL" for m in ms) + " | REAP < frequency, random |",
             "|---|---|---|" + "---|" * (len(ms) + 1)]
    notes = []
    for res in result["models"]:
        e = res["experts"]
        for r, by in res["summary"].items():
            cells = [f"{by[m]['kl_mean']:.4f} ± {by[m]['kl_std']:.4f}" for m in ms]
            lines.append(f"| {res['label']} | {float(r):.0%} | {round(e * (1 - float(r)))}/{e} | "
                         + " | ".join(cells) + f" | {'yes' if res['reap_beats_frequency_and_random'][r] else 'no'} |")
        notes.append(f"{res['label']}: load entropy {res.get('load_entropy')}, unpruned held-out CE "
                     f"{res['unpruned_heldout_ce']:.4f}; " + "; ".join(
                         f"{float(r):.0%}: " + ", ".join(f"{m} {by[m]['heldout_ce_mean']:.4f}" for m in ms)
                         for r, by in res["summary"].items()))
    for res in result["models"]:
        n = {m: res["summary"][next(iter(res["summary"]))][m]["n"] for m in ms}
        notes.append(f"{res['label']}: mean ± std over n = {n} (calibration samples; seeds for random)")
    return "\n".join(lines + ["", *notes])


if __name__ == "__main__":
    main()
