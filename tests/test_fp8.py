"""Block-FP8 sources (the GLM-5.x FP8 release): reading, every stage, bad input, and the old head-copy layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from glmgguf.checkpoint import open_checkpoint
from glmgguf.cli import main
from glmgguf.gguf.convert import convert, outtype_chooser
from glmgguf.io import CheckpointReader
from glmgguf.io.fp8 import SCALE_SUFFIX
from glmgguf.io.fp8 import quantize as fp8_quantize
from glmgguf.layout import GlmLayout, parse_hf_name, released_as_fp8
from glmgguf.reap.observe import observe
from glmgguf.reap.prune import plan_prune, prune_checkpoint
from glmgguf.runner import chunk_sequences
from glmgguf.testbed.release_fp8 import trained_fp8_testbed, write_dequantized_copy

SEQ_LEN = 64  # > the tiny testbed's index_topk (32): sparse DSA active


@pytest.fixture(scope="module")
def fp8_dir(trained_testbed_dir) -> Path:
    return trained_fp8_testbed("tiny")


@pytest.fixture(scope="module")
def twins(fp8_dir, tmp_path_factory) -> dict[str, Path]:
    """The FP8 testbed dequantized: exactly (F32) and as a user's BF16 copy."""
    root = tmp_path_factory.mktemp("twins")
    return {"f32": write_dequantized_copy(fp8_dir, root / "f32", torch.float32),
            "bf16": write_dequantized_copy(fp8_dir, root / "bf16", torch.bfloat16)}


@pytest.fixture(scope="module")
def chunks(trained_testbed_dir) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    from glmgguf.reap.data import pack
    from glmgguf.testbed import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(trained_testbed_dir)
    docs = [d[:4000] for d in stdlib_corpus("train")[:40]]
    return chunk_sequences(pack(docs, tok, SEQ_LEN, num_samples=8, seed=1).sequences, 4)


@pytest.fixture(scope="module")
def fp8_stats(fp8_dir, chunks):
    return observe(fp8_dir, chunks, streaming=True, dtype=torch.float32)


def _tensors(path: Path) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in GGUFReader(path).tensors}


# ---------------------------------------------------------------------------------------------------------------
# The stored form
# ---------------------------------------------------------------------------------------------------------------

def test_fp8_testbed_is_stored_like_the_release(fp8_dir):
    reader = CheckpointReader(fp8_dir)
    cfg = reader.config
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["fmt"], qc["weight_block_size"]) == ("fp8", "e4m3", [128, 128])
    assert any(m.endswith("self_attn.indexers_proj") for m in qc["modules_to_not_convert"])  # the release's quirk
    assert not any("weights_proj" in m for m in qc["modules_to_not_convert"])
    for name in reader.names():
        rule = parse_hf_name(name).rule
        info = reader.info(name)
        if released_as_fp8(rule):
            assert info.dtype == "F8_E4M3" and reader.scales[name].dtype == "F32", name
            assert reader.scales[name].shape == tuple(math.ceil(d / 128) for d in info.shape), name
        else:
            assert info.dtype in ("BF16", "F32") and name not in reader.scales, name
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    assert reader.info(mtp + "self_attn.indexer.wk.weight").dtype == "F8_E4M3"
    assert reader.info(mtp + "self_attn.indexer.weights_proj.weight").dtype == "BF16"
    assert reader.info(mtp + "eh_proj.weight").dtype == "BF16"
    assert mtp + "shared_head.head.weight" not in reader and mtp + "embed_tokens.weight" not in reader
    assert "bos_token_id" not in cfg and cfg["head_dim"] != cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]


def test_dequantization_is_the_upstream_formula(tmp_path):
    """weight.float() * scale repeated over 128 x 128 blocks and cropped, for shapes that are not multiples."""
    torch.manual_seed(0)
    for shape in ((300, 200), (576, 256), (128, 128), (256, 384), (5, 1000)):  # partial and whole blocks
        codes, scale = fp8_quantize(torch.randn(shape) * 0.05)
        expected = codes.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
        save_file({"w.weight": codes, "w.weight_scale_inv": scale}, tmp_path / "model.safetensors")
        (tmp_path / "config.json").write_text(json.dumps(
            {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}))
        got = CheckpointReader(tmp_path).get("w.weight")
        assert got.dtype == torch.float32 and torch.equal(got, expected), shape


# ---------------------------------------------------------------------------------------------------------------
# Bad FP8 input: one clear error, no output
# ---------------------------------------------------------------------------------------------------------------

def _edit_shard(model: Path, name: str, edit) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


W = "model.layers.1.mlp.experts.3.down_proj.weight"


def _drop_scale(t):
    del t[W + SCALE_SUFFIX]


def _wrong_shape(t):
    t[W + SCALE_SUFFIX] = torch.ones(3, 3)


def _nan_scale(t):
    t[W + SCALE_SUFFIX][0, 0] = float("nan")


def _inf_scale(t):
    t[W + SCALE_SUFFIX][0, 0] = float("inf")


@pytest.mark.parametrize(("edit", "config_edit", "words"), [
    (_drop_scale, None, f"FP8 weight {W} has no {W}{SCALE_SUFFIX}"),
    (_wrong_shape, None, "needs a float scale of shape [2, 2]"),
    (_nan_scale, None, "invalid block scale(s) (NaN, Inf, zero or negative)"),
    (_inf_scale, None, "invalid block scale(s)"),
    (None, {"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    (None, {"weight_block_size": None}, "per-tensor FP8 is not supported"),
    (None, "drop", "declares no quantization_config"),
], ids=["no-scale", "scale-shape", "nan-scale", "inf-scale", "quant-method", "no-block", "no-config"])
def test_bad_fp8_input(fp8_dir, fp8_stats, tmp_path, edit, config_edit, words):
    import shutil

    stats = fp8_stats.save(tmp_path / "stats.safetensors")[0]
    model = tmp_path / "model"
    shutil.copytree(fp8_dir, model)
    if edit is not None:
        _edit_shard(model, W, edit)
    if config_edit is not None:
        cfg = json.loads((model / "config.json").read_text())
        if config_edit == "drop":
            del cfg["quantization_config"]
        else:
            cfg["quantization_config"].update(config_edit)
        (model / "config.json").write_text(json.dumps(cfg))
    for args in (["convert", model, tmp_path / "out.gguf", "--outtype", "f32"],
                 ["nvfp4", "export", model, tmp_path / "nvfp4", "--calib", stats]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code != 0 and words in result.output, result.output
        assert "Traceback" not in result.output
    assert not [p for p in tmp_path.iterdir() if p.name not in ("model", "stats.safetensors", "stats.json")], \
        "no output, not even a partial one"


# ---------------------------------------------------------------------------------------------------------------
# Stages on the FP8 testbed
# ---------------------------------------------------------------------------------------------------------------

def test_convert_fp8_equals_its_exact_twin(fp8_dir, twins, tmp_path):
    """FP8 weights reach the GGUF as their exact dequantized values (upstream equality: test_upstream_equivalence)."""
    for outtype in ("f32", "q8_0"):
        a, b = tmp_path / f"fp8-{outtype}.gguf", tmp_path / f"twin-{outtype}.gguf"
        convert(fp8_dir, a, outtype_chooser(outtype), progress=False)
        convert(twins["f32"], b, outtype_chooser(outtype), progress=False)
        assert _tensors(a) == _tensors(b), outtype


def test_observe_fp8_equals_its_twins(fp8_dir, twins, chunks, fp8_stats):
    """Streaming and in-memory observation of the FP8 checkpoint equal the exact (F32) twin's; against the user's
    BF16 copy, whose rounding moves a few near-tied routings, the counts and the REAP ranking stay the same."""
    fp8_mem = observe(fp8_dir, chunks, streaming=False, dtype=torch.float32)
    exact = observe(twins["f32"], chunks, streaming=True, dtype=torch.float32)
    bf16 = observe(twins["bf16"], chunks, streaming=True, dtype=torch.float32)
    for layer, t in exact.layers.items():
        for stats in (fp8_stats, fp8_mem):
            assert torch.equal(stats.layers[layer]["count"], t["count"]), layer
            torch.testing.assert_close(stats.layers[layer]["reap_sum"], t["reap_sum"], rtol=1e-5, atol=1e-6)
        moved = int((bf16.layers[layer]["count"] - t["count"]).abs().sum())
        assert moved <= 0.005 * int(t["count"].sum()), (layer, moved)
        a, b = fp8_stats.score(layer, "reap"), bf16.score(layer, "reap")
        torch.testing.assert_close(a, b, rtol=5e-2, atol=1e-4)  # measured: at most 2.4%
        assert torch.equal(torch.argsort(a, descending=True)[:11].sort().values,
                           torch.argsort(b, descending=True)[:11].sort().values), layer


def test_prune_keeps_fp8(fp8_dir, twins, fp8_stats, tmp_path):
    layout = GlmLayout.from_dir(fp8_dir)
    plan = plan_prune(layout, fp8_stats, keep=11)
    out = prune_checkpoint(fp8_dir, plan, tmp_path / "pruned", stats=fp8_stats).out
    src, dst = CheckpointReader(fp8_dir), CheckpointReader(out)
    assert dst.config["quantization_config"] == src.config["quantization_config"]
    for layer, kept in plan.keep.items():
        for new, old in enumerate(kept):
            for proj in ("gate", "up", "down"):
                a = f"model.layers.{layer}.mlp.experts.{old}.{proj}_proj.weight"
                b = f"model.layers.{layer}.mlp.experts.{new}.{proj}_proj.weight"
                assert torch.equal(dst.get_stored(b).view(torch.uint8), src.get_stored(a).view(torch.uint8)), b
                assert torch.equal(dst.get_scale(b), src.get_scale(a)), b
        gate = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(dst.get(gate), src.get(gate)[kept])
    # the pruned FP8 model is the pruned exact twin: same GGUF
    twin_out = prune_checkpoint(twins["f32"], plan, tmp_path / "pruned-twin").out
    convert(out, tmp_path / "a.gguf", outtype_chooser("f32"), progress=False)
    convert(twin_out, tmp_path / "b.gguf", outtype_chooser("f32"), progress=False)
    assert _tensors(tmp_path / "a.gguf") == _tensors(tmp_path / "b.gguf")
    # --dequantize bf16: no scales, no quantization_config, the user's BF16 copy pruned
    deq = prune_checkpoint(fp8_dir, plan, tmp_path / "pruned-bf16", dequantize=torch.bfloat16).out
    r = CheckpointReader(deq)
    assert r.fp8 is None and not r.scales and "quantization_config" not in r.config
    bf16_twin = CheckpointReader(prune_checkpoint(twins["bf16"], plan, tmp_path / "pruned-bf16-twin").out)
    for name in r.names():
        assert torch.equal(r.get(name), bf16_twin.get(name)), name


def test_nvfp4_export_from_fp8(fp8_dir, twins, fp8_stats, tmp_path):
    from glmgguf.nvfp4.export import export_nvfp4, plan_export

    stats_file = tmp_path / "stats.safetensors"
    fp8_stats.save(stats_file)
    a = export_nvfp4(plan_export(fp8_dir, [stats_file]), tmp_path / "a").out
    b = export_nvfp4(plan_export(twins["f32"], [stats_file]), tmp_path / "b").out
    ra, rb, twin = CheckpointReader(a), CheckpointReader(b), CheckpointReader(twins["bf16"])
    assert ra.names() == rb.names()
    assert json.loads((a / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    n_experts = 0
    for name in ra.names():
        if ".experts." in name:  # quantized from the same dequantized values: same bytes
            n_experts += 1
            assert ra.info(name).dtype == rb.info(name).dtype, name
            a_bytes, b_bytes = (r.get(name).reshape(-1).view(torch.uint8) for r in (ra, rb))
            assert torch.equal(a_bytes, b_bytes), name
        elif name in twin:  # every other tensor as the BF16 copy has it
            assert torch.equal(ra.get(name), twin.get(name)), name
    assert n_experts > 0


def test_kd_teacher_and_student_on_fp8(fp8_dir, twins, chunks, tmp_path):
    from glmgguf.kd.student import Student
    from glmgguf.kd.teacher import TeacherCache, build_teacher_cache

    seqs = torch.cat(chunks)
    build_teacher_cache(fp8_dir, seqs, tmp_path / "fp8", top_k=16, dtype=torch.float32, streaming=True)
    build_teacher_cache(twins["f32"], seqs, tmp_path / "twin", top_k=16, dtype=torch.float32, streaming=True)
    a, b = TeacherCache(tmp_path / "fp8"), TeacherCache(tmp_path / "twin")
    ba, bb = a.batch(list(range(len(seqs)))), b.batch(list(range(len(seqs))))
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    student = Student(fp8_dir, dtype=torch.float32)
    twin = Student(twins["f32"], dtype=torch.float32)
    with torch.no_grad():
        la, ma = student.forward(seqs[:2])
        lb, mb = twin.forward(seqs[:2])
    assert torch.equal(la, lb) and torch.equal(ma, mb)


# ---------------------------------------------------------------------------------------------------------------
# The old layout: MTP head and embedding stored as copies
# ---------------------------------------------------------------------------------------------------------------

def test_head_copies_still_work(tmp_path):
    from glmgguf.testbed.build import build_testbed

    src = build_testbed(tmp_path / "copies", "tiny", mtp_head_copies=True)
    ckpt = open_checkpoint(src)
    n = ckpt.layout.n_layers
    assert f"model.layers.{n}.shared_head.head.weight" in ckpt.reader
    out = tmp_path / "copies.gguf"
    convert(src, out, outtype_chooser("f32"), progress=False)
    names = {t.name for t in GGUFReader(out).tensors}
    assert {f"blk.{n}.nextn.shared_head_head.weight", f"blk.{n}.nextn.embed_tokens.weight"} <= names
    released = tmp_path / "released.gguf"
    convert(build_testbed(tmp_path / "released", "tiny"), released, outtype_chooser("f32"), progress=False)
    same = _tensors(released)
    copies = _tensors(out)
    assert copies[f"blk.{n}.nextn.shared_head_head.weight"] == same["output.weight"]
    assert {k: v for k, v in copies.items() if ".nextn.shared_head_head" not in k and ".nextn.embed_tokens" not in k
            } == same
    # the KD student runs the MTP block through its own head copy
    from glmgguf.kd.student import Student

    s = Student(src, dtype=torch.float32)
    assert getattr(s.mtp.shared_head, "head", None) is not None
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        logits, mtp_logits = s.forward(ids)
        released_student = Student(tmp_path / "released", dtype=torch.float32)
        assert not hasattr(released_student.mtp.shared_head, "head")
        _, mtp_released = released_student.forward(ids)
    assert np.allclose(mtp_logits.numpy(), mtp_released.numpy(), atol=1e-6)


@pytest.mark.slow
def test_fp8_f32_logit_parity(fp8_dir, trained_testbed_dir, llama_toolchain, tmp_path):
    """The FP8 checkpoint's F32 GGUF in the pinned llama.cpp against transformers on the same dequantized weights,
    with sparse DSA selection active."""
    from transformers import AutoTokenizer

    from glmgguf.parity import kl_stats, llama_logits, transformers_logits
    from glmgguf.testbed.train import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(fp8_dir)
    ids = tok("".join(stdlib_corpus("heldout"))[:20000])["input_ids"][:160]
    assert len(ids) > GlmLayout.from_dir(fp8_dir).index_topk
    out = tmp_path / "fp8.gguf"
    convert(fp8_dir, out, outtype_chooser("f32"), progress=False)
    stats = kl_stats(transformers_logits(fp8_dir, ids), llama_logits(llama_toolchain, out, ids))
    print(f"fp8 source, f32 GGUF: {stats}")
    assert stats.mean < 1e-5 and stats.top1_agreement == 1.0, stats
