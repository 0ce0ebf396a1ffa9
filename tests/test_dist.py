"""torchrun: data-parallel observe and teacher passes (2 gloo ranks on CPU) equal one process; bad launches."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from glmgguf.cli import main
from glmgguf.layout import GlmLayout
from glmgguf.reap.stats import FIELDS, ReapStats

SEQ_LEN = 48
TEXT = ["--seq-len", str(SEQ_LEN), "--num-samples", "6", "--batch-size", "2", "--dtype", "f32"]  # 3 batches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from glmgguf.testbed import stdlib_corpus

    p = tmp_path_factory.mktemp("dist") / "cal.jsonl"
    p.write_text("".join(json.dumps({"text": d[:3000]}) + "\n" for d in stdlib_corpus("train")[:20]))
    return p


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(_free_port()), "-m", "glmgguf", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(args: list[str]) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output


def _shards(d: Path) -> dict[str, tuple[dict, dict[str, str]]]:
    """Per shard file: its metadata and a digest of each tensor's bytes (safetensors orders the metadata keys
    differently in every process, so the files' own bytes are not compared)."""
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out[p.name] = (f.metadata(), {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest()
                                          for k in f.keys()})  # noqa: SIM118
    return out


def test_observe_two_ranks_equal_one_process(trained_testbed_dir, calib, tmp_path):
    """Counts exact, sums and maxima within 1e-5 (measured: identical to ~1e-9 relative, the reduction order);
    a rank resumes its own interrupted run from its own work directory."""
    from glmgguf.reap.data import load_calibration, load_tokenizer
    from glmgguf.reap.observe import observe_streaming
    from glmgguf.runner import RunInterrupted, chunk_sequences

    common = ["reap", "observe", str(trained_testbed_dir), "--data", str(calib), *TEXT, "--streaming",
              "--spill-threshold", "0"]
    _one_process([*common, "--out", str(tmp_path / "one.safetensors")])
    # rank 0 of 2 (batches 0 and 1) was interrupted after layer 2 in its work directory
    seqs = load_calibration([calib], load_tokenizer(trained_testbed_dir), SEQ_LEN, num_samples=6).sequences
    rank0 = tmp_path / "two.safetensors.work" / "rank-00000-of-00002"
    with pytest.raises(RunInterrupted):
        observe_streaming(trained_testbed_dir, chunk_sequences(seqs, 2)[:2], dtype=torch.float32, work_dir=rank0,
                          spill_bytes=0, stop_after_layer=2)
    r = _torchrun([*common, "--out", str(tmp_path / "two.safetensors")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(2 ranks, gloo)" in r.stdout and "resumed after layers [0, 1, 2]" in r.stdout
    assert not (tmp_path / "two.safetensors.work").exists()
    one, two = ReapStats.load(tmp_path / "one.safetensors"), ReapStats.load(tmp_path / "two.safetensors")
    assert two.meta["ranks"] == 2 and two.meta["tokens"] == one.meta["tokens"] == 6 * SEQ_LEN
    assert one.tokens == two.tokens and sorted(one.layers) == [1, 2, 3, 4]
    for L, a in one.layers.items():
        for k in FIELDS:
            if k == "count":
                assert torch.equal(a[k], two.layers[L][k]), (L, k)
            else:
                torch.testing.assert_close(two.layers[L][k], a[k], rtol=1e-5, atol=0)
        assert int(a["count"].sum()) == one.tokens[L] * 4  # top-4 routing: every token counted 4 times


def test_teacher_two_ranks_equal_one_process(trained_testbed_dir, calib, tmp_path):
    """The cache shards hold the bytes one process writes; the manifests differ in the run's time only."""
    from glmgguf.kd.teacher import TeacherCache

    common = ["kd", "teacher", str(trained_testbed_dir), "--data", str(calib), *TEXT, "--top-k", "16",
              "--shard-size", "15K", "--streaming", "--spill-threshold", "0"]
    _one_process([*common, "--out", str(tmp_path / "one")])
    r = _torchrun([*common, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = TeacherCache(tmp_path / "one"), TeacherCache(tmp_path / "two")
    # shards of 3 rows; rank 0 computed rows 0-3, rank 1 rows 4-5: the second shard holds rows of both
    assert [s["count"] for s in two.manifest["shards"]] == [3, 3] and len(two) == len(one) == 6
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two")
    diff = {k for k in {*one.manifest, *two.manifest} if one.manifest.get(k) != two.manifest.get(k)}
    assert diff == {"seconds", "ranks"} and two.manifest["ranks"] == 2


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def test_bad_launches(trained_testbed_dir, tiny_testbed_dir, calib, tmp_path, monkeypatch):
    """One clear error each: ranks that see different model files, fewer batches than ranks, no rendezvous."""
    text = ["--data", str(calib), *TEXT, "--streaming"]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "glmgguf", "reap", "observe", str(model), *text, "--out",
                               str(tmp_path / f"s{rank}.safetensors")], env=_rank_env(rank, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, model in enumerate((trained_testbed_dir, tiny_testbed_dir))]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 1 and "Error: ranks see different model files: rank(s) 1 differ" in out, out
        assert "Traceback" not in out
    r = _torchrun(["reap", "observe", str(trained_testbed_dir), "--data", str(calib), "--seq-len", "48",
                   "--num-samples", "2", "--batch-size", "2", "--out", str(tmp_path / "x.safetensors")])
    assert r.returncode != 0 and "Error: 2 ranks but only 1 batches of text (--batch-size)" in r.stdout + r.stderr
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    res = CliRunner().invoke(main, ["reap", "observe", str(trained_testbed_dir), *text, "--out",
                                    str(tmp_path / "y.safetensors")])
    assert res.exit_code == 1 and "MASTER_ADDR is not: no rendezvous to join" in res.output


# ---------------------------------------------------------------------------------------------------------------
# Router-KD with FSDP2
# ---------------------------------------------------------------------------------------------------------------

KD = ["--steps", "6", "--batch-size", "2", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def kd_inputs(trained_testbed_dir, calib, tmp_path_factory) -> tuple[Path, Path]:
    """(student REAP-pruned to 8 of 16 experts, teacher cache of 6 x 48 tokens)."""
    from glmgguf.kd.teacher import build_teacher_cache
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.data import load_calibration, load_tokenizer
    from glmgguf.reap.observe import observe
    from glmgguf.reap.prune import plan_prune, prune_checkpoint
    from glmgguf.runner import chunk_sequences

    d = tmp_path_factory.mktemp("kd")
    seqs = load_calibration([calib], load_tokenizer(trained_testbed_dir), SEQ_LEN, num_samples=6).sequences
    stats = observe(trained_testbed_dir, chunk_sequences(seqs, 2), streaming=False, dtype=torch.float32)
    prune_checkpoint(trained_testbed_dir, plan_prune(GlmLayout.from_dir(trained_testbed_dir), stats, keep=8),
                     d / "student", stats=stats)
    build_teacher_cache(trained_testbed_dir, seqs, d / "cache", top_k=32, dtype=torch.float32)
    return d / "student", d / "cache"


def _gates(model: Path) -> dict[str, torch.Tensor]:
    from glmgguf.io import CheckpointReader

    r = CheckpointReader(model)
    return {n: r.get(n).float() for n in r.tensors if n.endswith("mlp.gate.weight")}


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in json.loads((out / "kd_train_log.json").read_text())["steps"]]


def _assert_same_training(a: Path, b: Path) -> None:
    """Per-step losses within 1e-5 (measured: 3e-7, float32 sums in another order); the written BF16 gates equal
    but for a rare rounding step (measured: 1 of 2048 elements of one gate, one BF16 step apart)."""
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-5)
    ga, gb = _gates(a), _gates(b)
    assert sorted(ga) == sorted(gb) and len(ga) == 4
    for n in ga:
        diff = (gb[n] - ga[n]).abs()
        assert bool((diff <= ga[n].abs() * 2**-7).all()), n  # at most one BF16 step (8 significant bits)
        assert float((diff > 0).double().mean()) < 0.01, n


def test_fsdp_kd_equals_one_process_and_resumes_on_one_rank(kd_inputs, tmp_path):
    """2 ranks on the same global batch train the gates one process trains; a 2-rank run killed (SIGKILL) after a
    checkpoint and resumed on 1 rank ends where the uninterrupted run ends."""
    from glmgguf.kd.write import diff_checkpoints

    student, cache = kd_inputs
    common = ["kd", "train", str(student), "--teacher-cache", str(cache), *KD]
    _one_process([*common, "--out", str(tmp_path / "one")])
    r = _torchrun([*common, "--out", str(tmp_path / "two"), "--fsdp"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert diff_checkpoints(student, tmp_path / "two") == sorted(_gates(student))  # only the gates change
    _assert_same_training(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "one" / "kd_train_log.json").read_text())["steps"][-1]["loss"] < _losses(
        tmp_path / "one")[0]  # it trains: measured 0.232 -> 0.171
    out = tmp_path / "killed"
    _kill_after_checkpoint([*common, "--out", str(out)])
    r = _torchrun([*common, "--out", str(out), "--fsdp", "--resume"], n=1)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = json.loads((out / "kd_train_log.json").read_text())["resumed_from"]
    assert 1 <= resumed < 6 and f"resumed from step {resumed}" in r.stdout + r.stderr
    _assert_same_training(tmp_path / "two", out)


def _kill_after_checkpoint(args: list[str]) -> None:
    """Run `args` (with `--out OUT`) on 2 ranks with --fsdp, checkpointing every step, and SIGKILL the ranks and
    their launcher as soon as OUT.work holds a checkpoint."""
    import signal
    import time

    import psutil

    out = Path(args[args.index("--out") + 1])
    work = out.with_name(out.name + ".work")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "glmgguf", *args, "--fsdp", "--save-every", "1"]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (work / "LATEST").is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher = psutil.Process(p.pid)
    for proc in [*launcher.children(recursive=True), launcher]:  # the ranks and their launcher, at once
        proc.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and (work / "LATEST").is_file()


def _rank_share(reader, rank: int, world: int) -> int:
    """Checkpoint bytes rank `rank` needs for its shards: its ceil(n / world)-row chunk of every tensor's dim 0,
    for the routed experts (fused along dim 0) its chunk of each layer's experts."""
    from glmgguf.layout import parse_hf_name

    def chunk(n: int) -> range:
        per = -(-n // world)
        return range(min(rank * per, n), min((rank + 1) * per, n))

    experts = {x.index: x.n_experts for x in GlmLayout.from_config(reader.config).moe_layers}
    total = 0
    for name, info in reader.tensors.items():
        h = parse_hf_name(name)
        if h is not None and h.expert is not None:
            total += info.nbytes if h.expert in chunk(experts[h.layer]) else 0
        else:
            total += info.nbytes // info.shape[0] * len(chunk(info.shape[0]))
    return total


def test_get_rows_reads_only_those_rows(tiny_fp8_testbed_dir):
    """`CheckpointReader.get_rows` equals the same rows of `get`, block-FP8 weights dequantized (block rows that
    straddle the range included), and reads only those rows' bytes (plus the scales)."""
    from glmgguf.io import CheckpointReader

    r = CheckpointReader(tiny_fp8_testbed_dir)
    fp8 = [n for n in r.tensors if r.is_fp8(n)]
    plain = [n for n in r.tensors if not r.is_fp8(n) and len(r.info(n).shape) == 2]
    assert fp8 and plain
    for name in [*fp8, *plain]:
        rows = r.info(name).shape[0]
        full = r.get(name)
        for start, stop in ((0, rows), (1, rows // 2 + 3), (rows - 1, rows + 5), (rows, rows + 1)):
            before = r.bytes_read
            part = r.get_rows(name, start, stop)
            assert part.dtype == full.dtype and torch.equal(part, full[start:stop]), (name, start, stop)
            if name in plain:
                assert r.bytes_read - before == part.numel() * part.element_size()


def test_fsdp_shard_load_equals_whole_load(kd_inputs, tmp_path):
    """Sharded shard by shard, every rank holds bit for bit the shards and buffers that loading the whole student
    and sharding it gives, and its forward (trunk and MTP logits) is bit for bit the same (so training is: the
    losses and gates of the FSDP test above), having read from the checkpoint exactly its 1/2 share (its 4 of 8
    experts per MoE layer). Its resident memory grows less while loading: measured 150 MB against 193-199 MB (peak
    0.44 GB against 0.48 GB, the rest the interpreter and torch), the difference about the whole float32 student
    (43 MB) that today's path holds on every rank; asserted: at least a quarter of it."""
    from glmgguf.io import CheckpointReader

    student, _ = kd_inputs
    script = Path(__file__).with_name("fsdp_load_rank.py")
    for mode in ("whole", "shards"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), str(script), mode, str(student), str(tmp_path)]
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
    reader = CheckpointReader(student)
    for rank in (0, 1):
        whole, shards = (torch.load(tmp_path / f"{m}-{rank}.pt") for m in ("whole", "shards"))
        assert sorted(whole) == sorted(shards) and len(whole) > 90 and "forward.mtp_logits" in whole
        for k, v in whole.items():
            assert shards[k].dtype == v.dtype and torch.equal(shards[k], v), k
        assert whole["model.model.layers.1.mlp.experts.gate_up_proj"].shape[0] == 4  # 4 of 8 experts a rank
        w, s = (json.loads((tmp_path / f"{m}-{rank}.json").read_text()) for m in ("whole", "shards"))
        assert s["bytes_read"] == _rank_share(reader, rank, 2) == pytest.approx(reader.total_bytes() / 2, rel=0.01)
        student_f32 = 4 * sum(math.prod(i.shape) for i in reader.tensors.values())  # loaded in float32
        assert s["peak_rss"] < w["peak_rss"] and w["load_rss"] - s["load_rss"] > student_f32 / 4, (s, w)
        assert not s["mtp_embed_copy"] and w["mtp_embed_copy"]  # the MTP block reads the sharded trunk embedding


def test_fsdp_from_block_fp8_with_bias(trained_testbed_dir, calib, tmp_path):
    """The release's storage end to end: a block-FP8 student (the trained testbed stored as the FP8 release is,
    REAP-pruned, FP8 kept) trained with --train-bias on 2 ranks trains what one process trains, and only its gates
    and correction biases change. --cpu-offload on CPU ranks is ignored with a warning (FSDP's offload pins memory
    for an accelerator; the shards are in host memory already)."""
    from glmgguf.io import CheckpointReader
    from glmgguf.kd.teacher import build_teacher_cache
    from glmgguf.kd.write import diff_checkpoints
    from glmgguf.reap.data import load_calibration, load_tokenizer
    from glmgguf.reap.observe import observe
    from glmgguf.reap.prune import plan_prune, prune_checkpoint
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed.release_fp8 import write_fp8_copy

    fp8 = write_fp8_copy(trained_testbed_dir, tmp_path / "fp8")
    seqs = load_calibration([calib], load_tokenizer(fp8), SEQ_LEN, num_samples=6).sequences
    stats = observe(fp8, chunk_sequences(seqs, 2), streaming=False, dtype=torch.float32)
    prune_checkpoint(fp8, plan_prune(GlmLayout.from_dir(fp8), stats, keep=8), tmp_path / "student", stats=stats)
    student = tmp_path / "student"
    assert any(CheckpointReader(student).is_fp8(n) for n in CheckpointReader(student).tensors)
    build_teacher_cache(fp8, seqs, tmp_path / "cache", top_k=32, dtype=torch.float32)
    common = ["kd", "train", str(student), "--teacher-cache", str(tmp_path / "cache"), *KD, "--train-bias"]
    _one_process([*common, "--out", str(tmp_path / "one")])
    r = _torchrun([*common, "--out", str(tmp_path / "two"), "--fsdp", "--cpu-offload"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--cpu-offload: the ranks compute on the CPU, where the shards already are; ignored" in r.stderr
    changed = diff_checkpoints(student, tmp_path / "two")
    assert changed == diff_checkpoints(student, tmp_path / "one")
    assert all(n.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")) for n in changed)
    assert any(n.endswith("e_score_correction_bias") for n in changed)
    _assert_same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("command", ["train", "lora"])
def test_fsdp_bad_launches(kd_inputs, tmp_path, command):
    """A global batch the ranks cannot share evenly; --fsdp without torchrun; ranks without --fsdp."""
    student, cache = kd_inputs
    common = ["kd", command, str(student), "--teacher-cache", str(cache), "--steps", "1", "--out",
              str(tmp_path / "o")]
    r = _torchrun([*common, "--batch-size", "3", "--fsdp"])
    assert r.returncode != 0
    assert "Error: --batch-size (the global batch) 3 is not divisible by the world size 2" in r.stdout + r.stderr
    res = CliRunner().invoke(main, [*common, "--fsdp"])
    assert res.exit_code == 1 and "--fsdp shards the student over the ranks of a torchrun launch: torchrun " \
        f"--nproc-per-node N -m glmgguf kd {command} ... --fsdp" in res.output
    r = _torchrun(common)
    assert r.returncode != 0 and "launched with 2 ranks but without --fsdp" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------------
# LoRA-KD with FSDP2
# ---------------------------------------------------------------------------------------------------------------

LORA = ["--steps", "4", "--batch-size", "2", "--lr", "3e-3", "--rank", "3", "--target", "attn,shared,dense",
        "--train-gates", "--gate-lr", "1e-2"]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def _assert_same_lora(a: Path, b: Path) -> None:
    """Per-step losses within 2e-5 (measured: 4.6e-6, float32 sums in another order); adapters and gates within
    3e-4 (measured: 7.1e-5, 0.03% of the elements more than 1e-5 apart: AdamW's first steps normalise gradients
    near zero, whose last bits depend on that order)."""
    steps = [json.loads((d / "lora_train_log.json").read_text())["steps"] for d in (a, b)]
    assert [r["kl"] for r in steps[1]] == pytest.approx([r["kl"] for r in steps[0]], rel=2e-5)
    ta, tb = _adapter(a), _adapter(b)
    assert sorted(ta) == sorted(tb) and len(ta) == 70  # 33 adapted linears (A and B) and 4 gates
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=3e-4, rtol=0)
    diff = torch.cat([(ta[k] - tb[k]).abs().flatten() for k in ta])
    assert float((diff > 1e-5).double().mean()) < 0.005


def test_fsdp_lora_equals_one_process_and_resumes_on_one_rank(kd_inputs, tmp_path):
    """2 ranks (rank-3 adapters: shards of 2 and 1 rows) on the same global batch train the adapters and gates one
    process trains; the adapter loads with PEFT to one process's logits and the merged checkpoint changes the same
    tensors by the same amounts; a 2-rank run killed after a checkpoint and resumed on 1 rank ends where the
    uninterrupted run ends."""
    from peft import PeftModel

    from glmgguf.io import CheckpointReader
    from glmgguf.kd.student import Student
    from glmgguf.kd.write import diff_checkpoints

    student, cache = kd_inputs
    common = ["kd", "lora", str(student), "--teacher-cache", str(cache), *LORA]
    _one_process([*common, "--out", str(tmp_path / "one"), "--merge", str(tmp_path / "one-merged")])
    r = _torchrun([*common, "--out", str(tmp_path / "two"), "--merge", str(tmp_path / "two-merged"), "--fsdp"])
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_same_lora(tmp_path / "one", tmp_path / "two")
    changed = diff_checkpoints(student, tmp_path / "two-merged")
    assert changed == diff_checkpoints(student, tmp_path / "one-merged") and len(changed) == 35
    one, two = CheckpointReader(tmp_path / "one-merged"), CheckpointReader(tmp_path / "two-merged")
    for n in changed:  # stored in BF16, rounded from the adapters' differences (measured: at most 4.9e-4 apart, 1.4%
        a, b = one.get(n).float(), two.get(n).float()  # of a tensor's elements differ)
        torch.testing.assert_close(b, a, atol=1e-3, rtol=2**-7)
        assert float((a != b).double().mean()) < 0.05, n
    ids = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = [PeftModel.from_pretrained(Student(student, mtp=False).model, tmp_path / d).eval()(input_ids=ids)
                  .logits for d in ("one", "two")]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)
    out = tmp_path / "killed"
    _kill_after_checkpoint([*common, "--out", str(out)])
    r = _torchrun([*common, "--out", str(out), "--fsdp", "--resume"], n=1)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = re.search(r"resumed from step (\d+)", r.stdout + r.stderr)
    assert resumed and 1 <= int(resumed[1]) < 4, r.stdout + r.stderr
    _assert_same_lora(tmp_path / "two", out)


def test_fsdp_lora_bf16_on_one_rank_is_one_process_bit_for_bit(kd_inputs, tmp_path):
    """In BF16 the sharded student (the frozen units in BF16, the adapters and the co-trained gates float32 units)
    on 1 rank trains what one process trains, bit for bit. (On 2 ranks BF16 sums over another batch split differ
    in their last bits, and AdamW carries that into the adapters: measured 4e-3 relative loss after 4 steps.)"""
    student, cache = kd_inputs
    common = ["kd", "lora", str(student), "--teacher-cache", str(cache), *LORA[2:], "--steps", "2", "--dtype", "bf16"]
    _one_process([*common, "--out", str(tmp_path / "one")])
    r = _torchrun([*common, "--out", str(tmp_path / "fsdp"), "--fsdp"], n=1)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [json.loads((tmp_path / d / "lora_train_log.json").read_text())["steps"] for d in ("one", "fsdp")]
    assert [r["kl"] for r in steps[0]] == [r["kl"] for r in steps[1]]
    one, fsdp = _adapter(tmp_path / "one"), _adapter(tmp_path / "fsdp")
    assert sorted(one) == sorted(fsdp) and all(torch.equal(one[k], fsdp[k]) for k in one)
    assert {v.dtype for v in fsdp.values()} == {torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# The pipeline's [launch]
# ---------------------------------------------------------------------------------------------------------------

LAUNCH_PLAN = """\
[pipeline]
workdir = "work"
model = "testbed:tiny"

[data]
calibration = ["stdlib:train"]
kd = ["stdlib:train"]
heldout = ["stdlib:heldout"]
seq_len = 48
calibration_samples = 4
kd_samples = 4
heldout_samples = 2
batch_size = 2

[reap]
keep = 8
dtype = "f32"
streaming = true

[kd]
steps = 2
batch_size = 2

[launch]
nproc_per_node = 2
"""


def test_plan_launch_runs_stages_under_torchrun(tmp_path):
    """[launch] puts observe, the teacher passes and KD (with --fsdp) under torchrun; the observe stage runs on 2
    ranks through the pipeline and writes the statistics one process writes."""
    from glmgguf.pipeline.plan import PlanError, parse_plan
    from glmgguf.pipeline.run import plan_stages, run_plan

    path = tmp_path / "plan.toml"
    path.write_text(LAUNCH_PLAN)
    def stages_of(path):
        return {s.name: s for s in plan_stages(parse_plan(path))[1]}

    stages = stages_of(path)
    on_ranks = ["--standalone", "--nproc-per-node", "2"]
    assert {n for n, s in stages.items() if s.launcher == on_ranks} == {"observe", "teacher", "teacher-heldout",
                                                                          "kd"}
    assert "--fsdp" in stages["kd"].args and "--eval-cache" not in stages["kd"].args
    assert stages["prune"].launcher == []
    path.write_text(LAUNCH_PLAN.replace("batch_size = 2\n\n[launch]", "batch_size = 2\ncpu_offload = true\n\n[launch]"))
    assert stages_of(path)["kd"].args[-2:] == ["--fsdp", "--cpu-offload"]
    path.write_text(LAUNCH_PLAN.replace("batch_size = 2\n\n[launch]\nnproc_per_node = 2",
                                        "batch_size = 2\ncpu_offload = true"))
    with pytest.raises(PlanError, match=r"\[kd\] cpu_offload is for FSDP2, which runs under \[launch\]"):
        parse_plan(path)
    path.write_text(LAUNCH_PLAN.replace("nproc_per_node = 2", "nproc_per_node = 2\nnnodes = 2"))
    with pytest.raises(PlanError, match=r"plan.toml:26: \[launch\] nnodes > 1 needs rdzv_endpoint"):
        parse_plan(path)
    path.write_text(LAUNCH_PLAN.replace("nproc_per_node = 2", "nproc_per_node = 4"))
    with pytest.raises(PlanError, match=r"plan.toml:22: \[kd\] batch_size 2 is not divisible by the 4 ranks"):
        parse_plan(path)
    path.write_text(LAUNCH_PLAN)
    run_plan(parse_plan(path), quiet=True, only=["observe"])
    log = (tmp_path / "work" / "observe" / "log.txt").read_text()
    assert "$ torchrun --standalone --nproc-per-node 2 -m glmgguf reap observe" in log and "(2 ranks, gloo)" in log
    assert ReapStats.load(tmp_path / "work" / "observe" / "stats.safetensors").meta["ranks"] == 2
