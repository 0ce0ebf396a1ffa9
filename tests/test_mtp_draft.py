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
