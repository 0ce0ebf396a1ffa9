"""Model cards: the testbed plan writes one per output, and every number on them is read back from the manifests,
JSON files, GGUF headers and safetensors headers they came from (with independent readers)."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from glmgguf import __version__
from glmgguf.card import hardware as hw
from glmgguf.units import format_size

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "glmgguf" / "pipeline" / "plans" / "testbed.toml"
EXTRA = """
[[gguf]]
name = "q8"
recipe = "q8_0"
split_max_size = "5M"

[nvfp4]
format = "modelopt"

[card]
base_model = "example-org/glm-testbed"
license = "mit"
"""
CARDS = {"prune": "prune/model/README.md", "kd": "kd/model/README.md", "nvfp4": "nvfp4/model/README.md",
         "gguf-q4_protected": "gguf-q4_protected/README.md", "gguf-q8": "gguf-q8/split/README.md"}
# numbers that are the card's stated method, not measurements: KV bytes per element, overhead per device, usable
# memory of a GPU / RAM and of Apple unified memory, the Wilson interval's level, NVFP4's bits
CONSTANTS = {"2", "2.0", "90%", "75%", "95%", "4"}
NUMBER = re.compile(r"(?<![\w.\-])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w.])")


@pytest.fixture(scope="module")
def work(trained_testbed_dir, tmp_path_factory) -> Path:
    """The shipped testbed plan (shortened) with a split q8_0 GGUF that is not evaluated, an NVFP4 export and a
    [card] section, run once."""
    tmp = tmp_path_factory.mktemp("card")
    text = (SHIPPED.read_text().replace('workdir = "demo-out/pipeline"', 'workdir = "work"')
            .replace("steps = 100", "steps = 10").replace("kd_samples = 256", "kd_samples = 32"))
    assert "steps = 10" in text
    (tmp / "plan.toml").write_text(text + EXTRA)
    res = subprocess.run([sys.executable, "-m", "glmgguf", "pipeline", str(tmp / "plan.toml"), "--quiet"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "[cards] 5 model card(s)" in res.stdout, res.stdout
    return tmp / "work"


def _card(work: Path, name: str) -> str:
    return (work / CARDS[name]).read_text()


def _front_matter(card: str) -> dict:
    head, sep, _ = card.partition("\n---\n")
    assert head.startswith("---\n") and sep, card[:300]
    return yaml.safe_load(head[4:])


def _numbers(text: str) -> list[str]:
    for name in sorted((s.name for s in hw.DEVICE_SETS), key=len, reverse=True):
        text = text.replace(name, "SET")
    return NUMBER.findall(text.replace(f"glmgguf {__version__}", "glmgguf VERSION"))


# ---- independent readings of the sources --------------------------------------------------------------------


def _weight_files(model: Path) -> list[str]:
    index = model / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def _safetensors_params(model: Path) -> tuple[int, int]:
    """(all, active per token) weights of a BF16 checkpoint from its safetensors headers."""
    from safetensors import safe_open

    cfg = json.loads((model / "config.json").read_text())
    total = dense = routed = 0
    for f in _weight_files(model):
        with safe_open(str(model / f), "pt") as st:
            for name in st.keys():
                n = math.prod(st.get_slice(name).get_shape())
                total += n
                m = re.match(r"model\.layers\.(\d+)\.", name)
                if m and int(m.group(1)) >= cfg["num_hidden_layers"]:
                    continue
                if ".mlp.experts." in name:
                    routed += n
                else:
                    dense += n
    return total, dense + routed * cfg["num_experts_per_tok"] // cfg["n_routed_experts"]


def _gguf_params(files: list[Path]) -> tuple[int, int, dict]:
    """(all, active per token, the first file's fields) from gguf-py's reader."""
    import gguf

    readers = [gguf.GGUFReader(f) for f in files]
    kv = {k: f.contents() for k, f in readers[0].fields.items() if not k.startswith("GGUF.")}
    trunk = kv["glm-dsa.block_count"] - kv.get("glm-dsa.nextn_predict_layers", 0)
    total = dense = routed = 0
    for t in (t for r in readers for t in r.tensors):
        n = int(t.n_elements)
        total += n
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= trunk:
            continue
        if re.search(r"ffn_(gate|up|down)_exps", t.name):
            routed += n
        else:
            dense += n
    return total, dense + routed * kv["glm-dsa.expert_used_count"] // kv["glm-dsa.expert_count"], kv


def _kv_per_token(cfg: dict) -> int:
    """K rows of kv_lora_rank + qk_rope_head_dim per trunk layer, indexer keys per full layer, 2 bytes each."""
    full = sum(t == "full" for t in cfg["indexer_types"])
    return 2 * (cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
                + full * cfg["index_head_dim"])


def _hardware_lines(weights: int, cfg: dict, kinds: str) -> list[str]:
    per_token = _kv_per_token(cfg)
    mla = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    ctx = cfg["max_position_embeddings"]
    lines = [f"KV cache: {per_token:,} bytes per token ({cfg['num_hidden_layers']} layers x {mla} MLA elements + "
             f"{sum(t == 'full' for t in cfg['indexer_types'])} full indexer layers x {cfg['index_head_dim']} "
             f"elements, 2 bytes each",
             f"MTP drafting adds {2 * cfg['num_nextn_predict_layers'] * mla:,} bytes per token"]
    for s in hw.DEVICE_SETS:
        if kinds not in s.kinds:
            continue
        free = int(s.count * (s.memory * s.usable - 2 * 10**9)) - weights
        top = min(ctx, free // per_token) if free > 0 else 0
        assert top == ctx  # the testbed fits everywhere at its whole context
        lines.append(f"| {s.name} | {format_size(s.memory)} x {s.count} | yes | {top:,} |")
    return lines


def _z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test (z, two-sided p from scipy's normal tail); (0, 1) when undefined."""
    from scipy.stats import norm

    pooled = (x1 + x2) / (n1 + n2)
    if pooled in (0, 1):
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return z, 2 * norm.sf(abs(z))


def _run_cells(path: Path) -> tuple[str, int, int]:
    """A run's measured cells (scipy's Wilson interval), from its per-prompt results; with its loops and n."""
    from scipy.stats import binomtest

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def ci(k: int, n: int) -> str:
        c = binomtest(k, n).proportion_ci(method="wilson")
        return f"{pct(c.low)} to {pct(c.high)}"

    results = [r for r in json.loads(path.read_text())["results"] if r["outcome"] != "error"]
    n = len(results)
    loops = sum(r["outcome"] in ("loop", "think_loop") for r in results)
    eos = sum(r["outcome"] == "eos" for r in results)
    d4 = statistics.fmean(r["distinct4"] for r in results if r["distinct4"] is not None)
    drafted, accepted = sum(r["draft_n"] for r in results), sum(r["draft_accepted"] for r in results)
    cells = (f"| {path.stem} | {n} | {pct(loops / n)} ({ci(loops, n)}) | {pct(eos / n)} ({ci(eos, n)}) | {d4:.3f} | "
             f"{statistics.median(r['tokens'] for r in results):g} | {pct(accepted / drafted)} "
             f"({accepted:,}/{drafted:,}) |")
    return cells, loops, n


def _eval_lines(work: Path, presets: list[str]) -> list[str]:
    """The quality table's rows: z against the first run and against the unpruned model's run of the same preset,
    then the unpruned model's rows."""
    rows, unpruned, base = [], [], None
    for p in presets:
        cells, loops, n = _run_cells(work / f"eval-{p}" / f"{p}.json")
        unpruned_cells, *counts = _run_cells(work / f"eval-baseline-{p}" / f"{p}.json")
        z = "-" if base is None else "{:+.2f} (p={:.2g})".format(*_z(loops, n, *base))
        base = base or (loops, n)
        rows.append(f"{cells} {z} | " + "{:+.2f} (p={:.2g})".format(*_z(loops, n, *counts)) + " |")
        unpruned.append(unpruned_cells)
    return [*rows, "The unpruned source model, converted with the same recipe and evaluated the same way:",
            *unpruned]


def _kld_line(work: Path, gguf: str) -> str:
    """The KLD sentence of a GGUF's card, from the kld stage's JSON."""
    doc = json.loads((work / "kld" / "kld.json").read_text())
    k = next(r for r in doc["results"] if r["name"] == gguf)["kld"]
    return (f"KL divergence against {Path(doc['base']).name} at context {doc['ctx']:,}: mean {k['mean_kld']:.6f} ± "
            f"{k['mean_kld_err']:.6f}, same top token {k['same_top_pct']:.2f}%.")


def _serve_line(work: Path) -> str:
    """llama-server with the evaluated MTP drafting and, when it looped significantly less than greedy, the
    guarded sampler."""
    runs = {p: json.loads((work / f"eval-{p}" / f"{p}.json").read_text()) for p in ("greedy", "guarded")}
    loops = {p: (sum(r["outcome"] in ("loop", "think_loop") for r in doc["results"]), len(doc["results"]))
             for p, doc in runs.items()}
    z, p = _z(*loops["guarded"], *loops["greedy"])
    s, d = runs["guarded"]["spec"]["sampler"], runs["guarded"]["spec"]["draft"]
    line = (f"llama-server -m q4_protected.gguf -c CONTEXT --spec-type draft-mtp --spec-draft-n-max {d['n_max']} "
            f"--spec-draft-p-min {d['p_min']:g}")
    if z < 0 and p < 0.05:
        line += (f" --temp {s['temperature']:g} --top-p {s['top_p']:g} --top-k {s['top_k']} --min-p {s['min_p']:g} "
                 f"--repeat-penalty {s['repetition_penalty']:g}")
    return line + "\n"


def _lineage_lines(work: Path, model: Path, cfg: dict) -> list[str]:
    keep = json.loads((model / "reap_keep_map.json").read_text())
    kept, src = set(keep["kept_experts"].values()), set(keep["source_experts"].values())
    assert len(kept) == len(src) == 1
    k, s, layers = kept.pop(), src.pop(), len(keep["kept_experts"])
    mtp = layers - sum(t == "sparse" for t in cfg["mlp_layer_types"])
    tokens = json.loads((work / "observe" / "stats.json").read_text())["meta"]["tokens"]
    lines = [f"| routed experts per MoE layer | {k} of {s} ({layers} MoE layers, {mtp} of them the MTP block) |",
             f"- REAP (reap, uniform): kept {k} of {s} routed experts in each of {layers} MoE layers ({mtp} of them "
             f"the MTP block) on {tokens:,} calibration tokens."]
    log = json.loads((work / "kd" / "model" / "kd_train_log.json").read_text())
    if model.parent.name != "prune":
        a, b = log["evals"][0], log["evals"][-1]
        lines.append(f"- Router-KD: {len(log['steps']):,} steps training {log['trainable_parameters']:,} router "
                     f"parameters; held-out KL to the unpruned teacher {a['kl']:.5f} -> {b['kl']:.5f}, top-1 "
                     f"agreement {a['top1']:.3f} -> {b['top1']:.3f}.")
    return lines


def _lora_line(work: Path) -> str:
    """The shipped plan's LoRA-KD (rank 8 on attention and shared experts, the gates trained, merged)."""
    log = json.loads((work / "lora" / "out" / "adapter" / "lora_train_log.json").read_text())
    return (f"- LoRA-KD: rank-8 adapters on attn, shared and the router gates, {len(log['steps']):,} steps training "
            f"{log['trainable_parameters']:,} parameters to the same teacher; merged into the weights.")


def _gguf_type_lines(files: list[Path]) -> list[str]:
    """Per role: tensors, types and bits per weight, from gguf-py's tensor infos (roles from the naming table)."""
    import gguf

    from glmgguf.layout import parse_gguf_name

    roles: dict[str, list] = {}
    for t in (t for f in files for t in gguf.GGUFReader(f).tensors):
        roles.setdefault(parse_gguf_name(t.name).rule.role.value, []).append(t)
    lines = []
    for role, ts in roles.items():
        types: dict[str, int] = {}
        for t in ts:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        bpw = 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)
        cells = ", ".join(f"{q} x {n}" for q, n in sorted(types.items(), key=lambda x: -x[1]))
        lines.append(f"| {role} | {len(ts)} | {cells} | {bpw:.2f} |")
    return lines


def _recipe_lines(name: str) -> list[str]:
    """The recipe's rules as the card lists them, from its TOML file (these recipes match on roles only)."""
    doc = tomllib.loads((ROOT / "quant_recipes" / f"{name}.toml").read_text())
    rules = [f"- {', '.join(sorted(r['role'] if isinstance(r['role'], list) else [r['role']]))} -> "
             f"{r['type'].upper()}" for r in doc.get("rule", [])]
    return [*rules, f"- anything else -> {doc['default'].upper()}"]


def _expected(work: Path) -> dict[str, list[str]]:
    """Per card, lines it must hold verbatim, each built from the files the number comes from."""
    kd_model, prune_model = work / "kd" / "model", work / "prune" / "model"
    cfg = json.loads((kd_model / "config.json").read_text())
    out: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    active: dict[str, int] = {}
    for name, model in (("prune", prune_model), ("kd", kd_model), ("nvfp4", work / "nvfp4" / "model")):
        sizes[name] = sum((model / f).stat().st_size for f in _weight_files(model))
        total, active[name] = _safetensors_params(kd_model if name == "nvfp4" else model)  # NVFP4 packs kd's shapes
        out[name] = [f"| parameters | {total:,} stored; {active[name]:,} active per token",
                     f"| size on disk | {format_size(sizes[name])} ({sizes[name]:,} bytes) |",
                     f"| context length | {cfg['max_position_embeddings']:,} tokens (config) |",
                     f"| experts per token | {cfg['num_experts_per_tok']} |",
                     *_lineage_lines(work, prune_model if name == "prune" else kd_model, cfg),
                     *_hardware_lines(sizes[name], cfg, "checkpoint")]
    nv = json.loads((work / "nvfp4" / "model" / "nvfp4_export.json").read_text())
    out["nvfp4"] += [f"| format | NVFP4 (modelopt): {nv['experts_nvfp4']:,} routed experts in "
                     f"{len(nv['quantized_layers'])} layers at 4 bits", _lora_line(work)]
    for name, recipe, files in (
            ("gguf-q4_protected", "q4_protected", [work / "gguf-q4_protected" / "q4_protected.gguf"]),
            ("gguf-q8", "q8_0", sorted((work / "gguf-q8" / "split").glob("*.gguf")))):
        total, active[name], kv = _gguf_params(files)
        sizes[name] = sum(f.stat().st_size for f in files)
        out[name] = [f"| parameters | {total:,} stored; {active[name]:,} active per token",
                     f"| size on disk | {format_size(sizes[name])} ({sizes[name]:,} bytes) |",
                     f"| context length | {kv['glm-dsa.context_length']:,} tokens (config) |",
                     f"| experts per token | {kv['glm-dsa.expert_used_count']} |",
                     *_lineage_lines(work, kd_model, cfg), _lora_line(work), *_gguf_type_lines(files),
                     *_recipe_lines(recipe),
                     *_hardware_lines(sizes[name], cfg, "gguf")]
    out["gguf-q4_protected"] += [*_eval_lines(work, ["greedy", "guarded"]), _serve_line(work),
                                 _kld_line(work, "q4_protected.gguf")]
    out["gguf-q8"].append(_kld_line(work, sorted((work / "gguf-q8" / "split").glob("*.gguf"))[0].name))
    made = {"prune": "REAP pruning -> safetensors", "kd": "REAP pruning -> Router-KD -> safetensors",
            "nvfp4": "REAP pruning -> Router-KD -> LoRA-KD -> NVFP4 (modelopt)",
            "gguf-q4_protected": "REAP pruning -> Router-KD -> LoRA-KD -> GGUF (q4_protected)",
            "gguf-q8": "REAP pruning -> Router-KD -> LoRA-KD -> GGUF (q8_0)"}
    family = [f"| {n} | {made[n]} | {cfg['n_routed_experts']} | {active[n]:,} | {format_size(sizes[n])} | ["
              for n in CARDS]
    return {name: lines + family for name, lines in out.items()}


# ---- the tests ----------------------------------------------------------------------------------------------


def test_every_output_has_a_card_whose_front_matter_parses(work):
    for name in CARDS:
        meta = _front_matter(_card(work, name))
        assert meta["base_model"] == "example-org/glm-testbed" and meta["license"] == "mit", (name, meta)
        assert meta["base_model_relation"] == "finetune"  # pruned: not only a quantization of the base
        assert meta["library_name"] == ("gguf" if name.startswith("gguf") else "transformers")
        assert {"glm_moe_dsa", "moe", "reap-pruned"} <= set(meta["tags"])
        assert ("router-kd" in meta["tags"]) == (name != "prune")
        assert ("lora" in meta["tags"]) == (name not in ("prune", "kd"))
        assert ("gguf" in meta["tags"]) == name.startswith("gguf"), meta["tags"]
        assert "modelopt" in meta["tags"] if name == "nvfp4" else "modelopt" not in meta["tags"]


def test_every_number_on_the_cards_comes_from_a_manifest(work):
    expected = _expected(work)
    for name, lines in expected.items():
        card = _card(work, name)
        missing = [line for line in lines if line not in card]
        assert not missing, f"{name}: lines not on the card:\n" + "\n".join(missing) + "\n\n" + card
    for name in CARDS:
        card = _card(work, name)
        allowed = {n for lines in expected.values() for line in lines for n in _numbers(line)} | CONSTANTS
        stray = [(line, n) for line in card.splitlines() for n in _numbers(line) if n not in allowed]
        assert not stray, f"{name}: numbers with no source: {stray}"


def test_family_table_links_every_build(work):
    for name, rel in CARDS.items():
        card = _card(work, name)
        here = (work / rel).parent
        for other, other_rel in CARDS.items():
            link = Path(os.path.relpath(work / other_rel, here)).as_posix()
            row = next((line for line in card.splitlines() if line.startswith(f"| {other} |")), None)
            assert row is not None and f"[{link}]({link})" in row, (name, other, row)
            assert (here / link).is_file()


def test_card_of_an_output_with_no_evaluation_says_so(work):
    card = _card(work, "gguf-q8")
    quality = card.split("## Quality")[1].split("\n## ")[0]
    assert quality.strip() == _kld_line(work, sorted((work / "gguf-q8" / "split").glob("*.gguf"))[0].name)
    measured = [line for line in card.splitlines() if re.search(r"loop|EOS|distinct|acceptance", line)]
    assert measured and not [line for line in measured if _numbers(line)], measured
    assert "- loop / natural-EOS / distinct-4 evaluation (`glmgguf eval loops`)" in card
    assert "KL divergence against the unquantized model" not in card  # measured by the kld stage
    assert "- MTP draft acceptance" in card
    first = sorted((work / "gguf-q8" / "split").glob("*.gguf"))[0].name
    assert f"llama-server -m {first} -c CONTEXT\n" in card  # no drafting, no sampler: neither was measured
    evaluated = _card(work, "gguf-q4_protected")
    assert "## Quality" in evaluated and "- MTP draft acceptance" not in evaluated
    assert "unpruned source model, so no z-test" not in evaluated and "(`glmgguf kld`)" not in evaluated


def test_stale_evaluation_is_left_out(work, tmp_path, caplog):
    """An evaluation of an earlier GGUF (its recorded upstream fingerprint is not the GGUF's) is not this GGUF's."""
    from glmgguf.card.gather import gather

    for name in ("gguf-q4_protected", "eval-greedy", "eval-guarded", "eval-report", "lora", "kd", "prune"):
        (tmp_path / name).symlink_to(work / name)
    manifest = json.loads((work / "eval-guarded" / "manifest.json").read_text())
    manifest["upstream"]["gguf-q4_protected"] = "0" * 64
    (tmp_path / "eval-guarded").unlink()
    (tmp_path / "eval-guarded").mkdir()
    (tmp_path / "eval-guarded" / "guarded.json").symlink_to(work / "eval-guarded" / "guarded.json")
    (tmp_path / "eval-guarded" / "manifest.json").write_text(json.dumps(manifest))
    facts = gather(tmp_path / "gguf-q4_protected")
    assert [e.preset for e in facts.evals] == ["greedy"]
    assert "eval-guarded was made from an earlier output of gguf-q4_protected" in caplog.text
    assert facts.kd is not None and facts.kd.trainable_params > 0  # the lineage is current


def _relinked(work: Path, tmp_path: Path, names: list[str], stale: str, edit) -> None:
    """`names` linked from `work`, `stale` a copy whose manifest `edit` changes (its output still linked)."""
    tmp_path.mkdir()
    for name in names:
        (tmp_path / name).symlink_to(work / name)
    manifest = json.loads((work / stale / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / stale).mkdir()
    (tmp_path / stale / manifest["output"]).symlink_to(work / stale / manifest["output"])
    (tmp_path / stale / "manifest.json").write_text(json.dumps(manifest))


def test_stale_kld_and_baseline_are_left_out(work, tmp_path, caplog):
    """A KLD of an earlier GGUF, or a baseline converted from another source model, is not this GGUF's."""
    from glmgguf.card.gather import gather

    names = ["gguf-q4_protected", "lora", "kd", "prune", "eval-greedy", "eval-guarded", "eval-report", "kld-reference",
             "eval-baseline-greedy", "eval-baseline-guarded"]
    fresh = gather(work / "gguf-q4_protected")
    assert fresh.kld is not None and [b.preset for b in fresh.baseline] == ["greedy", "guarded"]
    _relinked(work, tmp_path / "a", names + ["baseline-gguf"], "kld",
              lambda m: m["upstream"].update({"gguf-q4_protected": "0" * 64}))
    facts = gather(tmp_path / "a" / "gguf-q4_protected")
    assert facts.kld is None and facts.baseline == fresh.baseline
    assert "kld was made from an earlier output of gguf-q4_protected" in caplog.text
    _relinked(work, tmp_path / "b", names + ["kld"], "baseline-gguf", lambda m: m["inputs"].update(model="0" * 64))
    facts = gather(tmp_path / "b" / "gguf-q4_protected")
    assert facts.baseline == () and facts.kld == fresh.kld
    assert "baseline-gguf was converted from another source model than gguf-q4_protected" in caplog.text


def test_card_command_writes_the_pipeline_card(work, tmp_path):
    from click.testing import CliRunner

    from glmgguf.cli import main

    out = tmp_path / "README.md"
    gguf = work / "gguf-q4_protected" / "q4_protected.gguf"
    res = CliRunner().invoke(main, ["card", str(gguf), "--out", str(out), "--base-model", "example-org/glm-testbed",
                                    "--license", "mit"])
    assert res.exit_code == 0, res.output
    pipeline_card = _card(work, "gguf-q4_protected")
    strip_links = re.compile(r"\[[^]]*\]\([^)]*\)")
    assert strip_links.sub("", out.read_text()) == strip_links.sub("", pipeline_card)
    res = CliRunner().invoke(main, ["card", str(work / "observe" / "stats.safetensors")])
    assert res.exit_code == 1 and "neither a GGUF nor a checkpoint" in res.output, res.output
    res = CliRunner().invoke(main, ["card", str(out)])
    assert res.exit_code == 1 and "no stage manifest" in res.output, res.output


def test_card_with_a_kld_measurement(work, tmp_path, llama_toolchain):
    """`glmgguf kld --json` of the GGUF against the F32 conversion of its checkpoint goes on the card as measured
    (in place of the pipeline's kld stage)."""
    from click.testing import CliRunner

    from glmgguf.cli import main
    from glmgguf.gguf.kld import write_heldout_text

    gguf, f32 = work / "gguf-q4_protected" / "q4_protected.gguf", tmp_path / "f32.gguf"
    for args in (["convert", str(work / "kd" / "model"), str(f32), "--recipe", "f32"],
                 ["kld", str(f32), str(gguf), "--text", str(write_heldout_text(tmp_path / "heldout.txt", 40000)),
                  "-c", "128", "--chunks", "8", "-t", "1", "--json", str(tmp_path / "kld.json")],
                 ["card", str(gguf), "--kld", str(tmp_path / "kld.json"), "--out", str(tmp_path / "README.md")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "kld.json").read_text())
    k = doc["results"][0]["kld"]
    card = (tmp_path / "README.md").read_text()
    assert (f"KL divergence against f32.gguf at context {doc['ctx']:,}: mean {k['mean_kld']:.6f} ± "
            f"{k['mean_kld_err']:.6f}, same top token {k['same_top_pct']:.2f}%.") in card
    assert "(`glmgguf kld`)" not in card and "unquantized-f32.gguf" not in card  # the given file, not the stage's


def test_kv_cache_and_fit_of_glm52():
    """GLM-5.2: 78 layers x (512 + 64) + 21 full indexer layers x 128, at 2 bytes: 95,232 bytes a token; a 325 GB
    GGUF (the seeds' q4_protected at 192 experts) on 4 x RTX PRO 6000: (4 x (96 x 0.9 - 2) - 325) GB of cache."""
    from glmgguf.card.files import cache_dims
    from glmgguf.layout import GlmLayout

    cfg = json.loads((Path(__file__).resolve().parent.parent / "examples" / "glm52_config.json").read_text())
    dims = cache_dims(GlmLayout.from_config({**cfg, "max_position_embeddings": 1048576}))
    assert hw.kv_bytes_per_token(dims) == 95232
    assert hw.kv_bytes_per_token(dims, drafting=True) == 95232 + 576 * 2
    rtx = next(s for s in hw.DEVICE_SETS if s.name == "4 x RTX PRO 6000")
    assert hw.largest_context(325 * 10**9, 95232, rtx, dims.max_context) == (4 * (86.4 - 2) - 325) * 10**9 // 95232
    h100 = next(s for s in hw.DEVICE_SETS if s.name == "8 x H100")
    assert hw.largest_context(325 * 10**9, 95232, h100, dims.max_context) == 1048576  # capped at the config's
    assert hw.largest_context(1500 * 10**9, 95232, h100, dims.max_context) == 0  # BF16 weights alone do not fit


def test_base_model_and_license_from_a_hub_download(tmp_path):
    """A source in a Hugging Face cache names its repository; its README's front matter its license."""
    from glmgguf.card.facts import front_matter_value, hub_id

    snap = tmp_path / "hub" / "models--zai-org--GLM-5.2-FP8" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlanguage:\n- en\nlicense: mit\npipeline_tag: text-generation\n---\n\n"
                                    "license: not-this-one\n")
    assert hub_id(snap) == "zai-org/GLM-5.2-FP8" and hub_id(tmp_path) is None
    assert front_matter_value(snap / "README.md", "license") == "mit"
    assert front_matter_value(snap / "README.md", "base_model") is None
    assert front_matter_value(tmp_path / "missing.md", "license") is None
