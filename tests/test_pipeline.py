"""`glmgguf pipeline`: plan checking with line numbers, estimates against real outputs, skip/redo, kill and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from glmgguf.cli import main
from glmgguf.pipeline.plan import PlanError, parse_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SMALL_PLAN = """\
[pipeline]
workdir = "work"
model = "testbed:tiny"
threads = 1

[data]
calibration = ["stdlib:train"]
kd = ["stdlib:train"]
seq_len = 64
calibration_samples = 8
kd_samples = 16
batch_size = 4

[reap]
keep = 12
dtype = "f32"

[kd]
steps = 6
lr = 1e-2
top_k = 32
batch_size = 4
save_every = 2

[[gguf]]
name = "q8"
recipe = "q8_0"

[[gguf]]
name = "q3"
recipe = "q3_protected"
split_max_size = "5M"

[nvfp4]
format = "compressed-tensors"
"""


def _write(tmp_path: Path, text: str, name: str = "plan.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(tmp_path: Path, text: str) -> str:
    from glmgguf.pipeline.inputs import check_inputs, model_config

    with pytest.raises(PlanError) as e:
        plan = parse_plan(_write(tmp_path, text))
        check_inputs(plan, model_config(plan))
    return str(e.value)


@pytest.mark.parametrize("edit, where, words", [
    (("threads = 1", "threads = 1\ncolour = 3"), 5, "unknown key 'colour' in [pipeline]"),
    (("[reap]", "[prune]"), 14, "unknown section [prune]"),
    (("keep = 12", "keep = 17"), 15, "keep = 17 is more than the model's 16 routed experts"),
    (("keep = 12", "keep = 2"), 15, "fewer than the 4 experts each token is routed to"),
    (("keep = 12", "keep = \"twelve\""), 15, "keep must be an integer"),
    (("recipe = \"q8_0\"", "recipe = \"q5_magic\""), 27, "unknown recipe 'q5_magic'"),
    (("kd = [\"stdlib:train\"]", "kd = [\"missing.jsonl\"]"), 8, "missing.jsonl not found"),
    (("dtype = \"f32\"", "dtype = \"fp8\""), 16, "is not one of bf16, f16, f32"),
    (("[reap]\nkeep = 12", "[reap]\nkeep = 12\nratio = 0.5"), 14, "exactly one of keep or ratio"),
    (("dtype = \"f32\"", "dtype = \"f32\"\nspill_threshold = \"lots\""), 17, "invalid size 'lots'"),
    (("dtype = \"f32\"", "dtype = \"f32\"\ndevice = \"gpu\""), 17,
     "[reap] device: 'gpu' is not a device: use cpu, cuda, cuda:N or auto"),
])
def test_bad_plans_name_the_line(tmp_path, edit, where, words):
    msg = _error(tmp_path, SMALL_PLAN.replace(*edit))
    assert f"plan.toml:{where}:" in msg and words in msg, msg


def test_plan_cross_checks(tmp_path):
    no_reap = SMALL_PLAN.split("[reap]")[0] + "[kd]\nsteps = 2\n"
    assert "needs a [reap] section" in _error(tmp_path, no_reap)
    bad_eval = SMALL_PLAN + '\n[eval]\ngguf = "q4"\n'
    assert "names no [[gguf]] output (outputs: q8, q3)" in _error(tmp_path, bad_eval)
    single = SMALL_PLAN.split("[[gguf]]")[0] + '[gguf]\nname = "q8"\nrecipe = "q8_0"\n'
    assert "plan.toml:25: GGUF outputs are [[gguf]] tables (double brackets)" in _error(tmp_path, single)
    split_eval = SMALL_PLAN + '\n[eval]\ngguf = "q3"\n'
    assert "is a split output" in _error(tmp_path, split_eval)
    bad_preset = SMALL_PLAN + '\n[eval]\ngguf = "q8"\npresets = ["wild"]\n'
    assert "unknown: wild" in _error(tmp_path, bad_preset)
    unpruned = (SMALL_PLAN.split("[reap]")[0] + '[[gguf]]\nname = "q8"\nrecipe = "q8_0"\n\n'
                '[eval]\ngguf = "q8"\nbaseline = true\n')
    assert "plan.toml:20: [eval] baseline evaluates the unpruned source model" in _error(tmp_path, unpruned)
    # nothing was written for a refused plan
    assert not (tmp_path / "work").exists()


KLD = '\n[kld]\ntext = "stdlib:heldout"\nreference = "f32"\nctx = 128\nchunks = 8\n'


@pytest.mark.parametrize("extra, edit, where, words", [
    (KLD, ("ctx = 128", "ctx = 4"), 40, "[kld] ctx must be at least 8"),
    (KLD, ("chunks = 8", "chunks = 0"), 41, "[kld] chunks must be at least 1"),
    (KLD, ('reference = "f32"', 'reference = "q4_0"'), 39, "reference = 'q4_0' is not one of bf16, f32"),
    (KLD, ('text = "stdlib:heldout"', 'text = "missing.txt"'), 38, "[kld] text file"),
    (KLD, ('text = "stdlib:heldout"', 'text = ["stdlib:heldout"]'), 38, "[kld] text must be a string"),
    ('\n[eval]\ngguf = "q8"\nbaseline = "yes"\n', ("", ""), 39, "[eval] baseline must be true or false"),
])
def test_bad_kld_and_baseline_values_name_the_line(tmp_path, extra, edit, where, words):
    msg = _error(tmp_path, SMALL_PLAN + extra.replace(*edit))
    assert f"plan.toml:{where}:" in msg and words in msg, msg


def test_kld_needs_a_gguf_output(tmp_path):
    msg = _error(tmp_path, SMALL_PLAN.split("[[gguf]]")[0] + KLD)
    assert "plan.toml:26: [kld] scores the [[gguf]] outputs: the plan has none" in msg, msg
    mtp_only = SMALL_PLAN.split("[[gguf]]")[0] + '[[gguf]]\nname = "mtp"\nrecipe = "q8_0"\nmtp = "only"\n' + KLD
    assert "plan.toml:30: [kld] scores the [[gguf]] outputs: the plan has none (other than MTP-only ones)" in \
        _error(tmp_path, mtp_only)


def test_dry_run_glm52_kld_and_unpruned_baseline(tmp_path):
    """GLM-5.2 with [kld] (BF16 reference) and [eval] baseline: the reference is the pruned model at 16 bits with
    no MTP block, the baseline the unpruned model at q4_protected, the logits llama-perplexity's layout."""
    from glmgguf.gguf.recipe import load_recipe
    from glmgguf.layout import GlmLayout
    from glmgguf.pipeline.estimate import gguf_bytes, pruned_layout
    from glmgguf.units import format_size

    text = (EXAMPLES / "glm52_reap168.toml").read_text().replace("safety_cap = 32768", "safety_cap = 32768\n"
                                                                  "baseline = true")
    plan = _write(tmp_path, text + '\n[kld]\ntext = "heldout.txt"\nchunks = 64\n')
    res = CliRunner().invoke(main, ["pipeline", str(plan), "--dry-run", "--model-config",
                                    str(EXAMPLES / "glm52_config.json")])
    assert res.exit_code == 0, res.output
    rows = {line.split("|")[1].strip(): line for line in res.output.splitlines() if line.startswith("| ")}
    cfg = json.loads((EXAMPLES / "glm52_config.json").read_text())
    layout = GlmLayout.from_config(cfg)
    pruned = pruned_layout(layout, 168, None)
    trunk = sum(2 * math.prod(shape) for name, shape in pruned.expected_hf_tensors(mtp_indexer=True).items()
                if not name.startswith(f"model.layers.{cfg['num_hidden_layers']}."))  # the MTP block is dropped
    ref = gguf_bytes(pruned, load_recipe("bf16"), mtp="drop")
    assert abs(ref - trunk) / ref < 0.001, (ref, trunk)  # norms, 1-D tensors, router and indexer.proj stay F32
    assert f"| kld-reference/unquantized-bf16.gguf | {format_size(ref)} |" in rows["kld-reference"]
    logits = 20 + 4 * 64 * 256 + 64 * 127 * (cfg["vocab_size"] + (cfg["vocab_size"] % 2) + 4) * 2
    assert f"| kld/kld.json | {format_size(logits)} | {format_size(ref)} |" in rows["kld"]
    base = gguf_bytes(layout, load_recipe("q4_protected"))
    assert base > gguf_bytes(pruned, load_recipe("q4_protected"))
    assert f"| baseline-gguf/q4_protected.gguf | {format_size(base)} |" in rows["baseline-gguf"]
    assert {"eval-baseline-raw", "eval-baseline-guarded"} <= set(rows)
    assert "--recipe bf16 --mtp drop" in res.output and "--chunks 64" in res.output


def test_dry_run_glm52_example():
    """The worked example: GLM-5.2 pruned to 168 experts; sizes follow from the config alone."""
    res = CliRunner().invoke(main, ["pipeline", str(EXAMPLES / "glm52_reap168.toml"), "--dry-run",
                                    "--model-config", str(EXAMPLES / "glm52_config.json")])
    assert res.exit_code == 0, res.output
    rows = {line.split("|")[1].strip(): line for line in res.output.splitlines() if line.startswith("| ")}
    assert "1.5 TB of BF16 weights" in res.output
    assert "| 1.0 TB |" in rows["prune"]  # 168/256 of the experts + everything else
    assert "streaming: one layer resident" in rows["observe"]
    assert {"teacher", "kd", "gguf-q4_protected", "gguf-q3_protected", "nvfp4", "eval-raw", "eval-report"} <= set(rows)
    # [launch] with 8 ranks and cpu_offload: KD's memory is per GPU (FSDP2 gathers, root unit, activations, gates),
    # its time per GPU kind; the student's 1.0 TB sits in host memory
    assert "| 39.3 GB | per GPU: FSDP2 over 8 ranks (below) |" in rows["kd"]
    assert "host memory 1002 GB in all" in res.output
    assert rows["H100"] == "| H100 | 80 GB | 39 GB | yes | 15.0 | 4.2 h |"
    assert rows["B200"] == "| B200 | 192 GB | 39 GB | yes | 7.5 | 2.1 h |"


def test_fsdp_estimate_without_offload():
    """Without offload each GPU also holds its 1/8 shard of the 1.0 TB student: it fits a B200, not an H100."""
    import json

    from glmgguf.layout import GlmLayout
    from glmgguf.pipeline.estimate import pruned_layout
    from glmgguf.pipeline.fsdp_estimate import fsdp_kd_estimate, fsdp_kd_parts

    lay = pruned_layout(GlmLayout.from_config(json.loads((EXAMPLES / "glm52_config.json").read_text())), 168, None)
    parts = fsdp_kd_parts(lay, 8, 8, 2048)
    assert round(parts["shard"] / 1e9, 1) == 125.2  # 1001.7 GB / 8
    est = {e.gpu: e for e in fsdp_kd_estimate(lay, 8, 8, 2048, cpu_offload=False)}
    assert est["B200"].fits and not est["H200"].fits and not est["H100"].fits
    assert round(est["H100"].per_gpu_bytes / 1e9) == 164 and round(est["H100"].seconds_per_step, 1) == 5.8


def test_gguf_estimate_matches_conversion(trained_testbed_dir, tmp_path):
    """The dry run's GGUF size is the real tensor bytes of the converted file (metadata aside)."""
    import gguf as gguf_py

    from glmgguf.checkpoint import open_checkpoint
    from glmgguf.gguf.convert import convert
    from glmgguf.gguf.recipe import load_recipe
    from glmgguf.layout import GlmLayout
    from glmgguf.pipeline.estimate import gguf_bytes

    recipe = load_recipe("q4_protected")
    out = tmp_path / "q4.gguf"
    convert(trained_testbed_dir, out, recipe.chooser(open_checkpoint(trained_testbed_dir).layout.layers), force=True)
    real = sum(int(t.n_bytes) for t in gguf_py.GGUFReader(out).tensors)
    assert gguf_bytes(GlmLayout.from_dir(trained_testbed_dir), recipe) == real


def _pipeline(plan: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmgguf", "pipeline", str(plan), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _content(path: Path, work: Path) -> object:
    """A file's content, without the wall-clock timings some outputs record (`seconds` in stats metadata) and
    with the workdir's own path taken out of the paths they record."""
    if path.suffix == ".json":
        return _untimed(json.loads(path.read_text().replace(str(work), "WORKDIR")))
    if path.suffix == ".safetensors":
        import torch
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = {k: v for k, v in (f.metadata() or {}).items() if "seconds" not in v}
            return meta, {k: f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()}
    return path.read_bytes()


def _untimed(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k != "seconds"}
    return [_untimed(v) for v in obj] if isinstance(obj, list) else obj


def _outputs(work: Path) -> dict[str, object]:
    """Every output file's content (logs, manifests and the KD log with its timings aside)."""
    skip = {"log.txt", "manifest.json", "kd_train_log.json", "kd_loss.png"}
    return {str(p.relative_to(work)): _content(p, work) for p in sorted(work.rglob("*"))
            if p.is_file() and p.name not in skip and "work" not in p.relative_to(work).parts[1:]
            and p.parts[-2] != "data" and not p.name.startswith(".")}


@pytest.mark.slow
def test_killed_pipeline_resumes_to_the_same_outputs(trained_testbed_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = _write(tmp_path, SMALL_PLAN.replace('workdir = "work"', 'workdir = "clean"'), "clean.toml")
    proc = _pipeline(clean, env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out.decode()[-3000:]
    reference = _outputs(tmp_path / "clean")
    assert any(k.endswith("q8.gguf") for k in reference) and any("kd/model" in k for k in reference)
    assert any(k.endswith("q3-00002-of-00002.gguf") for k in reference)  # a split output: 2 files of <= 5 MB
    assert "nvfp4/model/model.safetensors" in reference

    plan = _write(tmp_path, SMALL_PLAN)
    work = tmp_path / "work"
    for stage, marker in (("teacher", "started.json"), ("kd", "work")):  # mid-teacher, then mid-training
        proc = _pipeline(plan, env)
        deadline = time.time() + 600
        while not (work / stage / marker).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        if stage == "kd":  # let it write a periodic checkpoint first, so the restart resumes from it
            while (not [c for c in (work / "kd" / "work").glob("checkpoint-*") if not c.name.endswith(".partial")]
                   and time.time() < deadline and proc.poll() is None):
                time.sleep(0.2)
        assert proc.poll() is None, (f"pipeline ended before stage {stage} could be interrupted:\n"
                                     + proc.communicate()[0].decode()[-3000:])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (work / stage / "manifest.json").exists()
    proc = _pipeline(plan, env)
    out, _ = proc.communicate(timeout=900)
    log = out.decode()
    assert proc.returncode == 0, log[-3000:]
    assert "[observe] done earlier" in log and "[kd] interrupted earlier" in log, log
    assert _outputs(work) == reference

    # a second run skips everything; a changed recipe redoes only that GGUF
    res = subprocess.run([sys.executable, "-m", "glmgguf", "pipeline", str(plan), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "0 stage(s) ran" in res.stdout, res.stdout + res.stderr
    plan.write_text(SMALL_PLAN.replace('recipe = "q8_0"', 'recipe = "q4_protected"'))
    res = subprocess.run([sys.executable, "-m", "glmgguf", "pipeline", str(plan), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "1 stage(s) ran" in res.stdout, res.stdout + res.stderr
    manifest = json.loads((work / "gguf-q8" / "manifest.json").read_text())
    assert "q4_protected" in manifest["command"]


@pytest.mark.slow
def test_demo_plan_on_the_fp8_release_layout(trained_testbed_dir, tmp_path):
    """The shipped demo plan (observe, prune, teacher, KD, LoRA-KD, q4_protected GGUF, evaluations in llama-server)
    with the testbed stored as the block-FP8 release: everything runs, the pruned and distilled models stay FP8,
    and the LoRA adapter, which cannot be merged into FP8 weights, is served as a llama.cpp adapter GGUF: the
    evaluation applies it, the Router-KD variant is the same GGUF without it, the card says how to serve it."""
    from glmgguf.io import CheckpointReader

    shipped = (Path(__file__).resolve().parent.parent / "glmgguf" / "pipeline" / "plans" / "testbed.toml").read_text()
    text = (shipped.replace('model = "testbed:tiny"', 'model = "testbed:tiny-fp8"')
            .replace('workdir = "demo-out/pipeline"', 'workdir = "work"')
            .replace("steps = 100", "steps = 10").replace("kd_samples = 256", "kd_samples = 32")
            .replace("limit = 16", "limit = 4").replace("safety_cap = 256", "safety_cap = 64")
            .replace('serve = "merged"', 'serve = "adapter"').replace('["attn", "shared"]', '["attn_out", "shared"]'))
    assert 'model = "testbed:tiny-fp8"' in text and "steps = 10" in text and 'serve = "adapter"' in text
    proc = _pipeline(_write(tmp_path, text), {**os.environ, "OMP_NUM_THREADS": "1"})
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out.decode()[-3000:]
    work = tmp_path / "work"
    for model in ("prune/model", "kd/model"):
        reader = CheckpointReader(work / model)
        assert reader.fp8 is not None and reader.scales, model
    assert (work / "gguf-q4_protected" / "q4_protected.gguf").stat().st_size > 0
    assert (work / "eval-report" / "report.md").read_text().count("|") > 10
    assert json.loads((work / "eval-greedy" / "greedy.json").read_text())["spec"]["lora"] == "adapter.gguf"
    assert "lora" not in json.loads((work / "eval-router-kd-greedy" / "router-kd-greedy.json").read_text())["spec"]
    report = (work / "variants-report" / "report.md").read_text()
    assert all(f"| {v}-greedy | 4 |" in report for v in ("unpruned", "pruned", "router-kd", "lora")), report
    kls = {v: json.loads((work / f"heldout-kl-{v}" / "kl.json").read_text())["kl"] for v in ("router-kd", "lora")}
    assert kls["lora"] < kls["router-kd"], kls  # the adapter, applied by PEFT, moves the held-out KL down
    card = (work / "gguf-q4_protected" / "README.md").read_text()
    assert "--lora adapter.gguf" in card and "served as the llama.cpp adapter `adapter.gguf`" in card


STREAM_PLAN = """\
[pipeline]
workdir = "work"
model = "testbed:tiny"
threads = 1

[data]
calibration = ["calib.jsonl"]
kd = ["stdlib:train"]
seq_len = 64
calibration_samples = 8
kd_samples = 8
batch_size = 4

[reap]
keep = 12
dtype = "f32"
streaming = true
spill_threshold = "0"

[kd]
steps = 2
top_k = 32
batch_size = 4
save_every = 2
teacher_streaming = true
teacher_spill_threshold = "0"
"""

# Loaded by every Python process of a pipeline whose PYTHONPATH starts with its folder: the streaming runner whose
# work directory is $STALL_WORK_DIR sleeps right after its resume manifest records a finished layer, so the test
# can kill the run at a known point (mid-stage, some layers done) instead of racing a fast tiny model.
STALL = """\
import os

if os.environ.get("STALL_WORK_DIR"):
    import time

    from glmgguf import workdir

    _finish = workdir.RunRecord.finish_layer

    def _stalled(self, index, state, done, acts, topk):
        _finish(self, index, state, done, acts, topk)
        if done and str(self.work.path) == os.environ["STALL_WORK_DIR"]:
            time.sleep(600)

    workdir.RunRecord.finish_layer = _stalled
"""


def _calibration(path: Path, split: str) -> Path:
    from glmgguf.testbed import stdlib_corpus

    path.write_text("".join(json.dumps({"text": t[:4000]}) + "\n" for t in stdlib_corpus(split)[:16]))
    return path


def _run_until_stalled(plan: Path, env: dict, work_dir: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start the pipeline and wait until the streaming pass writing into `work_dir` has finished a layer."""
    proc = _pipeline(plan, {**env, "STALL_WORK_DIR": str(work_dir)})
    manifest, deadline = work_dir / "manifest.json", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = json.loads(manifest.read_text())["done"] if manifest.is_file() else []
        if done:
            return proc, done
        time.sleep(0.2)
    raise AssertionError("the streaming pass never stalled:\n" + proc.communicate()[0].decode()[-3000:])


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(plan: Path, env: dict) -> str:
    res = subprocess.run([sys.executable, "-m", "glmgguf", "pipeline", str(plan), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout


def _stage_outputs(work: Path) -> dict[str, object]:
    """Statistics, pruned model, teacher cache tensors and KD student (records of how they were run aside)."""
    return {k: v for k, v in _outputs(work).items() if not k.endswith(("manifest.json", "stats.json"))}


@pytest.mark.slow
def test_streaming_stages_resume_from_their_last_finished_layer(trained_testbed_dir, tmp_path):
    """observe and teacher killed (SIGKILL, whole process group) after some layers: the re-run skips those layers
    (recorded in their outputs and log) and ends with the uninterrupted run's outputs; a second pipeline on a
    workdir in use is refused; a new calibration file redoes observe and everything downstream of it."""
    stall = tmp_path / "stall"
    stall.mkdir()
    (stall / "sitecustomize.py").write_text(STALL)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(stall), os.environ.get("PYTHONPATH")]))}
    _calibration(tmp_path / "calib.jsonl", "train")
    clean = _write(tmp_path, STREAM_PLAN.replace('workdir = "work"', 'workdir = "clean"'), "clean.toml")
    _finish(clean, env)
    reference = _stage_outputs(tmp_path / "clean")
    assert "observe/stats.safetensors" in reference and any(k.startswith("teacher/cache/") for k in reference)

    plan, work = _write(tmp_path, STREAM_PLAN), tmp_path / "work"
    proc, observed = _run_until_stalled(plan, env, work / "observe" / "work")
    second = subprocess.run([sys.executable, "-m", "glmgguf", "pipeline", str(plan), "--quiet"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 1 and f"another pipeline run is using {work}" in second.stdout + second.stderr
    _kill(proc)
    proc, taught = _run_until_stalled(plan, env, work / "teacher" / "work")  # observe resumes, then teacher stalls
    _kill(proc)
    assert (work / "observe" / "manifest.json").exists()  # observe finished in the second run
    assert not (work / "teacher" / "manifest.json").exists()
    log = _finish(plan, env)
    assert "[teacher] interrupted earlier" in log, log

    stats_meta = json.loads(_safetensors_meta(work / "observe" / "stats.safetensors")["meta"])
    assert stats_meta["layers_resumed"] == observed, stats_meta
    assert f"resumed after layers {observed}" in (work / "observe" / "log.txt").read_text()
    cache = json.loads((work / "teacher" / "cache" / "manifest.json").read_text())
    assert cache["layers_resumed"] == taught, cache
    assert f"resumed after layers {taught}" in (work / "teacher" / "log.txt").read_text()
    assert _stage_outputs(work) == reference

    # the same path with new content: observe and everything downstream of it run again, the teacher does not
    _calibration(tmp_path / "calib.jsonl", "heldout")
    log = _finish(plan, env)
    assert "3 stage(s) ran" in log and "[teacher] done earlier" in log, log
    for stage in ("observe", "prune", "kd"):
        assert f"[{stage}] settings or inputs changed" in log, log
    assert _outputs(work)["observe/stats.safetensors"] != reference["observe/stats.safetensors"]


def _safetensors_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


LORA = '\n[lora]\nsteps = 4\nrank = 4\n'
EVAL = '\n[eval]\ngguf = "q8"\npresets = ["greedy", "guarded"]\nbaseline = true\nvariants = true\n'


@pytest.mark.parametrize("text, words", [
    (SMALL_PLAN.split("[kd]")[0] + LORA, "plan.toml:19: [lora] trains adapters after Router-KD"),
    (SMALL_PLAN + LORA + 'targets = ["attn", "experts"]\n', "plan.toml:40: [lora] targets: routed experts"),
    (SMALL_PLAN + LORA + 'targets = ["attn", "mlp"]\n', "plan.toml:40: [lora] targets: 'mlp' not among attn"),
    (SMALL_PLAN + LORA + 'serve = "adapter"\n',
     "plan.toml:37: [lora] serve = \"adapter\": llama.cpp applies no LoRA to attn (q_a/q_b/kv_a/kv_b)"),
    (SMALL_PLAN + LORA + 'serve = "gguf"\n', "serve = 'gguf' is not one of merged, adapter"),
    (SMALL_PLAN + LORA.replace("rank = 4", "rank = 0"), "plan.toml:39: [lora] rank must be at least 1"),
    (SMALL_PLAN + LORA + "batch_size = 3\n\n[launch]\nnproc_per_node = 2\n",
     "plan.toml:40: [lora] batch_size 3 is not divisible by the 2 ranks of [launch]"),
    (SMALL_PLAN.split("[kd]")[0] + '[[gguf]]\nname = "q8"\nrecipe = "q8_0"\n' + EVAL,
     "[eval] variants evaluates the pruned and Router-KD checkpoints"),
])
def test_bad_lora_and_variants_plans(tmp_path, text, words):
    msg = _error(tmp_path, text)
    assert words in msg, msg


def _stages(tmp_path: Path, text: str) -> dict:
    from glmgguf.pipeline.run import plan_stages

    _, stages = plan_stages(parse_plan(_write(tmp_path, text)))
    return {s.name: s for s in stages}


def test_lora_stages_merged_and_as_adapter(tmp_path):
    """Merged: every later stage reads lora/out/model; the variants are the pruned and Router-KD checkpoints as
    GGUF. As an adapter: the GGUFs are Router-KD's, the evaluation applies the adapter GGUF, and the Router-KD
    variant is the same GGUF run without it."""
    heldout = SMALL_PLAN.replace('kd = ["stdlib:train"]', 'kd = ["stdlib:train"]\nheldout = ["stdlib:heldout"]')
    s = _stages(tmp_path, heldout + LORA + EVAL)
    work = tmp_path / "work"
    assert s["lora"].args[2] == str(work / "kd" / "model") and "--merge" in s["lora"].args
    assert s["gguf-q8"].args[1] == str(work / "lora" / "out" / "model") and s["gguf-q8"].after == ["lora"]
    assert s["variant-pruned-gguf"].args[1] == str(work / "prune" / "model")
    assert s["variant-router-kd-gguf"].args[1] == str(work / "kd" / "model")
    assert s["heldout-kl-lora"].args[2] == str(work / "lora" / "out" / "model")
    report = s["variants-report"].args
    labels = [a.split("=")[0] for a in report if "=" in a]
    assert labels[:4] == ["unpruned-greedy", "pruned-greedy", "router-kd-greedy", "lora-greedy"], labels
    assert labels[-3:] == ["pruned", "router-kd", "lora"]
    assert "nvfp4" in s and s["nvfp4"].args[2] == str(work / "lora" / "out" / "model")

    a = _stages(tmp_path, heldout + LORA + 'serve = "adapter"\ntargets = ["attn_out", "shared"]\n' + EVAL)
    assert "--merge" not in a["lora"].args and a["gguf-q8"].args[1] == str(work / "kd" / "model")
    adapter = str(work / "lora-gguf" / "adapter.gguf")
    assert a["lora-gguf"].output == Path(adapter) and "--base" in a["lora-gguf"].args
    assert a["eval-greedy"].args[a["eval-greedy"].args.index("--lora") + 1] == adapter
    assert "lora-gguf" in a["eval-greedy"].after
    assert "variant-router-kd-gguf" not in a and "--lora" not in a["eval-router-kd-greedy"].args
    assert a["eval-router-kd-greedy"].args[a["eval-router-kd-greedy"].args.index("--gguf") + 1] == \
        str(work / "gguf-q8" / "q8.gguf")
    kl = a["heldout-kl-lora"].args
    assert kl[2] == str(work / "kd" / "model") and kl[kl.index("--adapter") + 1] == str(work / "lora" / "out" /
                                                                                          "adapter")
    launched = _stages(tmp_path, heldout + LORA + "\n[launch]\nnproc_per_node = 2\n")["lora"]
    assert launched.launcher[:3] == ["--standalone", "--nproc-per-node", "2"] and "--fsdp" in launched.args
