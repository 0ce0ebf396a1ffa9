"""MTP speculative decoding in llama-server (`--spec-type draft-mtp`): greedy identity, acceptance in eval runs."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from glmgguf.cli import main
from glmgguf.eval.compare import compare_table, summarize
from glmgguf.eval.draft import draft_args, draft_settings, gguf_mtp_layers
from glmgguf.eval.probes import EvalError
from glmgguf.pipeline.plan import PlanError, parse_plan

# ----------------------------------------------------------------------------------------------------------------
# Draft statistics in run files, the comparison table, the pipeline plan and report
# ----------------------------------------------------------------------------------------------------------------


def _run(n: int, drafted: int | None, accepted: int | None, loops: int = 0) -> dict:
    res = [{"id": str(i), "source": "code", "outcome": "loop" if i < loops else "cap", "borderline": False,
            "tokens": 100, "distinct4": 0.5, "draft_n": drafted, "draft_accepted": accepted} for i in range(n)]
    return {"format": "glmgguf-eval-loops/1", "spec": {}, "results": res, "summary": summarize(res)}


def test_acceptance_summary_and_table_column():
    drafted = _run(10, 30, 12, loops=4)
    assert drafted["summary"]["draft"] == {"prompts": 10, "drafted": 300, "accepted": 120, "acceptance": 0.4}
    plain = _run(10, None, None, loops=4)
    assert plain["summary"]["draft"] is None
    table = compare_table([("plain", plain), ("mtp", drafted)])
    head = table.splitlines()[0]
    assert head.startswith("| run | n | loop rate | loop 95% CI | draft acceptance | EOS rate |")
    assert "| mtp | 10 | 40.0% | 16.8-68.7% | 40.0% (120/300) | 0.0% |" in table
    assert "| plain | 10 | 40.0% | 16.8-68.7% | - | 0.0% |" in table
    assert "draft acceptance" not in compare_table([("plain", plain)])  # no column without drafting


def test_draft_settings_and_server_args():
    d = draft_settings(2, 0.5)
    assert d == {"type": "draft-mtp", "n_max": 2, "p_min": 0.5}
    assert draft_args(d) == ["--spec-type", "draft-mtp", "--spec-draft-n-max", "2", "--spec-draft-p-min", "0.5"]
    with pytest.raises(EvalError, match="at least 1"):
        draft_settings(0)
    with pytest.raises(EvalError, match="a probability"):
        draft_settings(3, 1.5)


def _bare_gguf(path: Path, nextn: int | None) -> Path:
    w = gguf.GGUFWriter(str(path), "glm-dsa")
    if nextn is not None:
        w.add_uint32("glm-dsa.nextn_predict_layers", nextn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_draft_mtp_refused_without_mtp_block_or_with_server(tmp_path):
    assert gguf_mtp_layers(_bare_gguf(tmp_path / "mtp.gguf", 1)) == 1
    no_mtp = _bare_gguf(tmp_path / "trunk.gguf", None)
    assert gguf_mtp_layers(no_mtp) == 0
    runner = CliRunner()
    r = runner.invoke(main, ["eval", "loops", "--gguf", str(no_mtp), "--prompts", "fuzz", "--draft-mtp",
                             "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "has no MTP block" in r.output, r.output
    r = runner.invoke(main, ["eval", "loops", "--server", "http://127.0.0.1:9", "--prompts", "fuzz", "--draft-mtp",
                             "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 1 and "use it with --gguf" in r.output, r.output
    assert not (tmp_path / "r.json").exists()


def test_tokens_without_logprobs_are_keyed_by_text():
    """llama-server sends no logprobs for tokens taken from a verified draft: the detector then keys the whole
    output by text pieces, ids seen before included, and still finds the loop."""
    from glmgguf.eval.loops import LoopDetector
    from glmgguf.eval.run import TokenKeys

    keys = TokenKeys(LoopDetector())
    keys.feed({"logprobs": {"content": [{"id": 7, "token": "a"}]}}, "a")
    assert keys.det.tokens == [7] and not keys.by_text
    for i in range(120):
        keys.feed({"logprobs": None}, "bcda"[i % 4])
    assert keys.by_text and keys.det.tokens[:5] == [0, 1, 2, 3, 0]  # "a" re-keyed with the text pieces
    assert keys.det.loop is not None and keys.det.loop.period == 4


PLAN = """\
[pipeline]
workdir = "work"
model = "testbed:tiny"

[[gguf]]
name = "f32"
recipe = "f32"
mtp = "keep"

[eval]
gguf = "f32"
presets = ["greedy"]
draft_mtp = true
draft_max = 2
"""


def test_plan_eval_with_mtp_drafting(tmp_path):
    from glmgguf.pipeline.stages import build_stages

    p = tmp_path / "plan.toml"
    p.write_text(PLAN)
    plan = parse_plan(p)
    stages = {s.name: s for s in build_stages(plan, tmp_path / "model", {}, {"f32": "f32"}, "fuzz")}
    args = stages["eval-greedy"].args
    assert args[args.index("--draft-mtp"):][:5] == ["--draft-mtp", "--draft-max", "2", "--draft-p-min", "0.0"]
    assert "MTP drafting" in stages["eval-greedy"].what
    for edit, line, words in [(('mtp = "keep"', 'mtp = "drop"'), 13, "has mtp = 'drop'"),
                              (("draft_max = 2", "draft_max = 0"), 14, "draft_max must be at least 1"),
                              (("draft_max = 2", "draft_p_min = 2.0"), 14, "draft_p_min is a probability")]:
        p.write_text(PLAN.replace(*edit))
        with pytest.raises(PlanError, match=words) as e:
            parse_plan(p)
        assert f"plan.toml:{line}:" in str(e.value)
    p.write_text(PLAN.replace("draft_mtp = true\n", ""))
    assert "--draft-mtp" not in {s.name: s for s in build_stages(parse_plan(p), tmp_path, {}, {"f32": "f32"},
                                                                 "fuzz")}["eval-greedy"].args


def test_report_gives_acceptance(tmp_path):
    from glmgguf.pipeline.report import draft_lines

    p = tmp_path / "plan.toml"
    p.write_text(PLAN)
    plan = parse_plan(p)
    run = _run(4, 50, 20)
    run["spec"] = {"draft": draft_settings(2)}
    (plan.workdir / "eval-greedy").mkdir(parents=True)
    (plan.workdir / "eval-greedy" / "greedy.json").write_text(json.dumps(run))
    assert draft_lines(plan) == ["", "MTP drafting (greedy, up to 2 per step): 40.0% of 200 drafted tokens "
                                     "accepted (80) over 4 prompts"]


# ----------------------------------------------------------------------------------------------------------------
# The trained tiny testbed's F32 GGUF in the pinned llama-server
# ----------------------------------------------------------------------------------------------------------------

PROMPTS = ["def main():\n    ", "import os\nimport sys\n\n", "class Parser:\n    def __init__(self):\n        self.",
           "    for i, line in enumerate(lines):\n        if "]
# f32 KV caches (trunk and draft): the DSA indexer selects the same keys as transformers (see the parity notes)
BASE_ARGS = ["-c", "2048", "-np", "1", "-t", "1", "-ctk", "f32", "-ctv", "f32", "-ctkd", "f32", "-ctvd", "f32"]
N_PREDICT = 64


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, trained_testbed_dir, llama_toolchain) -> Path:
    out = tmp_path_factory.mktemp("mtp") / "tiny-f32.gguf"
    r = CliRunner().invoke(main, ["convert", str(trained_testbed_dir), str(out), "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    assert gguf_mtp_layers(out) == 1
    return out


def _greedy(gguf_path: Path, args: list[str], log: Path) -> list[dict]:
    from glmgguf.llama import LlamaServer

    out = []
    with LlamaServer(gguf_path, args, log_path=log) as srv:
        for p in PROMPTS:
            ids = srv.request("/tokenize", {"content": p, "add_special": True})["tokens"]
            r = srv.completion(ids, n_predict=N_PREDICT, temperature=0.0, top_k=1, return_tokens=True, n_probs=2,
                               cache_prompt=False)
            out.append({"prompt": ids, "tokens": r["tokens"], "timings": r["timings"],
                        "top2": [[t["logprob"] for t in c["top_logprobs"]] for c in r["completion_probabilities"]]})
    return out


@pytest.mark.slow
def test_greedy_output_identical_with_mtp_drafting(f32_gguf, tmp_path):
    plain = _greedy(f32_gguf, BASE_ARGS, tmp_path / "plain.log")
    drafted = _greedy(f32_gguf, [*BASE_ARGS, *draft_args(draft_settings())], tmp_path / "mtp.log")
    assert "creating MTP draft context" in (tmp_path / "mtp.log").read_text()
    for a, b in zip(plain, drafted, strict=True):
        assert len(a["tokens"]) == N_PREDICT and "draft_n" not in a["timings"]
        if a["tokens"] != b["tokens"]:  # allowed only at a near-tie of the non-drafting run (batched verification)
            at = next(i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=True)) if x != y)
            lp1, lp2 = a["top2"][at]
            assert lp1 - lp2 < 1e-3, (at, lp1, lp2)  # the top-2 logits within 1e-3
    assert sum(a["tokens"] == b["tokens"] for a, b in zip(plain, drafted, strict=True)) >= len(PROMPTS) - 1
    n = sum(b["timings"]["draft_n"] for b in drafted)
    acc = sum(b["timings"]["draft_n_accepted"] for b in drafted)
    assert acc / n == pytest.approx(0.64, abs=0.1), (acc, n)  # measured 164/255; a random MTP head: 0


@pytest.mark.slow
def test_mtp_drafts_accepted_as_transformers_predicts(f32_gguf, trained_testbed_dir, tmp_path):
    """One draft per step: the server's drafted/accepted counts are those the checkpoint's MTP layer gives in
    transformers on the same continuation (a wrong MTP block in the GGUF would not match)."""
    from glmgguf.eval.draft import reference_drafts

    runs = _greedy(f32_gguf, [*BASE_ARGS, *draft_args(draft_settings(n_max=1))], tmp_path / "mtp1.log")
    for r in runs:
        ref = reference_drafts(trained_testbed_dir, r["prompt"], r["tokens"], N_PREDICT)
        assert ref["accepted"] > 0
        assert (r["timings"]["draft_n"], r["timings"]["draft_n_accepted"]) == (ref["drafted"], ref["accepted"])


def _loops(gguf_path: Path, out: Path, *extra: str) -> tuple[dict, str]:
    r = CliRunner().invoke(main, ["eval", "loops", "--gguf", str(gguf_path), "--prompts", "fuzz", "--limit", "4",
                                  "--preset", "greedy", "--safety-cap", "128", "--threads", "1", "--ctx-size", "2048",
                                  *extra, "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text()), r.output


@pytest.mark.slow
def test_eval_loops_reports_draft_acceptance(f32_gguf, tmp_path):
    plain, _ = _loops(f32_gguf, tmp_path / "plain.json")
    doc, output = _loops(f32_gguf, tmp_path / "mtp.json", "--draft-mtp")
    assert doc["spec"]["draft"] == {"type": "draft-mtp", "n_max": 3, "p_min": 0.0} and "draft" not in plain["spec"]
    assert "--spec-type draft-mtp" in (tmp_path / "mtp.json.server.log").read_text().splitlines()[0]
    assert all(res["draft_n"] > 0 and 0 <= res["draft_accepted"] <= res["draft_n"] for res in doc["results"])
    d = doc["summary"]["draft"]
    assert d["drafted"] == sum(res["draft_n"] for res in doc["results"])
    assert d["acceptance"] == pytest.approx(0.83, abs=0.1), d  # measured 315/378 (loops are easy to draft)
    assert "draft acceptance" in output.splitlines()[0] and f"({d['accepted']}/{d['drafted']})" in output
    # no logprobs come with drafted tokens: the detector keys them by text and finds the same loops
    assert {res["token_keys"] for res in doc["results"]} == {"text"}
    assert plain["summary"]["draft"] is None and {res["token_keys"] for res in plain["results"]} == {"id"}
    assert plain["summary"]["loops"] >= 2
    for a, b in zip(plain["results"], doc["results"], strict=True):
        assert a["outcome"] == b["outcome"] and abs(a["tokens"] - b["tokens"]) <= 2, (a, b)
