"""A short report of a finished pipeline, read from the stages' outputs."""

from __future__ import annotations

from glmgguf.pipeline.manifest import read_json
from glmgguf.pipeline.plan import Plan


def report_lines(plan: Plan) -> list[str]:
    """What each finished stage produced, in a few lines."""
    w = plan.workdir
    lines = []
    stats = read_json(w / "prune" / "model" / "reap_stats.json")
    keep = read_json(w / "prune" / "model" / "reap_keep_map.json")
    if stats and keep:
        kept = "/".join(map(str, sorted(set(keep["kept_experts"].values()))))
        src = "/".join(map(str, sorted(set(keep["source_experts"].values()))))
        lines.append(f"REAP ({keep['metric']}, {keep['per_layer']}): kept {kept} of {src} experts in each of "
                     f"{len(keep['kept_experts'])} MoE layers, ranked on {stats['meta'].get('tokens')} "
                     "calibration tokens")
    log = read_json(w / "kd" / "model" / "kd_train_log.json")
    if log:
        evals = log.get("evals") or []
        if len(evals) >= 2:
            a, b = evals[0], evals[-1]
            lines.append(f"Router-KD: {len(log['steps'])} steps, {log['trainable_parameters']:,} trainable parameters "
                         f"({100 * log['trainable_fraction']:.4f}%); held-out KL to the teacher {a['kl']:.5f} -> "
                         f"{b['kl']:.5f} ({100 * (1 - b['kl'] / a['kl']):.1f}% lower), top-1 agreement "
                         f"{a['top1']:.3f} -> {b['top1']:.3f}")
    lines += lora_lines(plan)
    for g in plan.gguf:
        d = w / f"gguf-{g.name}"
        files = sorted(d.rglob("*.gguf")) if (d / "manifest.json").is_file() else []
        if files:
            size = sum(f.stat().st_size for f in files)
            lines.append(f"GGUF {g.name}: {size / 2**20:.1f} MiB in {len(files)} file(s), {files[0]}")
    nv = w / "nvfp4" / "model"
    if (w / "nvfp4" / "manifest.json").is_file():
        size = sum(f.stat().st_size for f in nv.glob("*.safetensors"))
        lines.append(f"NVFP4: {size / 2**20:.1f} MiB of safetensors in {nv}")
    md = w / "eval-report" / "report.md"
    if md.is_file():
        lines += ["", "Loop evaluation (llama-server):", md.read_text().rstrip()]
    variants = w / "variants-report" / "report.md"
    if variants.is_file():
        lines += ["", "Unpruned, pruned, Router-KD and final checkpoints compared (llama-server, held-out KL):",
                  variants.read_text().rstrip()]
    return lines + draft_lines(plan) + kld_lines(plan)


def lora_lines(plan: Plan) -> list[str]:
    """LoRA-KD's adapter and training, and where its result is (merged checkpoint or adapter GGUF)."""
    log = read_json(plan.workdir / "lora" / "out" / "adapter" / "lora_train_log.json")
    if not log or plan.lora is None:
        return []
    steps, o, evals = log["steps"], log["options"], log.get("evals") or []
    served = (f"adapter GGUF {plan.workdir / 'lora-gguf' / 'adapter.gguf'} (llama-server --lora)"
              if plan.lora.serve == "adapter" else f"merged into {plan.workdir / 'lora' / 'out' / 'model'}")
    return [f"LoRA-KD: rank {o['rank']} on {','.join(o['targets'])}{' + router gates' if o['train_gates'] else ''}, "
            f"{len(steps)} steps, {log['trainable_parameters']:,} trainable parameters; train KL "
            f"{steps[0]['kl']:.5f} -> {steps[-1]['kl']:.5f}"
            + (f", held-out {evals[0]['kl']:.5f} -> {evals[-1]['kl']:.5f}" if len(evals) >= 2 else "")
            + f"; {served}"]


def kld_lines(plan: Plan) -> list[str]:
    """Each GGUF output's KL divergence against the unquantized reference (the `kld` stage)."""
    doc = read_json(plan.workdir / "kld" / "kld.json") if plan.kld is not None else None
    if not doc:
        return []
    lines = [f"KL divergence against {doc['base'].rsplit('/', 1)[-1]} (llama-perplexity, ctx {doc['ctx']}):"]
    lines += [f"  {r['name']}: mean {r['kld']['mean_kld']:.6f} ± {r['kld']['mean_kld_err']:.6f}, same top token "
              f"{r['kld']['same_top_pct']:.2f}%" for r in doc["results"]]
    return ["", *lines]


def draft_lines(plan: Plan) -> list[str]:
    """MTP draft acceptance of each evaluation run that was served with drafting."""
    if plan.eval is None or not plan.eval.draft_mtp:
        return []
    from glmgguf.eval.compare import draft_summary

    lines = []
    for preset in plan.eval.presets:
        doc = read_json(plan.workdir / f"eval-{preset}" / f"{preset}.json")
        if not doc:
            continue
        d = draft_summary([r for r in doc["results"] if r["outcome"] != "error"])
        draft = doc["spec"].get("draft") or {}
        if d is None or not d["drafted"]:
            lines.append(f"MTP drafting ({preset}): no draft tokens reported by llama-server")
            continue
        lines.append(f"MTP drafting ({preset}, up to {draft.get('n_max', '?')} per step): "
                     f"{100 * d['acceptance']:.1f}% of {d['drafted']:,} drafted tokens accepted "
                     f"({d['accepted']:,}) over {len(doc['results'])} prompts")
    return [""] + lines if lines else []
