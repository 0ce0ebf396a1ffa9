"""glmgguf convert: logit parity in the pinned llama.cpp, round trip, metadata, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants

from glmgguf.checkpoint import open_checkpoint
from glmgguf.cli import main
from glmgguf.gguf.convert import convert, outtype_chooser, tensor_chunks
from glmgguf.gguf.plan import IndexerMode, MtpMode, plan_tensors
from glmgguf.io import CheckpointReader
from glmgguf.layout import GlmLayout, Transform
from glmgguf.parity import kl_stats, llama_logits, transformers_logits

N_TOKENS = 160


@pytest.fixture(scope="module")
def parity_ids(trained_testbed_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    from glmgguf.testbed.train import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(trained_testbed_dir)
    text = "".join(stdlib_corpus("heldout"))[:20000]
    ids = tok(text)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS > GlmLayout.from_dir(trained_testbed_dir).index_topk  # sparse DSA really active
    return ids


@pytest.fixture(scope="module")
def reference_logits(trained_testbed_dir: Path, parity_ids: list[int]) -> torch.Tensor:
    return transformers_logits(trained_testbed_dir, parity_ids)


@pytest.mark.slow
@pytest.mark.parametrize("indexer", ["native", "duplicate"])
@pytest.mark.parametrize("mtp", ["keep", "drop"])
def test_f32_logit_parity(tmp_path, llama_toolchain, trained_testbed_dir, parity_ids, reference_logits,
                          indexer, mtp):
    out = tmp_path / "model.gguf"
    convert(trained_testbed_dir, out, outtype_chooser("f32"), MtpMode(mtp), IndexerMode(indexer), progress=False)
    stats = kl_stats(reference_logits, llama_logits(llama_toolchain, out, parity_ids))
    print(f"f32 indexer={indexer} mtp={mtp}: {stats}")
    assert stats.mean < 1e-5, stats
    assert stats.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("outtype", "bound"), [("bf16", 5e-3), ("q8_0", 2e-2)])
def test_lower_precision_kl(tmp_path, llama_toolchain, trained_testbed_dir, parity_ids, reference_logits,
                            outtype, bound):
    out = tmp_path / "model.gguf"
    convert(trained_testbed_dir, out, outtype_chooser(outtype), progress=False)
    stats = kl_stats(reference_logits, llama_logits(llama_toolchain, out, parity_ids))
    print(f"{outtype}: {stats}")
    assert stats.mean < bound, stats
    assert stats.top1_agreement > 0.9


def _reference_tensor(reader: CheckpointReader, lay: GlmLayout, t) -> torch.Tensor:
    """The documented transform, written independently of the converter."""
    srcs = [reader.get(s).float() for s in t.sources]
    if t.transform is Transform.STACK_EXPERTS:
        return torch.stack(srcs)
    if t.transform in (Transform.SPLIT_K_B, Transform.SPLIT_V_B):
        nope, v = lay.qk_nope_head_dim, lay.v_head_dim
        kv = srcs[0].reshape(lay.n_heads, nope + v, lay.kv_lora_rank)
        return kv[:, :nope].permute(0, 2, 1) if t.transform is Transform.SPLIT_K_B else kv[:, nope:]
    return srcs[0]


@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_round_trip(tmp_path, tiny_testbed_dir, outtype):
    out = tmp_path / "model.gguf"
    convert(tiny_testbed_dir, out, outtype_chooser(outtype), indexer=IndexerMode.DUPLICATE, progress=False)
    ckpt = open_checkpoint(tiny_testbed_dir)
    plan = {t.name: t for t in plan_tensors(ckpt, indexer=IndexerMode.DUPLICATE)}
    reader = GGUFReader(out)
    assert {t.name for t in reader.tensors} == set(plan)
    for rt in reader.tensors:
        t = plan[rt.name]
        ref = _reference_tensor(ckpt.reader, ckpt.layout, t)
        got = torch.from_numpy(np.array(quants.dequantize(rt.data, rt.tensor_type))).reshape(ref.shape)
        if t.always_f32:
            assert rt.tensor_type is Q.F32, rt.name
        if rt.tensor_type in (Q.F32, Q.BF16):  # source is BF16: both are exact
            assert torch.equal(got.float(), ref), rt.name
        else:
            assert rt.tensor_type is Q.Q8_0
            blocks = ref.reshape(-1, 32)
            err = (got.reshape(-1, 32) - blocks).abs().max(-1).values
            # half a step of d = amax/127, plus the fp16 rounding of d itself (127 * 2^-11 relative)
            assert torch.all(err <= blocks.abs().max(-1).values / 127 * 0.57 + 1e-7), rt.name


def _kv(reader: GGUFReader, key: str):
    field = reader.fields[key]
    vals = [field.parts[i].tolist() for i in field.data]
    if field.types and field.types[0].name == "STRING":
        return bytes(field.parts[field.data[0]]).decode()
    flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in vals]
    return flat if len(flat) > 1 or field.types[0].name == "ARRAY" else flat[0]


def test_metadata(tmp_path, tiny_testbed_dir):
    out = tmp_path / "model.gguf"
    convert(tiny_testbed_dir, out, outtype_chooser("bf16"), progress=False)
    cfg = json.loads((tiny_testbed_dir / "config.json").read_text())
    r = GGUFReader(out)
    assert _kv(r, "general.architecture") == "glm-dsa"
    assert _kv(r, "glm-dsa.block_count") == cfg["num_hidden_layers"] + 1
    assert _kv(r, "glm-dsa.nextn_predict_layers") == 1
    assert _kv(r, "glm-dsa.expert_count") == cfg["n_routed_experts"]
    assert _kv(r, "glm-dsa.attention.indexer.types") == [t == "full" for t in cfg["indexer_types"]]
    assert _kv(r, "glm-dsa.attention.key_length_mla") == cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    assert _kv(r, "glm-dsa.expert_gating_func") == 2
    assert _kv(r, "tokenizer.ggml.pre") == "glm4"
    assert _kv(r, "tokenizer.ggml.model") == "gpt2"
    tok = json.loads((tiny_testbed_dir / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert _kv(r, "tokenizer.ggml.bos_token_id") == ids["[gMASK]"]
    assert _kv(r, "tokenizer.ggml.eot_token_id") == ids["<|user|>"]
    assert "tokenizer.chat_template" in r.fields
    # MTP block present with its nextn tensors; no indexer tensors on shared layers in native mode
    names = {t.name for t in r.tensors}
    n = cfg["num_hidden_layers"]
    assert f"blk.{n}.nextn.eh_proj.weight" in names
    for i, kind in enumerate(cfg["indexer_types"]):
        assert (f"blk.{i}.indexer.attn_k.weight" in names) == (kind == "full")


def test_mtp_modes(tmp_path, tiny_testbed_dir):
    n = json.loads((tiny_testbed_dir / "config.json").read_text())["num_hidden_layers"]
    drop, only = tmp_path / "drop.gguf", tmp_path / "only.gguf"
    convert(tiny_testbed_dir, drop, outtype_chooser("bf16"), MtpMode.DROP, progress=False)
    convert(tiny_testbed_dir, only, outtype_chooser("bf16"), MtpMode.ONLY, progress=False)
    rd, ro = GGUFReader(drop), GGUFReader(only)
    assert _kv(rd, "glm-dsa.block_count") == n and "glm-dsa.nextn_predict_layers" not in rd.fields
    assert not any(t.name.startswith(f"blk.{n}.") for t in rd.tensors)
    assert {t.name.split(".")[1] for t in ro.tensors if t.name.startswith("blk.")} == {str(n)}
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= {t.name for t in ro.tensors}


# --- bad input: one clear error line, nothing left behind ---------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _rename_expert(d: Path) -> None:
    """Rename expert 0 of layer 1 to an id beyond the count, in the shard header and the index."""
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    old = "model.layers.1.mlp.experts.0.up_proj.weight"
    new = "model.layers.1.mlp.experts.99.up_proj.weight"
    shard = d / idx["weight_map"].pop(old)
    idx["weight_map"][new] = shard.name
    idx_path.write_text(json.dumps(idx))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode().replace(old, new)
    header += " " * (n - len(header))
    shard.write_bytes(raw[:8] + header.encode() + raw[8 + n:])


def _poison(d: Path) -> None:
    """Write a NaN into the first float of model.norm.weight (BF16 0x7FC0)."""
    info = CheckpointReader(d).info("model.norm.weight")
    with open(info.shard, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\xc0\x7f")


BAD_INPUTS = {
    "missing shard": (lambda d: _shards(d)[1].unlink(), "missing shard"),
    "truncated shard": (lambda d: _shards(d)[0].write_bytes(_shards(d)[0].read_bytes()[:-100]), "truncated"),
    "corrupt header": (lambda d: _shards(d)[0].write_bytes(b"\xff" * 64), "corrupt"),
    "wrong architecture": (lambda d: _edit_config(d, architectures=["LlamaForCausalLM"]), "is not GlmMoeDsa"),
    "config disagrees": (lambda d: _edit_config(d, moe_intermediate_size=128), "config and weights disagree"),
    "experts misnumbered": (_rename_expert, "numbered 0.."),
    "nan weights": (_poison, "NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(tmp_path, tiny_testbed_dir, case):
    damage, message = BAD_INPUTS[case]
    src = _copy(tiny_testbed_dir, tmp_path / "src")
    damage(src)
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and message in lines[-1], result.output
    assert not out.exists() and not (tmp_path / "out.gguf.partial").exists()


def test_allow_nonfinite_warns(tmp_path, tiny_testbed_dir):
    src = _copy(tiny_testbed_dir, tmp_path / "src")
    _poison(src)
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), str(out), "--allow-nonfinite"])
    assert result.exit_code == 0, result.output
    assert "warning: model.norm.weight has 1 NaN/Inf values" in result.output
    norm = next(t for t in GGUFReader(out).tensors if t.name == "output_norm.weight")
    assert math.isnan(float(norm.data[0]))


def test_existing_output_needs_force(tmp_path, tiny_testbed_dir):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["convert", str(tiny_testbed_dir), str(out)])
    assert result.exit_code == 1 and "already exists" in result.output
    assert out.read_bytes() == b"keep me"
    result = CliRunner().invoke(main, ["convert", str(tiny_testbed_dir), str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_chunks_match_whole_tensor_encoding(tiny_testbed_dir):
    """Streaming experts one by one yields the same bytes as encoding the stacked tensor."""
    ckpt = open_checkpoint(tiny_testbed_dir)
    t = next(t for t in plan_tensors(ckpt) if t.transform is Transform.STACK_EXPERTS)
    t.ggml_type = Q.Q8_0
    streamed = np.concatenate(list(tensor_chunks(ckpt, t)))
    whole = quants.quantize(_reference_tensor(ckpt.reader, ckpt.layout, t).reshape(-1, t.row_size).numpy(), Q.Q8_0)
    assert np.array_equal(streamed, whole.reshape(-1))


@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_row_blocks_match_whole_tensor_encoding(tmp_path, monkeypatch, tiny_testbed_dir, tiny_fp8_testbed_dir,
                                                source):
    """Sources above ROW_CHUNK_BYTES (GLM-5.2's 3.8 GB embedding and head as float32) are read and quantized in
    row blocks, FP8 weights in whole 128-row scale blocks: the same bytes as one whole-tensor pass."""
    import glmgguf.gguf.convert as conv

    src = tiny_fp8_testbed_dir if source == "fp8" else tiny_testbed_dir
    whole = convert(src, tmp_path / "whole.gguf", outtype_chooser("q8_0"), progress=False).path
    monkeypatch.setattr(conv, "ROW_CHUNK_BYTES", 64 * 1024)
    ckpt = open_checkpoint(src)
    assert any(len(conv._row_ranges(ckpt, n)) > 1 for n in ckpt.reader.names() if ckpt.reader.is_fp8(n)) \
        or source == "bf16"
    blocked = convert(src, tmp_path / "blocked.gguf", outtype_chooser("q8_0"), progress=False).path
    a, b = GGUFReader(whole).tensors, GGUFReader(blocked).tensors
    assert [t.name for t in a] == [t.name for t in b]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a, b, strict=True))
