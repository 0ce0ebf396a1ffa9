"""Summaries of evaluation runs and their comparison: markdown tables, z-tests against the first run, a chart."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from glmgguf.eval.probes import EvalError
from glmgguf.eval.stats import two_proportion_z, wilson

OUTCOMES = ("eos", "loop", "think_loop", "cap", "error")
FORMAT_PREFIX = "glmgguf-eval-loops/"


def draft_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Drafted and accepted tokens over the results that report them (None when none does: no drafting)."""
    drafted = [r for r in results if r.get("draft_n") is not None]
    if not drafted:
        return None
    n = sum(int(r["draft_n"]) for r in drafted)
    acc = sum(int(r.get("draft_accepted") or 0) for r in drafted)
    return {"prompts": len(drafted), "drafted": n, "accepted": acc, "acceptance": acc / n if n else None}


def summarize(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts and rates of one run. Errors are left out of `n`; loops count plain and think-restart loops."""
    results = list(results)
    counted = [r for r in results if r["outcome"] != "error"]
    n = len(counted)
    counts = {k: sum(r["outcome"] == k for r in results) for k in OUTCOMES}
    loops = counts["loop"] + counts["think_loop"]
    d4 = [r["distinct4"] for r in counted if r["distinct4"] is not None]
    by_source: dict[str, dict[str, int]] = {}
    for r in counted:
        s = by_source.setdefault(r["source"], {"n": 0, "loops": 0, "eos": 0})
        s["n"] += 1
        s["loops"] += r["outcome"] in ("loop", "think_loop")
        s["eos"] += r["outcome"] == "eos"
    return {
        "n": n, "counts": counts, "loops": loops,
        "loop_rate": loops / n if n else None, "loop_ci95": wilson(loops, n),
        "eos_rate": counts["eos"] / n if n else None, "eos_ci95": wilson(counts["eos"], n),
        "borderline": sum(bool(r["borderline"]) for r in counted),
        "cap_looping": sum(r["outcome"] == "cap" and bool(r["borderline"]) for r in counted),
        "distinct4_mean": statistics.fmean(d4) if d4 else None,
        "median_tokens": statistics.median(r["tokens"] for r in counted) if counted else None,
        "by_source": dict(sorted(by_source.items())),
        "draft": draft_summary(counted),
    }


def load_run(path: str | Path) -> dict[str, Any]:
    """A run file written by `glmgguf eval loops` (summary recomputed from its results)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path} is not a run file (not JSON: {e})") from None
    if (not isinstance(doc, dict) or not str(doc.get("format", "")).startswith(FORMAT_PREFIX)
            or not isinstance(doc.get("results"), list)):
        raise EvalError(f"{path} is not a run file of 'glmgguf eval loops'")
    doc["summary"] = summarize(doc["results"])
    return doc


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci: Sequence[float]) -> str:
    return f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def _z(z: float, p: float) -> str:
    return f"{z:+.2f} (p={p:.2g})"


def _cap(s: dict[str, Any]) -> str:
    """Cap count, with how many of those outputs were looping (borderline repetition) when cut."""
    return f"{s['counts']['cap']} ({s['cap_looping']} looping)" if s["cap_looping"] else str(s["counts"]["cap"])


def _draft(d: dict[str, Any] | None) -> str:
    return "-" if d is None else f"{_pct(d['acceptance'])} ({d['accepted']}/{d['drafted']})"


def compare_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: one row per run, z-tests of loop and EOS rate against the first run; then loops per source.

    When any run was served with speculative decoding, a column gives its draft acceptance (accepted/drafted).
    """
    drafting = any(doc["summary"].get("draft") for _, doc in runs)
    head = ("| run | n | loop rate | loop 95% CI | " + ("draft acceptance | " if drafting else "") +
            "EOS rate | EOS 95% CI | think loops | cap | borderline | errors | "
            "distinct-4 | median tokens | loop z vs first | EOS z vs first |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    base = runs[0][1]["summary"]
    for i, (label, doc) in enumerate(runs):
        s = doc["summary"]
        c = s["counts"]
        zl = zeos = "-"
        if i:
            zl = _z(*two_proportion_z(s["loops"], s["n"], base["loops"], base["n"]))
            zeos = _z(*two_proportion_z(c["eos"], s["n"], base["counts"]["eos"], base["n"]))
        d4 = "-" if s["distinct4_mean"] is None else f"{s['distinct4_mean']:.3f}"
        med = "-" if s["median_tokens"] is None else f"{s['median_tokens']:g}"
        acc = f"{_draft(s.get('draft'))} | " if drafting else ""
        lines.append(f"| {label} | {s['n']} | {_pct(s['loop_rate'])} | {_ci(s['loop_ci95'])} | {acc}"
                     f"{_pct(s['eos_rate'])} | {_ci(s['eos_ci95'])} | {c['think_loop']} | {_cap(s)} "
                     f"| {s['borderline']} | {c['error']} "
                     f"| {d4} | {med} | {zl} | {zeos} |")
    sources = sorted({src for _, doc in runs for src in doc["summary"]["by_source"]})
    lines += ["", "Loops per source (loops/n):", "", "| source | " + " | ".join(label for label, _ in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for src in sources:
        cells = []
        for _, doc in runs:
            b = doc["summary"]["by_source"].get(src)
            cells.append(f"{b['loops']}/{b['n']}" if b else "-")
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kl_table(results: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: each checkpoint's KL(teacher || model) and top-1 agreement on a held-out teacher cache (the JSON
    of `glmgguf kd eval`), with its change against the first row."""
    first = results[0][1]["kl"]
    lines = ["Held-out KL to the teacher (`glmgguf kd eval`):", "",
             "| checkpoint | KL (nats/token) | vs first | top-1 agreement | positions |", "|---|---|---|---|---|"]
    for label, r in results:
        change = f"{100 * (r['kl'] / first - 1):+.1f}%" if first else "-"
        lines.append(f"| {label} | {r['kl']:.5f} | {change} | {100 * r['top1']:.2f}% | {r['positions']} |")
    return "\n".join(lines) + "\n"


def compare_chart(runs: Sequence[tuple[str, dict[str, Any]]], png: Path) -> None:
    """Bar chart of loop and natural-EOS rates per run with Wilson 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(runs) + 3), 4), sharey=True)
    for ax, (key, title) in zip(axes, (("loop", "loop rate"), ("eos", "natural-EOS rate")), strict=True):
        rates = [100 * (doc["summary"][f"{key}_rate"] or 0) for _, doc in runs]
        cis = [doc["summary"][f"{key}_ci95"] for _, doc in runs]
        err = [[r - 100 * lo for r, (lo, _) in zip(rates, cis, strict=True)],
               [100 * hi - r for r, (_, hi) in zip(rates, cis, strict=True)]]
        ax.bar(range(len(runs)), rates, yerr=err, capsize=4, color="tab:red" if key == "loop" else "tab:green")
        ax.set_xticks(range(len(runs)), [label for label, _ in runs], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("% of prompts (95% Wilson CI)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
