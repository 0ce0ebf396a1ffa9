"""Router-KD: sparse KL, teacher cache (in-memory = streaming), router-only training, resume, NaN, eval, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from glmgguf.cli import main
from glmgguf.kd.errors import CacheError, NanLossError, StudentMismatchError
from glmgguf.kd.evaluate import evaluate
from glmgguf.kd.loss import full_kl, sparse_kl, top1_agreement, topk_targets
from glmgguf.kd.routers import surrogate_bias_forward
from glmgguf.kd.student import parameter_counts, router_names
from glmgguf.kd.teacher import TeacherCache, build_teacher_cache, bytes_per_sequence
from glmgguf.kd.train import TrainOptions, rows_for_step, train_router
from glmgguf.kd.write import diff_checkpoints
from glmgguf.layout import GlmLayout
from glmgguf.runner import RunInterrupted

SEQ_LEN = 64  # > the tiny testbed's index_topk (32): sparse DSA attention is exercised
N_SEQS = 8
TOP_K = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: KD and held-out text, a REAP-pruned student, teacher caches
# ---------------------------------------------------------------------------------------------------------------

def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    from glmgguf.testbed import stdlib_corpus

    d = tmp_path_factory.mktemp("kdtext")
    train = [t[:5000] for t in stdlib_corpus("train")[:24]]
    held = [t[:5000] for t in stdlib_corpus("heldout")[:24]]
    assert not set(train) & set(held)  # the KD text and the held-out text are disjoint files
    return {"train": _write_jsonl(d / "kd.jsonl", train), "heldout": _write_jsonl(d / "heldout.jsonl", held)}


def _pack(model: Path, data: Path, n: int = N_SEQS, seed: int = 0) -> torch.Tensor:
    from glmgguf.reap.data import load_calibration, load_tokenizer

    return load_calibration([data], load_tokenizer(model), SEQ_LEN, num_samples=n, seed=seed).sequences


@pytest.fixture(scope="module")
def pruned(trained_testbed_dir, texts, tmp_path_factory) -> Path:
    """The trained testbed REAP-pruned to 8 of 16 experts per MoE layer (MTP block included)."""
    from glmgguf.reap.observe import observe
    from glmgguf.reap.prune import plan_prune, prune_checkpoint
    from glmgguf.runner import chunk_sequences

    seqs = _pack(trained_testbed_dir, texts["train"], seed=3)
    stats = observe(trained_testbed_dir, chunk_sequences(seqs, 4), streaming=False, dtype=torch.float32)
    out = tmp_path_factory.mktemp("kdstudent") / "pruned8"
    plan = plan_prune(GlmLayout.from_dir(trained_testbed_dir), stats, keep=8)
    prune_checkpoint(trained_testbed_dir, plan, out, stats=stats)
    return out


def _text(data: Path) -> dict:
    from glmgguf.kd.teacher import file_hashes

    return {"files": file_hashes([data])}


@pytest.fixture(scope="module")
def kd_cache(trained_testbed_dir, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kdcache") / "train"
    build_teacher_cache(trained_testbed_dir, _pack(trained_testbed_dir, texts["train"]), out, top_k=TOP_K,
                        dtype=torch.float32, text=_text(texts["train"]))
    return out


@pytest.fixture(scope="module")
def held_cache(trained_testbed_dir, texts, tmp_path_factory) -> Path:
    """Held-out teacher cache made through the command line, with the full vocabulary (exact KL)."""
    out = tmp_path_factory.mktemp("kdcache") / "heldout"
    r = CliRunner().invoke(main, ["kd", "teacher", str(trained_testbed_dir), "--data", str(texts["heldout"]),
                                  "--out", str(out), "--seq-len", str(SEQ_LEN), "--num-samples", "4",
                                  "--top-k", "100000", "--dtype", "f32", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    return out


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------

def test_sparse_kl_math():
    torch.manual_seed(0)
    t = torch.randn(3, 5, 50) * 2
    s = torch.randn(3, 5, 50) * 2
    vals, ids, rest = topk_targets(t, 50)  # k = vocab: exact (up to the fp16 log-probs)
    assert torch.isinf(rest).all()
    torch.testing.assert_close(sparse_kl(s, ids, vals, rest).double(), full_kl(t, s), rtol=2e-3, atol=2e-4)
    vals, ids, rest = topk_targets(t, 8)
    kl8 = sparse_kl(s, ids, vals, rest)
    assert (kl8 >= -1e-6).all() and (kl8 <= full_kl(t, s) + 1e-3).all()  # a lower bound of the full KL
    torch.testing.assert_close(rest.exp(), 1 - torch.softmax(t, -1).gather(-1, ids.long()).sum(-1), atol=1e-6,
                               rtol=1e-5)
    assert float(sparse_kl(t, ids, vals, rest).abs().max()) < 2e-3  # the teacher against itself
    # the missing-mass bucket: a student that copies the top-k logits but moves mass outside them is penalized
    s2 = t.clone()
    mask = torch.ones_like(t, dtype=torch.bool).scatter(-1, ids.long(), False)
    s2[mask] += 3.0
    assert float(sparse_kl(s2, ids, vals, rest).mean()) > 0.1
    assert top1_agreement(t, ids).all()
    z = s.clone().requires_grad_(True)
    sparse_kl(z, ids, vals, rest).mean().backward()
    assert torch.isfinite(z.grad).all()


def test_rows_cover_epochs():
    rows = [r for s in range(5) for r in rows_for_step(s, 7, 3, seed=1)]
    assert sorted(rows[:7]) == list(range(7)) and sorted(rows[7:14]) == list(range(7))
    assert rows_for_step(2, 7, 3, 1) == rows_for_step(2, 7, 3, 1)


# ---------------------------------------------------------------------------------------------------------------
# The teacher cache
# ---------------------------------------------------------------------------------------------------------------

def test_cache_streaming_equals_in_memory(trained_testbed_dir, texts, kd_cache, tmp_path):
    seqs = _pack(trained_testbed_dir, texts["train"])
    out = tmp_path / "streamed"
    build_teacher_cache(trained_testbed_dir, seqs, out, top_k=TOP_K, dtype=torch.float32, streaming=True,
                        work_dir=tmp_path / "work", spill_bytes=0, shard_bytes=3 * bytes_per_sequence(SEQ_LEN, TOP_K),
                        text=_text(texts["train"]))
    a, b = TeacherCache(kd_cache), TeacherCache(out)
    assert len(b.manifest["shards"]) > 1 and b.manifest["mode"] == "streaming"
    for k in ("tokenizer_hash", "cache_id", "teacher", "seq_len", "top_k"):
        assert a.manifest[k] == b.manifest[k], k
    assert a.manifest["text"]["token_sha256"] == b.manifest["text"]["token_sha256"]
    ba, bb = a.batch(range(N_SEQS)), b.batch(range(N_SEQS))
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k  # bit-identical
    # the stored targets are the transformers teacher's distributions
    from glmgguf.parity import transformers_logits

    logits = transformers_logits(trained_testbed_dir, seqs[0].tolist())
    lp = torch.log_softmax(logits, -1)
    vals, ids = lp.topk(TOP_K)
    assert torch.equal(ba["topk_ids"][0].long(), ids)
    torch.testing.assert_close(ba["topk_logprobs"][0].float(), vals, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(ba["rest_logprob"][0].exp(), 1 - vals.exp().sum(-1), atol=1e-5, rtol=1e-4)
    assert torch.equal(ba["input_ids"], seqs)
    m = a.manifest
    assert m["seq_len"] == SEQ_LEN and m["text"]["files"][0]["name"] == "kd.jsonl" and len(m["tokenizer_hash"]) == 64
    assert m["dtype"]["topk_logprobs"] == "float16"


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def _gate_names(layout: GlmLayout, bias: bool = False) -> list[str]:
    return sorted(router_names(layout, mtp=True, bias=bias))


def test_router_kd_changes_only_gates_and_lowers_kl(pruned, kd_cache, held_cache, texts, tmp_path):
    layout = GlmLayout.from_dir(pruned)
    before = evaluate(pruned, kd_cache)
    out = tmp_path / "kd"
    lines: list[str] = []
    res = train_router(pruned, kd_cache, out, TrainOptions(steps=24, lr=3e-3, batch_size=4, save_every=8),
                       data=[texts["train"]], log=lines.append)
    assert any("trainable:" in s and "%" in s for s in lines)
    # only the router gate matrices (3 trunk MoE layers + the MTP block) differ, every other tensor is identical
    assert diff_checkpoints(pruned, out) == _gate_names(layout)
    assert sorted(res.write.changed) == _gate_names(layout)
    assert (out / "config.json").read_bytes() == (pruned / "config.json").read_bytes()
    log = json.loads((out / "kd_train_log.json").read_text())
    assert len(log["steps"]) == 24 and log["trainable_fraction"] < 0.01
    assert (out / "kd_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "kd.work").exists()
    # the written student (BF16 gates) is closer to the teacher on the KD text, trunk and MTP head (held out:
    # test_router_kd_lowers_held_out_kl)
    after = evaluate(out, kd_cache)
    print(f"KD-text KL {before.kl:.5f} -> {after.kl:.5f}; MTP {before.mtp_kl:.5f} -> {after.mtp_kl:.5f}")
    assert after.kl < 0.97 * before.kl
    assert after.mtp_kl < before.mtp_kl
    held = evaluate(out, held_cache)
    assert held.positions == 4 * SEQ_LEN and held.cache_top_k == layout.vocab_size
    n_train, n_total = parameter_counts({k: v for k, v in layout.expected_hf_tensors().items()}, layout)
    assert n_train == 4 * 8 * layout.hidden_size


def test_router_kd_lowers_held_out_kl(pruned, texts, held_cache, trained_testbed_dir, tmp_path):
    """The README's claim on text KD never saw: 96 KD sequences, 60 steps lower the exact (full-vocabulary) KL on
    the held-out files by ~8% (measured 0.0497 -> 0.0457 on 4 x 64 held-out positions) and keep top-1 agreement."""
    cache = tmp_path / "kd-cache"
    build_teacher_cache(trained_testbed_dir, _pack(trained_testbed_dir, texts["train"], n=96), cache, top_k=TOP_K,
                        dtype=torch.float32, text=_text(texts["train"]))
    before = evaluate(pruned, held_cache)
    train_router(pruned, cache, tmp_path / "kd", TrainOptions(steps=60, lr=1e-2, batch_size=4, save_every=1000,
                                                               schedule="cosine"))
    after = evaluate(tmp_path / "kd", held_cache)
    print(f"held-out KL {before.kl:.5f} -> {after.kl:.5f}; top-1 {before.top1:.3f} -> {after.top1:.3f}")
    assert after.kl < 0.97 * before.kl
    assert after.top1 >= before.top1 - 1 / before.positions


def test_resume_equals_uninterrupted_run(pruned, kd_cache, tmp_path):
    opts = dict(steps=4, lr=3e-3, batch_size=2, save_every=2, gradient_checkpointing=True)
    train_router(pruned, kd_cache, tmp_path / "full", TrainOptions(**opts))
    with pytest.raises(RunInterrupted):
        train_router(pruned, kd_cache, tmp_path / "resumed", TrainOptions(**opts, stop_after_step=3))
    work = tmp_path / "resumed.work"
    assert (work / "LATEST").read_text() == "checkpoint-0000002"
    with pytest.raises(Exception, match="--resume"):  # a stale checkpoint is not silently discarded
        train_router(pruned, kd_cache, tmp_path / "resumed", TrainOptions(**opts))
    with pytest.raises(Exception, match="other settings"):
        train_router(pruned, kd_cache, tmp_path / "resumed", TrainOptions(**{**opts, "lr": 1e-3}), resume=True)
    res = train_router(pruned, kd_cache, tmp_path / "resumed", TrainOptions(**opts), resume=True)
    assert res.resumed_from == 2
    assert diff_checkpoints(tmp_path / "full", tmp_path / "resumed") == []
    a = json.loads((tmp_path / "full" / "kd_train_log.json").read_text())["steps"]
    b = json.loads((tmp_path / "resumed" / "kd_train_log.json").read_text())["steps"]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert not work.exists()  # the finished run removed its checkpoints


def test_work_dir_keeps_what_the_run_did_not_write(pruned, kd_cache, tmp_path):
    """--work-dir may be a folder of the user's: starting over (--force) and finishing remove only the run's
    checkpoints, never the folder's other files."""
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    opts = dict(steps=2, lr=3e-3, batch_size=2, save_every=1)
    with pytest.raises(RunInterrupted):
        train_router(pruned, kd_cache, tmp_path / "a", TrainOptions(**opts, stop_after_step=1), work_dir=work)
    assert (work / "LATEST").is_file()
    train_router(pruned, kd_cache, tmp_path / "a", TrainOptions(**opts), work_dir=work, force=True)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert (work / "notes.txt").read_text() == "keep me"


def test_surrogate_bias_forward_is_exact_and_gives_bias_a_gradient():
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaTopkRouter

    for n_group, topk_group in ((1, 1), (4, 2)):
        cfg = GlmMoeDsaConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
                              topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=True)
        torch.manual_seed(0)
        router = GlmMoeDsaTopkRouter(cfg)
        with torch.no_grad():
            router.weight.normal_(0, 0.5)
            router.e_score_correction_bias.normal_(0, 0.1)
        x = torch.randn(40, 32)
        ref = router(x)
        b = router.e_score_correction_bias.detach().clone()
        del router._buffers["e_score_correction_bias"]
        router.e_score_correction_bias = torch.nn.Parameter(b)
        got = surrogate_bias_forward(router, x)
        for r, g in zip(ref, got, strict=True):
            assert torch.equal(r, g)
        (got[1] * torch.randn_like(got[1])).sum().backward()
        assert router.e_score_correction_bias.grad.abs().sum() > 0


def test_train_bias_and_no_mtp(pruned, kd_cache, tmp_path):
    layout = GlmLayout.from_dir(pruned)
    out = tmp_path / "bias"
    train_router(pruned, kd_cache, out, TrainOptions(steps=3, lr=1e-2, batch_size=2, train_bias=True, mtp=False,
                                                     save_every=0))
    changed = diff_checkpoints(pruned, out)
    mtp = layout.n_layers
    assert f"model.layers.{mtp}.mlp.gate.weight" not in changed  # --no-mtp leaves the MTP router unchanged
    expected = {n for n in router_names(layout, mtp=False, bias=True)}
    assert set(changed) == expected
    assert any(n.endswith("e_score_correction_bias") for n in changed)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pruned, kd_cache, tmp_path, monkeypatch):
    import glmgguf.kd.train as kd_train

    real = kd_train.sparse_kl
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        out = real(*a, **kw)
        return out * float("nan") if calls["n"] > 2 * 2 else out  # trunk + MTP per step: NaN from step 3 on

    monkeypatch.setattr(kd_train, "sparse_kl", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NanLossError, match=r"loss is nan at step 3.*last good checkpoint \(step 2\)"):
        train_router(pruned, kd_cache, out, TrainOptions(steps=5, lr=3e-3, batch_size=2, save_every=2))
    assert not out.exists()
    ck = tmp_path / "nan.work" / "checkpoint-0000002"
    saved = load_file(str(ck / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    monkeypatch.setattr(kd_train, "sparse_kl", real)
    res = train_router(pruned, kd_cache, out, TrainOptions(steps=5, lr=3e-3, batch_size=2, save_every=2),
                       resume=True)
    assert res.resumed_from == 2 and out.is_dir()


def test_write_verifies_every_tensor(pruned, tmp_path, monkeypatch):
    import glmgguf.kd.write as kd_write
    from glmgguf.io import CheckpointReader
    from glmgguf.kd.errors import WriteVerifyError
    from glmgguf.kd.write import write_student

    reader = CheckpointReader(pruned)
    gate = "model.layers.2.mlp.gate.weight"
    new = reader.get(gate).float() + 0.25
    rep = write_student(pruned, tmp_path / "ok", {gate: new})
    assert rep.changed == [gate] and rep.identical == len(reader.names()) - 1
    assert diff_checkpoints(pruned, tmp_path / "ok") == [gate]
    # the pruned model's calibration statistics travel with it (NVFP4 export reads its input scales there)
    stats = "reap_stats.safetensors"
    assert (tmp_path / "ok" / stats).read_bytes() == (pruned / stats).read_bytes()

    class Corrupting(kd_write.ShardedWriter):  # a writer that silently alters one frozen tensor
        def add(self, name, tensor):
            super().add(name, tensor + 1 if name == "model.norm.weight" else tensor)

    monkeypatch.setattr(kd_write, "ShardedWriter", Corrupting)
    with pytest.raises(WriteVerifyError, match="model.norm.weight changed although KD must leave it"):
        write_student(pruned, tmp_path / "bad", {gate: new})
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

def _linked_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            os.symlink(f, dst / f.name)
    return dst


def test_bad_input(pruned, kd_cache, held_cache, texts, tiny_testbed_dir, trained_testbed_dir, tmp_path):
    cache = TeacherCache(kd_cache)
    assert cache.check_student(pruned)[1] == json.loads((pruned / "reap_keep_map.json").read_text())["keep_map"]["1"]
    # another text
    cache.check_text([texts["train"]])
    with pytest.raises(CacheError, match="made from other text"):
        cache.check_text([texts["heldout"]])
    # another tokenizer
    other_tok = _linked_copy(pruned, tmp_path / "tok", skip=("tokenizer.json",))
    data = json.loads((pruned / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|other|>"
    (other_tok / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match="another tokenizer"):
        cache.check_student(other_tok)
    # another vocabulary
    other_vocab = _linked_copy(pruned, tmp_path / "vocab", skip=("config.json",))
    cfg = json.loads((pruned / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 64}))
    with pytest.raises(StudentMismatchError, match="vocab_size 4160 differs from the teacher's 4096"):
        cache.check_student(other_vocab)
    # not pruned from this teacher: another model with the same shapes (the random-init testbed)
    with pytest.raises(StudentMismatchError, match="not pruned from this teacher"):
        cache.check_student(tiny_testbed_dir)
    # pruned, but the keep-map is missing, names other experts, or another source count
    no_map = _linked_copy(pruned, tmp_path / "nomap", skip=("reap_keep_map.json",))
    with pytest.raises(StudentMismatchError, match="layer 1 has 8 experts, the teacher 16, and there is no"):
        cache.check_student(no_map)
    km = json.loads((pruned / "reap_keep_map.json").read_text())
    wrong = _linked_copy(pruned, tmp_path / "wrongmap", skip=("reap_keep_map.json",))
    ids = km["keep_map"]["2"]
    km_wrong = {**km, "keep_map": {**km["keep_map"], "2": [e for e in range(16) if e not in ids]}}
    (wrong / "reap_keep_map.json").write_text(json.dumps(km_wrong))
    with pytest.raises(StudentMismatchError, match="layer 2 expert 0 is not the teacher's expert"):
        cache.check_student(wrong)
    src12 = _linked_copy(pruned, tmp_path / "src12", skip=("reap_keep_map.json",))
    (src12 / "reap_keep_map.json").write_text(json.dumps({**km, "source_experts": {"1": 12}}))
    with pytest.raises(StudentMismatchError, match="pruned from 12 experts, the teacher has 16"):
        cache.check_student(src12)
    # the teacher itself is a valid (unpruned) student
    assert cache.check_student(trained_testbed_dir)[1] == list(range(16))
    # a shard from another cache
    mixed = _linked_copy(kd_cache, tmp_path / "mixed", skip=("manifest.json",))
    m = json.loads((kd_cache / "manifest.json").read_text())
    (mixed / "manifest.json").write_text(json.dumps({**m, "cache_id": "0" * 16}))
    with pytest.raises(CacheError, match="belongs to another teacher cache"):
        TeacherCache(mixed)
    # on the command line: one clear line, exit status 1
    run = CliRunner()
    r = run.invoke(main, ["kd", "train", str(no_map), "--teacher-cache", str(kd_cache), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert "no reap_keep_map.json" in r.output
    r = run.invoke(main, ["kd", "eval", str(pruned), "--teacher-cache", str(held_cache), "--data",
                          str(texts["train"])])
    assert r.exit_code == 1 and "made from other text" in r.output
    r = run.invoke(main, ["kd", "eval", str(other_vocab), "--teacher-cache", str(held_cache)])
    assert r.exit_code == 1 and "vocab_size" in r.output


def test_cli_train_and_eval(pruned, kd_cache, held_cache, texts, tmp_path):
    run = CliRunner()
    out = tmp_path / "cli-kd"
    r = run.invoke(main, ["kd", "train", str(pruned), "--teacher-cache", str(kd_cache), "--out", str(out),
                          "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--data", str(texts["train"]),
                          "--eval-cache", str(held_cache), "--eval-every", "1", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "trainable:" in r.output and "verified byte-identical" in r.output and "eval-cache KL" in r.output
    js = tmp_path / "eval.json"
    r = run.invoke(main, ["kd", "eval", str(out), "--teacher-cache", str(held_cache), "--data",
                          str(texts["heldout"]), "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["positions"] == 4 * SEQ_LEN and 0 < res["kl"] < 1 and 0 < res["top1"] <= 1
    log = json.loads((out / "kd_train_log.json").read_text())
    assert [e["step"] for e in log["evals"]] == [0, 1, 2]
    assert abs(log["evals"][-1]["kl"] - res["kl"]) < 2e-3  # bf16-stored gates vs the f32 master weights
    r = run.invoke(main, ["kd", "train", str(pruned), "--teacher-cache", str(kd_cache), "--out", str(out),
                          "--steps", "2"])
    assert r.exit_code == 1 and "already exists" in r.output


# ---------------------------------------------------------------------------------------------------------------
# The result converts and runs in llama.cpp
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kd_student_converts_and_matches_llama_cpp(pruned, kd_cache, llama_toolchain, tmp_path):
    from transformers import AutoTokenizer

    from glmgguf.parity import kl_stats, llama_logits, transformers_logits
    from glmgguf.testbed import stdlib_corpus

    out = tmp_path / "kd"
    train_router(pruned, kd_cache, out, TrainOptions(steps=6, lr=3e-3, batch_size=2, save_every=0))
    gguf = tmp_path / "kd.gguf"
    r = CliRunner().invoke(main, ["convert", str(out), str(gguf), "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("".join(stdlib_corpus("heldout"))[:20000])["input_ids"][:160]
    stats = kl_stats(transformers_logits(out, ids), llama_logits(llama_toolchain, gguf, ids))
    print(f"router-KD student (8/16 experts) f32: {stats}")
    assert stats.mean < 1e-5, stats
    assert stats.top1_agreement == 1.0
    shutil.rmtree(out)
