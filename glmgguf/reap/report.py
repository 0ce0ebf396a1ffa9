"""A picture and a table of REAP statistics: layers x experts saliency heatmap, pruned experts marked."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from glmgguf.reap.prune import PrunePlan
from glmgguf.reap.stats import ReapStats


def layer_table(stats: ReapStats, plan: PrunePlan | None = None, metric: str = "reap") -> list[dict]:
    """One row per MoE layer: tokens, load entropy, never-routed experts, saliency spread, what a plan keeps."""
    rows = []
    for L in sorted(stats.layers):
        s = stats.layer_summary(L)
        score = stats.score(L, metric, plan.seed if plan else 0)
        row = {"layer": L, "tokens": s["tokens"], "experts": s["experts"], "never_routed": s["never_routed"],
               "load_entropy": s["load_entropy"], "reap_min": s["reap_min"], "reap_median": s["reap_median"],
               "reap_max": s["reap_max"]}
        if plan is not None and L in plan.keep:
            kept = torch.tensor(plan.keep[L], dtype=torch.long)
            total = float(stats.layers[L]["reap_sum"].sum())
            row["kept"] = len(kept)
            row["reap_mass_kept"] = float(stats.layers[L]["reap_sum"][kept].sum()) / total if total else 1.0
            row["tokens_kept"] = (float(stats.layers[L]["count"][kept].sum())
                                  / max(1.0, float(stats.layers[L]["count"].sum())))
            row["score_kept_min"] = float(score[kept].min())
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no MoE layers)\n"
    cols = list(rows[0])
    fmt = {"load_entropy": "{:.3f}", "reap_min": "{:.4g}", "reap_median": "{:.4g}", "reap_max": "{:.4g}",
           "reap_mass_kept": "{:.1%}", "tokens_kept": "{:.1%}", "score_kept_min": "{:.4g}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def heatmap(stats: ReapStats, out: str | os.PathLike, plan: PrunePlan | None = None, metric: str = "reap",
            title: str | None = None) -> Path:
    """Write a PNG: rows = MoE layers, columns = experts, color = saliency / the layer's max; pruned = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(stats.layers)
    width = max(stats.n_experts(L) for L in layers)
    grid = np.full((len(layers), width), np.nan)
    for r, L in enumerate(layers):
        s = stats.score(L, metric, plan.seed if plan else 0).double()
        top = float(s.max())
        grid[r, : s.numel()] = (s / top).numpy() if top > 0 else s.numpy()
    fig_w = min(24.0, 3.0 + width * 0.12)
    fig_h = min(30.0, 1.5 + len(layers) * 0.3)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0, vmax=1.0)
    if plan is not None:
        xs, ys = [], []
        for r, L in enumerate(layers):
            kept = set(plan.keep.get(L, range(stats.n_experts(L))))
            for e in range(stats.n_experts(L)):
                if e not in kept:
                    xs.append(e)
                    ys.append(r)
        ax.scatter(xs, ys, marker="x", c="red", s=max(4.0, 400.0 / max(width, 1)), linewidths=0.8,
                   label="pruned")
        ax.legend(loc="upper right", fontsize=8)
    names = [f"{L} (MTP)" if L >= stats.fingerprint.get("n_layers", 1 << 30) else str(L) for L in layers]
    ax.set_yticks(range(len(layers)), names, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title or f"{metric} saliency per layer (relative to the layer's max)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
