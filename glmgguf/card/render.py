"""A build's card as markdown with Hugging Face YAML front matter; every number comes from its `BuildFacts`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from glmgguf import __version__
from glmgguf.card import hardware as hw
from glmgguf.card.facts import BuildFacts, EvalFacts
from glmgguf.eval.stats import two_proportion_z
from glmgguf.units import format_size

SIGNIFICANT = 0.05  # a sampler guardrail is recommended when it loops less at this two-sided p-value
LIBRARY = {"gguf": "gguf", "nvfp4": "transformers", "checkpoint": "transformers"}
_MTP = {"keep": "kept (llama-server can draft with it)", "drop": "dropped", "only": "the MTP block alone"}
_FLAGS = {"temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
          "repetition_penalty": "--repeat-penalty"}


@dataclass(frozen=True)
class FamilyRow:
    """One build of the plan in the family table: its facts and where its card is."""

    facts: BuildFacts
    card: Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(ci: tuple[float, float]) -> str:
    return f"{_pct(ci[0])} to {_pct(ci[1])}"


def _num(v: float) -> str:
    return f"{v:g}"


def front_matter(f: BuildFacts) -> list[str]:
    """base_model (and its relation) and license when known, tags and library_name."""
    lines = ["---"]
    if f.base_model:
        relation = "quantized" if f.kind != "checkpoint" and f.prune is None and f.kd is None else "finetune"
        lines += [f"base_model: {f.base_model}", f"base_model_relation: {relation}"]
    if f.license:
        lines.append(f"license: {f.license}")
    tags = ["glm_moe_dsa", "moe", *([f.kind] if f.kind != "checkpoint" else []),
            *(["reap-pruned"] if f.prune else []), *(["router-kd"] if f.kd else []), *(["lora"] if f.lora else []),
            *([f.nvfp4.format] if f.nvfp4 else [])]
    lines += ["tags:", *[f"- {t}" for t in tags], f"library_name: {LIBRARY[f.kind]}", "---"]
    return lines


def _made_by(f: BuildFacts) -> str:
    steps = [*(["REAP pruning"] if f.prune else []), *(["Router-KD"] if f.kd else []),
             *(["LoRA-KD" + (" (adapter GGUF)" if f.lora.adapter else "")] if f.lora else [])]
    steps.append({"gguf": f"GGUF ({f.gguf.recipe})" if f.gguf else "GGUF",
                  "nvfp4": f"NVFP4 ({f.nvfp4.format})" if f.nvfp4 else "NVFP4", "checkpoint": "safetensors"}[f.kind])
    return " -> ".join(steps)


def properties(f: BuildFacts) -> list[str]:
    m = f.model
    rows = [("base model", f.base_model or f"{f.source or 'not recorded'} (source folder; no Hub repository given)"),
            ("made by", _made_by(f))]
    if f.prune:
        mtp = _mtp_share(f.prune.moe_layers, m.moe_layers)
        rows.append(("routed experts per MoE layer", f"{'/'.join(map(str, f.prune.kept))} of "
                     f"{'/'.join(map(str, f.prune.source))} ({f.prune.moe_layers} MoE layers{', ' * bool(mtp)}{mtp})"))
    elif m.experts is not None:
        rows.append(("routed experts per MoE layer", f"{m.experts} ({m.moe_layers} MoE layers)"))
    rows += [("experts per token", str(m.experts_per_tok)),
             ("parameters", f"{m.total_params:,} stored; {m.active_params:,} active per token "
                            "(routed experts counted by the share a token uses; MTP block not counted)"),
             ("format", _format(f)), ("size on disk", f"{format_size(f.size_bytes)} ({f.size_bytes:,} bytes)")]
    if m.cache.max_context:
        rows.append(("context length", f"{m.cache.max_context:,} tokens (config)"))
    if f.gguf:
        rows += [("MTP block", _MTP.get(f.gguf.mtp or "", "not recorded")),
                 ("DSA indexer", f"converted with `--indexer {f.gguf.indexer}`" if f.gguf.indexer else "not recorded")]
    return ["## Properties", "", "| property | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _mtp_share(n: int, trunk: int) -> str:
    """How many of `n` pruned MoE layers are the MTP block ("" when none)."""
    return f"{n - trunk} of them the MTP block" if n > trunk else ""


def _format(f: BuildFacts) -> str:
    if f.gguf:
        desc = f": {f.gguf.recipe_description}" if f.gguf.recipe_description else ""
        return f"GGUF (glm-dsa), recipe {f.gguf.recipe or 'not recorded'}{desc}"
    if f.nvfp4:
        return (f"NVFP4 ({f.nvfp4.format}): {f.nvfp4.experts_nvfp4:,} routed experts in "
                f"{len(f.nvfp4.quantized_layers)} layers at 4 bits, everything else as in the source")
    return f.storage


def lineage(f: BuildFacts) -> list[str]:
    lines = []
    if f.prune:
        p = f.prune
        mtp = _mtp_share(p.moe_layers, f.model.moe_layers)
        tokens = f" on {p.calibration_tokens:,} calibration tokens" if p.calibration_tokens else ""
        lines.append(f"- REAP ({p.metric}, {p.per_layer}): kept {'/'.join(map(str, p.kept))} of "
                     f"{'/'.join(map(str, p.source))} routed experts in each of {p.moe_layers} MoE layers"
                     f"{f' ({mtp})' if mtp else ''}{tokens}.")
    if f.kd:
        k = f.kd
        line = f"- Router-KD: {k.steps:,} steps training {k.trainable_params:,} router parameters"
        if k.first_eval and k.last_eval:
            a, b = k.first_eval, k.last_eval
            line += (f"; held-out KL to the unpruned teacher {a['kl']:.5f} -> {b['kl']:.5f}, top-1 agreement "
                     f"{a['top1']:.3f} -> {b['top1']:.3f}")
        lines.append(line + ".")
    if f.lora:
        lo = f.lora
        where = (f"served as the llama.cpp adapter `{lo.adapter}` (`--lora`), which the evaluations applied"
                 if lo.adapter else "merged into the weights")
        lines.append(f"- LoRA-KD: rank-{lo.rank} adapters on {', '.join(lo.targets)}"
                     f"{' and the router gates' if lo.train_gates else ''}, {lo.steps:,} steps training "
                     f"{lo.trainable_params:,} parameters to the same teacher; {where}.")
    return ["## How it was made", "", *lines] if lines else []


def tensor_types(f: BuildFacts) -> list[str]:
    """Which tensors the recipe protected at which type, as the file holds them."""
    if not f.gguf:
        return []
    rows = [f"| {r.role} | {r.n_tensors} | {', '.join(f'{q} x {n}' for q, n in r.types)} | {r.bpw:.2f} |"
            for r in f.gguf.roles]
    rules = []
    if f.gguf.recipe_rules:
        rules = [f"Recipe `{f.gguf.recipe}`, first matching rule wins (norms, 1-D tensors, the router and "
                 "indexer.proj stay F32 whatever a rule says):", "", *[f"- {r}" for r in f.gguf.recipe_rules], ""]
    return ["## Tensor types", "", *rules, "As the file holds them (`glmgguf inspect`):", "",
            "| role | tensors | types | bits per weight |", "|---|---:|---|---:|", *rows]


def quality(f: BuildFacts) -> list[str]:
    lines = []
    if f.kld:
        k = f.kld
        ctx = f" at context {k.ctx:,}" if k.ctx else ""
        lines += [f"KL divergence against {k.base}{ctx}: mean {k.mean_kld:.6f} ± {k.mean_kld_err:.6f}, same top "
                  f"token {k.same_top_pct:.2f}%."]
    if f.evals:
        lines += [*([""] if lines else []), *_eval_table(f.evals, f.baseline)]
    return ["## Quality", "", *lines] if lines else []


def _cells(r: EvalFacts) -> str:
    """The measured cells of a run's row: sampler, n, loop rate, natural EOS, distinct-4, median tokens, MTP."""
    d4 = "-" if r.distinct4 is None else f"{r.distinct4:.3f}"
    med = "-" if r.median_tokens is None else _num(r.median_tokens)
    acc = "-" if not r.draft else (f"{_pct(r.draft['accepted'] / r.draft['drafted'])} "
                                   f"({r.draft['accepted']:,}/{r.draft['drafted']:,})")
    return (f"| {r.preset} | {r.n} | {_pct(r.loops / r.n)} ({_ci(r.loop_ci)}) | {_pct(r.eos / r.n)} "
            f"({_ci(r.eos_ci)}) | {d4} | {med} | {acc} |")


def _z(r: EvalFacts, other: EvalFacts | None) -> str:
    return "-" if other is None else "{:+.2f} (p={:.2g})".format(*two_proportion_z(r.loops, r.n, other.loops, other.n))


def _unpruned(runs: tuple[EvalFacts, ...], baseline: tuple[EvalFacts, ...]) -> dict[str, EvalFacts]:
    """The baseline runs by sampler preset, those on the same prompts as the build's runs."""
    return {b.preset: b for b in baseline if runs and b.prompts == runs[0].prompts}


def _eval_table(runs: tuple[EvalFacts, ...], baseline: tuple[EvalFacts, ...] = ()) -> list[str]:
    """The loop evaluations, z-tested against the first run and, with `baseline`, against the unpruned source
    model's run of the same sampler on the same prompts (whose rows follow)."""
    first, unpruned = runs[0], _unpruned(runs, baseline)
    rows = [f"{_cells(r)} {_z(r, first if i else None)} |" + (f" {_z(r, unpruned.get(r.preset))} |" if unpruned else "")
            for i, r in enumerate(runs)]
    head = "| sampler | n | loop rate | natural EOS | distinct-4 | median tokens | MTP draft acceptance |"
    vs = "; z vs unpruned: against the unpruned source model's run with the same sampler" if unpruned else ""
    lines = [f"Loop evaluation in llama-server on the `{first.prompts}` prompts (raw sampling, loops detected, not "
             f"truncated; 95% Wilson intervals; z: two-proportion test of the loop rate against the first run{vs}):",
             "", head + " loop z |" + (" loop z vs unpruned |" if unpruned else ""),
             "|---|---:|---|---|---:|---:|---|---|" + ("---|" if unpruned else ""), *rows]
    if unpruned:
        lines += ["", "The unpruned source model, converted with the same recipe and evaluated the same way:", "",
                  head, "|---|---:|---|---|---:|---:|---|",
                  *(_cells(unpruned[r.preset]) for r in runs if r.preset in unpruned)]
    return lines


def guardrail(f: BuildFacts) -> EvalFacts | None:
    """The run whose sampler loops significantly less than the first run's, if any."""
    if len(f.evals) < 2:
        return None
    first = f.evals[0]
    best = min(f.evals[1:], key=lambda r: r.loops / r.n)
    z, p = two_proportion_z(best.loops, best.n, first.loops, first.n)
    return best if z < 0 and p < SIGNIFICANT else None


def serving(f: BuildFacts) -> list[str]:
    if f.kind == "gguf":
        return _serve_gguf(f)
    quant = " --quantization modelopt_fp4" if f.nvfp4 and f.nvfp4.format == "modelopt" else ""
    lines = ["## Serving", "", "Not run by this build's pipeline; the flags the format needs (MODEL_DIR: this "
             "folder, GPUS: the devices of a row of the hardware table):", "", "```",
             f"vllm serve MODEL_DIR{quant} --tensor-parallel-size GPUS --tool-call-parser glm47 "
             "--reasoning-parser glm45",
             f"python -m sglang.launch_server --model-path MODEL_DIR{quant} --tp GPUS", "```"]
    if f.model.cache.n_mtp:
        lines += ["", "vLLM drafts with the MTP block when asked (`--speculative-config.method mtp`)."]
    return lines


def _serve_gguf(f: BuildFacts) -> list[str]:
    assert f.gguf is not None
    cmd = f"llama-server -m {f.gguf.files[0]} -c CONTEXT"
    notes = ["CONTEXT: a context the hardware table below allows."]
    lora = next((r.lora for r in f.evals if r.lora), None)
    if lora:
        cmd += f" --lora {lora}"
        notes.append(f"`{lora}`: the LoRA-KD adapter (llama.cpp adapter GGUF) evaluated with this build; without it "
                     "this is the Router-KD model.")
    drafted = next((r.draft for r in f.evals if r.draft), None)
    if drafted:
        cmd += (f" --spec-type draft-mtp --spec-draft-n-max {drafted['n_max']} "
                f"--spec-draft-p-min {_num(drafted['p_min'])}")
        notes.append("MTP drafting as evaluated (acceptance in the quality table).")
    guard = guardrail(f)
    if guard:
        cmd += "".join(f" {_FLAGS[k]} {_num(v)}" for k, v in guard.sampler.items() if k in _FLAGS)
        first = f.evals[0]
        notes.append(f"Sampler `{guard.preset}`: it looped in {_pct(guard.loops / guard.n)} of prompts against "
                     f"{_pct(first.loops / first.n)} for `{first.preset}`, and ended by itself (natural EOS) in "
                     f"{_pct(guard.eos / guard.n)} against {_pct(first.eos / first.n)} (quality table).")
    if f.gguf.requires_patches:
        notes.append(f"Needs llama.cpp with {', '.join(f.gguf.requires_patches)} (`glmgguf llama build` builds it).")
    how = "the command the evaluation ran, as a server" if f.evals else "not run by this build's pipeline"
    return ["## Serving", "", f"llama.cpp ({how}):", "", "```", cmd, "```", "", *[f"- {n}" for n in notes]]


def hardware(f: BuildFacts) -> list[str]:
    c = f.model.cache
    per_token = hw.kv_bytes_per_token(c)
    cols = hw.contexts(c.max_context)
    rows = []
    for s in hw.sets_for(f.kind):
        top = hw.largest_context(f.size_bytes, per_token, s, c.max_context)
        cells = " | ".join("yes" if top >= n else "no" for n in cols)
        rows.append(f"| {s.name} | {format_size(s.memory)} x {s.count} | {cells} | "
                    f"{f'{top:,}' if top else 'does not fit'} |")
    draft = hw.kv_bytes_per_token(c, drafting=True) - per_token
    mtp = f" MTP drafting adds {draft:,} bytes per token for the MTP block's own cache." if draft else ""
    return ["## Hardware", "",
            f"KV cache: {per_token:,} bytes per token ({c.n_layers} layers x {c.mla_width} MLA elements + "
            f"{c.n_full_indexer} full indexer layers x {c.indexer_width} elements, {hw.KV_ELEMENT_BYTES} bytes "
            f"each, as llama.cpp's glm-dsa cache stores them).{mtp} A build fits when its weights "
            f"({format_size(f.size_bytes)}) + the KV cache + {format_size(hw.OVERHEAD_PER_DEVICE)} per device fit "
            "the usable memory (90% of a GPU or of RAM, 75% of Apple unified memory).", "",
            f"| hardware | memory | {' | '.join(f'{n:,}' for n in cols)} | largest context |",
            "|---|---|" + "---|" * len(cols) + "---:|", *rows]


def family(rows: list[FamilyRow], here: Path) -> list[str]:
    """The plan's builds, each linked to its card (paths relative to this card's folder)."""
    if not rows:
        return []
    out = ["## Builds of this plan", "", "| build | made by | routed experts | active parameters | size | card |",
           "|---|---|---:|---:|---:|---|"]
    for r in rows:
        m = r.facts.model
        link = Path(os.path.relpath(r.card, here)).as_posix()
        experts = "-" if m.experts is None else str(m.experts)
        out.append(f"| {r.facts.name} | {_made_by(r.facts)} | {experts} | {m.active_params:,} | "
                   f"{format_size(r.facts.size_bytes)} | [{link}]({link}) |")
    return out


def not_measured(f: BuildFacts) -> list[str]:
    """The measurements a card of this kind reports that were not run for this build."""
    missing = []
    if f.kind == "gguf" and f.kld is None:
        missing.append("KL divergence against the unquantized model (`glmgguf kld`)")
    if not f.evals:
        missing.append("loop / natural-EOS / distinct-4 evaluation (`glmgguf eval loops`)")
    if not _unpruned(f.evals, f.baseline):
        missing.append("loop evaluation of the unpruned source model, so no z-test against it")
    if not any(r.draft for r in f.evals) and f.model.cache.n_mtp:
        missing.append("MTP draft acceptance")
    return ["## Not measured", "", *[f"- {m}" for m in missing]] if missing else []


def render(f: BuildFacts, family_rows: list[FamilyRow] | None = None, here: Path | None = None) -> str:
    """The card of `f`; `family_rows` links the other builds of the plan relative to `here` (the card's folder)."""
    title = f"# {f.source or 'model'}: {f.name}"
    intro = (f"Built by glmgguf {__version__}. Every number below is read from this build's manifests and "
             "measurements; what was not measured is listed at the end, not estimated.")
    sections = [properties(f), lineage(f), tensor_types(f), quality(f), serving(f), hardware(f),
                family(family_rows or [], here or f.output.parent), not_measured(f)]
    body = [title, "", intro]
    for s in sections:
        if s:
            body += ["", *s]
    return "\n".join([*front_matter(f), "", *body]).rstrip() + "\n"
