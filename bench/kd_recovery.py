#!/usr/bin/env python3
"""How much of the pruning damage does Router-KD recover? Held-out KL(teacher || model) before and after KD.

    python bench/kd_recovery.py [--keeps 11 8] [--lrs 3e-3 1e-2] [--steps 300] [--top-k 1024]

Teacher: the trained tiny testbed (16 experts, top-4, 3 MoE trunk layers + the MTP block). Students: the teacher
REAP-pruned (`reap observe` + `reap prune`, uniform) to keep 11 of 16 experts (~34% pruned) and 8 of 16 (50%).
Text, three disjoint sets of standard-library source files: the KD text (train split), a validation set (other
train-split files) on which the learning rate is chosen, and the held-out split (files the teacher never saw),
on which the table is reported. The teacher cache of the KD text keeps the top-k (default 1024 of the 4096-token
vocabulary); validation and held-out caches keep the full vocabulary, so `kd eval` measures the exact KL there
(float32 model, fp16 teacher log-probs); an independent float64 full-vocabulary KL against the teacher's logits
is reported too. Router-KD trains the gates of all four MoE layers (AdamW, cosine schedule with warmup), for each
learning rate; the one with the lowest validation KL at the end is reported. The chosen student is converted to an
F32 GGUF and compared with transformers in llama.cpp. Writes bench/results/kd_recovery.json, a curve figure
bench/results/kd_recovery.png, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from upstream import portable

RESULTS = Path(__file__).resolve().parent / "results"


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@torch.no_grad()
def logits_of(model_dir: Path, seqs: torch.Tensor, batch: int = 8) -> torch.Tensor:
    from glmgguf.reap.observe import load_in_memory_model

    model = load_in_memory_model(model_dir, torch.float32, None)
    return torch.cat([model(seqs[i:i + batch]).logits for i in range(0, len(seqs), batch)])


@torch.no_grad()
def router_saturation(model_dir: Path, seqs: torch.Tensor) -> dict:
    """Per trunk MoE layer: router logit std, mean sigmoid score of the selected experts, mean s(1 - s) there (the
    factor every gate gradient passes through) and the mean largest normalized weight (0.25 = uniform over 4)."""
    from glmgguf.reap.observe import load_in_memory_model

    model = load_in_memory_model(model_dir, torch.float32, None)
    rec: dict[int, tuple] = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(i, o))
             for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    model(seqs[:8])
    for h in hooks:
        h.remove()
    out = {}
    for i, (logits, w, idx) in rec.items():
        sel = logits.sigmoid().gather(1, idx)
        out[str(i)] = {"logit_std": float(logits.std()), "selected_score": float(sel.mean()),
                       "selected_s_1_minus_s": float((sel * (1 - sel)).mean()),
                       "max_weight_share": float((w.max(-1).values / w.sum(-1)).mean())}
    return out


def exact_kl(ref: torch.Tensor, logits: torch.Tensor) -> float:
    from glmgguf.kd.loss import full_kl

    return float(full_kl(ref, logits).mean())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["students"]
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), dpi=110, squeeze=False)
    for ax, st in zip(axes[0], rows, strict=True):
        for run in st["runs"]:
            ev = run["val_curve"]
            mark = " (chosen)" if run["lr"] == st["chosen_lr"] else ""
            ax.plot([e["step"] for e in ev], [e["kl"] for e in ev], "o-", ms=3, label=f"val KL, lr {run['lr']:g}{mark}")
            tr = run["train_curve"]
            w = max(1, len(tr) // 15)
            sm = [sum(tr[max(0, i - w + 1):i + 1]) / len(tr[max(0, i - w + 1):i + 1]) for i in range(len(tr))]
            ax.plot(range(1, len(tr) + 1), sm, lw=0.8, alpha=0.6, label=f"train KL (top-k), lr {run['lr']:g}")
        ax.axhline(st["heldout_before"]["kl"], color="k", ls="--", lw=0.8, label="held-out KL before KD")
        ax.axhline(st["heldout_after"]["kl"], color="tab:red", ls="--", lw=0.8, label="held-out KL after KD")
        ax.set_title(f"keep {st['keep']}/16: held-out KL {st['heldout_before']['kl']:.4f} -> "
                     f"{st['heldout_after']['kl']:.4f} ({100 * st['recovery']:.0f}% lower)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("KL(teacher || student)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(res: dict) -> str:
    lines = ["| pruned (keep/16) | held-out KL before KD | after Router-KD | KL reduction | top-1 agreement | "
             "MTP KL before -> after | lr (chosen on validation) |",
             "|---|---|---|---|---|---|---|"]
    for st in res["students"]:
        b, a = st["heldout_before"], st["heldout_after"]
        lines.append(f"| {st['keep']} ({100 * (1 - st['keep'] / 16):.0f}% pruned) | {b['kl']:.5f} | {a['kl']:.5f} | "
                     f"{100 * st['recovery']:.1f}% | {b['top1']:.3f} -> {a['top1']:.3f} | "
                     f"{b['mtp_kl']:.4f} -> {a['mtp_kl']:.4f} | {st['chosen_lr']:g} |")
    lines.append("")
    lines.append("| keep | lr | val KL after | held-out KL after | held-out reduction |")
    lines.append("|---|---|---|---|---|")
    for st in res["students"]:
        for run in st["runs"]:
            lines.append(f"| {st['keep']} | {run['lr']:g} | {run['val_after']:.5f} | {run['heldout_after']:.5f} | "
                         f"{100 * (1 - run['heldout_after'] / st['heldout_before']['kl']):.1f}% |")
    return "\n".join(lines)


def glm52_trainable() -> dict:
    """Router-KD's trainable share of GLM-5.2 (75 MoE layers + the MTP block, 256 experts, hidden 6144)."""
    from glmgguf.kd.student import parameter_counts
    from glmgguf.layout import GlmLayout

    lay = GlmLayout.from_config(json.loads((Path(__file__).resolve().parent.parent / "examples"
                                            / "glm52_config.json").read_text()))
    shapes = lay.expected_hf_tensors(mtp_indexer=True)
    out = {}
    for label, bias in (("gates", False), ("gates+bias", True)):
        n, total = parameter_counts(shapes, lay, mtp=True, bias=bias)
        out[label] = {"trainable": n, "total": total, "fraction": n / total}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", type=int, nargs="+", default=[11, 8])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--kd-seqs", type=int, default=512)
    ap.add_argument("--val-seqs", type=int, default=32)
    ap.add_argument("--eval-seqs", type=int, default=48)
    ap.add_argument("--val-docs", type=int, default=60, help="train-split files held back for validation")
    ap.add_argument("--top-k", type=int, default=1024)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-parity", action="store_true", help="skip the GGUF conversion / llama.cpp check")
    ap.add_argument("--train-bias", action="store_true", help="also train e_score_correction_bias")
    ap.add_argument("--out", type=Path, default=RESULTS / "kd_recovery.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

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

    t0 = time.perf_counter()
    teacher = trained_testbed("tiny")
    tok = AutoTokenizer.from_pretrained(teacher)
    train_docs = [d for d in stdlib_corpus("train") if d.strip()]
    held_docs = [d for d in stdlib_corpus("heldout") if d.strip()]
    val_docs = train_docs[:args.val_docs]
    # different files can hold the same text (tiny __init__ modules, copies): KD text shares none with the others
    seen = set(val_docs) | set(held_docs)
    kd_docs = [d for d in train_docs[args.val_docs:] if d not in seen]
    assert not set(val_docs) & set(kd_docs) and not set(held_docs) & set(kd_docs)
    res: dict = {"teacher": "trained tiny testbed", "students": []}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        files = {"kd": write_jsonl(tmp / "kd.jsonl", kd_docs), "val": write_jsonl(tmp / "val.jsonl", val_docs),
                 "held": write_jsonl(tmp / "heldout.jsonl", held_docs)}
        seqs = {"kd": pack(kd_docs, tok, args.seq_len, num_samples=args.kd_seqs, seed=0).sequences,
                "val": pack(val_docs, tok, args.seq_len, num_samples=args.val_seqs, seed=0).sequences,
                "held": pack(held_docs, tok, args.seq_len, num_samples=args.eval_seqs, seed=0).sequences}
        caches = {}
        for name, k in (("kd", args.top_k), ("val", 1 << 30), ("held", 1 << 30)):
            r = build_teacher_cache(teacher, seqs[name], tmp / f"cache-{name}", top_k=k, dtype=torch.float32,
                                    batch_size=8, text={"files": file_hashes([files[name]])})
            caches[name] = r.path
            print(f"teacher cache {name}: {seqs[name].shape[0]} x {args.seq_len}, top-{r.manifest['top_k']}, "
                  f"mass outside top-k {r.manifest['mean_rest_mass']:.4f} ({r.seconds:.0f} s)", flush=True)
        res["caches"] = {n: {"sequences": int(seqs[n].shape[0]), "seq_len": args.seq_len,
                             "top_k": min(k, 4096), "files": len(d)}
                         for n, k, d in (("kd", args.top_k, kd_docs), ("val", 4096, val_docs),
                                         ("held", 4096, held_docs))}
        held_ref = logits_of(teacher, seqs["held"])
        res["teacher_router_saturation"] = router_saturation(teacher, seqs["held"])
        print(f"teacher routers: {res['teacher_router_saturation']}", flush=True)
        cal = pack(kd_docs, tok, args.seq_len, num_samples=32, seed=1).sequences
        stats = observe(teacher, chunk_sequences(cal, 8), streaming=False, dtype=torch.float32)
        layout = GlmLayout.from_dir(teacher)
        for keep in args.keeps:
            pruned = tmp / f"pruned{keep}"
            plan = plan_prune(layout, stats, keep=keep)
            prune_checkpoint(teacher, plan, pruned)
            # share of the teacher's routed (token, expert) pairs that went to experts this plan drops: what the
            # routers must reroute, and what no choice among the kept experts can reproduce
            lost = {str(L): float(1 - stats.layers[L]["count"][ids].sum() / stats.layers[L]["count"].sum())
                    for L, ids in plan.keep.items()}
            before = evaluate(pruned, caches["held"], batch_size=8)
            before_exact = exact_kl(held_ref, logits_of(pruned, seqs["held"]))
            print(f"keep {keep}: held-out KL before KD {before.kl:.5f} (float64 {before_exact:.5f}), "
                  f"top-1 {before.top1:.4f}", flush=True)
            runs = []
            for lr in args.lrs:
                out = tmp / f"kd{keep}-{lr:g}"
                opts = TrainOptions(steps=args.steps, lr=lr, batch_size=args.batch_size, schedule="cosine",
                                    warmup_steps=max(1, args.steps // 20), save_every=0,
                                    eval_every=args.eval_every, gradient_checkpointing=False,
                                    train_bias=args.train_bias)
                tr = train_router(pruned, caches["kd"], out, opts, eval_cache=caches["val"],
                                  log=lambda s, k=keep, lr=lr: print(f"  [keep {k}, lr {lr:g}] {s}", flush=True))
                held = evaluate(out, caches["held"], batch_size=8)
                runs.append({"lr": lr, "out": out, "val_curve": tr.log["evals"], "val_after": tr.log["evals"][-1]["kl"],
                             "train_curve": [r["kl"] for r in tr.records], "heldout_after": held.kl,
                             "heldout_top1": held.top1, "seconds_per_step": tr.log["seconds_per_step"],
                             "trainable_fraction": tr.log["trainable_fraction"],
                             "changed_tensors": tr.write.changed, "identical_tensors": tr.write.identical,
                             "n_tensors": tr.write.n_tensors})
                print(f"  keep {keep}, lr {lr:g}: val KL {runs[-1]['val_after']:.5f}, held-out KL {held.kl:.5f} "
                      f"({100 * (1 - held.kl / before.kl):.1f}% lower), {tr.log['seconds_per_step']:.2f} s/step",
                      flush=True)
            best = min(runs, key=lambda r: r["val_after"])
            after = evaluate(best["out"], caches["held"], batch_size=8)
            after_exact = exact_kl(held_ref, logits_of(best["out"], seqs["held"]))
            parity = None
            if not args.no_parity:
                parity = gguf_parity(best["out"], tmp / f"kd{keep}.gguf", tok)
                print(f"  llama.cpp parity (f32 GGUF): {parity}", flush=True)
            st = {
                "keep": keep, "pruned_fraction": 1 - keep / 16, "chosen_lr": best["lr"],
                "heldout_before": {"kl": before.kl, "kl_float64": before_exact, "top1": before.top1,
                                   "mtp_kl": before.mtp_kl, "mtp_top1": before.mtp_top1},
                "heldout_after": {"kl": after.kl, "kl_float64": after_exact, "top1": after.top1,
                                  "mtp_kl": after.mtp_kl, "mtp_top1": after.mtp_top1},
                "recovery": 1 - after.kl / before.kl, "recovery_float64": 1 - after_exact / before_exact,
                "meets_30pct": 1 - after.kl / before.kl >= 0.30,
                "routed_share_to_pruned_experts": lost,
                "gguf_parity": parity,
                "runs": [{k: v for k, v in r.items() if k != "out"} for r in runs],
            }
            res["students"].append(st)
    res["glm52_trainable"] = glm52_trainable()
    res["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    res.update({"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
                "wall_s": round(time.perf_counter() - t0, 1)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(portable(res), indent=1) + "\n")
    plot(res, args.out.with_suffix(".png"))
    print()
    print(markdown(res))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def gguf_parity(model_dir: Path, gguf: Path, tok) -> dict:
    from click.testing import CliRunner

    from glmgguf.cli import main
    from glmgguf.llama import ensure_toolchain
    from glmgguf.parity import kl_stats, llama_logits, transformers_logits
    from glmgguf.testbed import stdlib_corpus

    r = CliRunner().invoke(main, ["convert", str(model_dir), str(gguf), "--outtype", "f32"])
    if r.exit_code != 0:
        return {"error": r.output.strip()[-300:]}
    ids = tok("".join(stdlib_corpus("heldout"))[:20000])["input_ids"][:160]
    s = kl_stats(transformers_logits(model_dir, ids), llama_logits(ensure_toolchain(), gguf, ids, threads=1))
    return {"mean_kl": s.mean, "max_kl": s.max, "top1_agreement": s.top1_agreement, "positions": s.n_positions}


if __name__ == "__main__":
    main()
