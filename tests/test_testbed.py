"""The testbed model: GLM-5.2 layout, loadability, determinism, tokenizer and chat template, training report."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from glmgguf.io import CheckpointReader
from glmgguf.testbed import (
    SPECIAL_TOKENS,
    TESTBED_SIZES,
    build_testbed,
    expected_tensor_names,
    new_testbed_model,
    read_report,
    special_token_ids,
    trained_testbed,
)
from glmgguf.testbed.tokenizer import GLM4_SPLIT_REGEX, VOCAB_SIZE


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _code_ids(tok, n_tokens: int = 96) -> torch.Tensor:
    text = "import os\nimport sys\n\n\ndef main(argv):\n    for i, a in enumerate(argv):\n        print(i, a)\n" * 8
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


# ------------------------------------------------------------------------------------------------------ config


def test_config_fields(tiny_testbed_dir):
    cfg = json.loads((tiny_testbed_dir / "config.json").read_text())
    assert cfg["architectures"] == ["GlmMoeDsaForCausalLM"]
    assert cfg["model_type"] == "glm_moe_dsa"
    assert cfg["dtype"] == "bfloat16"
    assert cfg["num_nextn_predict_layers"] == 1
    assert len(cfg["indexer_types"]) == cfg["num_hidden_layers"]
    assert {"full", "shared"} == set(cfg["indexer_types"]) and cfg["indexer_types"][0] == "full"
    assert cfg["vocab_size"] == VOCAB_SIZE
    ids = special_token_ids()
    assert cfg["eos_token_id"] == [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    assert cfg["pad_token_id"] == ids["<|endoftext|>"]
    # sparse selection is really used for sequences of 64+ tokens
    assert cfg["index_topk"] < 64 and cfg["index_head_dim"] % 64 == 0 and cfg["index_n_heads"] >= 16
    # rows that llama.cpp's K-quants need: multiples of 256
    for key in ("hidden_size", "moe_intermediate_size", "intermediate_size"):
        assert cfg[key] % 256 == 0
    gen = json.loads((tiny_testbed_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_sizes_are_valid_configs():
    from transformers import GlmMoeDsaConfig

    types = {size: GlmMoeDsaConfig(**kw).indexer_types for size, kw in TESTBED_SIZES.items()}
    assert types["tiny"] == ["full", "shared", "full", "shared"]
    # GLM-5.2's schedule (index_topk_freq 4, index_skip_topk_offset 3): layers 0, 1, 2, 6, ... run the indexer
    assert types["small"] == ["full", "full", "full", "shared", "shared", "shared", "full", "shared"]


# ------------------------------------------------------------------------------------------------------ layout


def test_tensor_layout_matches_glm52(tiny_testbed_dir):
    reader = CheckpointReader(tiny_testbed_dir)
    cfg = reader.config
    names = reader.names()
    expected = expected_tensor_names(cfg)
    assert len(names) == len(set(names))
    assert set(names) == set(expected)
    n = cfg["num_hidden_layers"]
    mtp = f"model.layers.{n}."
    for suffix in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                   "mlp.gate.e_score_correction_bias", "self_attn.indexer.wk.weight",
                   f"mlp.experts.{cfg['n_routed_experts'] - 1}.down_proj.weight"):
        assert mtp + suffix in reader
    # as released: the MTP layer reuses lm_head and model.embed_tokens
    assert mtp + "shared_head.head.weight" not in reader and mtp + "embed_tokens.weight" not in reader
    # the release's config keys
    assert (cfg["index_topk_freq"], cfg["index_skip_topk_offset"], cfg["index_topk_pattern"]) == (2, 1, None)
    assert cfg["indexer_rope_interleave"] is cfg["rope_interleave"] is cfg["index_share_for_mtp_iteration"] is True
    assert "bos_token_id" not in cfg and cfg["mlp_layer_types"] == ["dense"] + ["sparse"] * (n - 1)
    # shared layers carry no indexer tensors
    for i, t in enumerate(cfg["indexer_types"]):
        assert (f"model.layers.{i}.self_attn.indexer.wk.weight" in reader) == (t == "full")
    for name in names:
        info = reader.info(name)
        want = "F32" if name.endswith("e_score_correction_bias") else "BF16"
        assert info.dtype == want, name
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    assert reader.info(mtp + "eh_proj.weight").shape == (h, 2 * h)
    assert reader.info("lm_head.weight").shape == (v, h)
    assert reader.info("model.layers.1.mlp.experts.0.gate_proj.weight").shape == (cfg["moe_intermediate_size"], h)
    assert reader.info("model.layers.1.mlp.experts.0.down_proj.weight").shape == (h, cfg["moe_intermediate_size"])
    # several shards with an index; tensors stored layer by layer, the MTP block last
    shards = sorted({reader.info(nm).shard.name for nm in names})
    assert len(shards) >= 3 and (tiny_testbed_dir / "model.safetensors.index.json").is_file()
    layer_of = [int(nm.split(".")[2]) for nm in names if nm.startswith("model.layers.")]
    assert layer_of == sorted(layer_of) and layer_of[-1] == n
    # every tensor is non-trivial
    for name in names:
        t = reader.get(name).float()
        assert torch.isfinite(t).all() and t.std() > 0, name
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_testbed_dir / name).is_file()


def test_matches_save_pretrained_names(tiny_testbed_dir, tmp_path):
    model, _ = new_testbed_model("tiny", 0)
    model.save_pretrained(tmp_path / "hf")
    hf = CheckpointReader(tmp_path / "hf")
    ours = CheckpointReader(tiny_testbed_dir)
    n = ours.config["num_hidden_layers"]
    trunk = {nm for nm in ours.names() if not nm.startswith(f"model.layers.{n}.")}
    assert set(hf.names()) == trunk
    for name in ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                 "model.layers.2.mlp.experts.0.down_proj.weight"):
        assert torch.equal(hf.get(name).to(torch.bfloat16), ours.get(name))


# ------------------------------------------------------------------------------------------------------ loading


def test_loads_with_transformers_and_matches_in_memory_model(tiny_testbed_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_testbed_dir, dtype=torch.float32)
    assert type(model).__name__ == "GlmMoeDsaForCausalLM"
    tok = AutoTokenizer.from_pretrained(tiny_testbed_dir)
    ids = _code_ids(tok)  # longer than index_topk: sparse attention is active
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    # the same weights in memory (rounded to BF16) give the same logits: expert gate/up split is right
    ref, _ = new_testbed_model("tiny", 0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        ref.config._attn_implementation = model.config._attn_implementation
        assert torch.allclose(ref(ids).logits, logits, atol=1e-5, rtol=0)


def test_routing_bias_matters():
    model, _ = new_testbed_model("tiny", 0)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(512, model.config.hidden_size)
    scores = (x @ gate.weight.T).sigmoid()
    with_bias = (scores + gate.e_score_correction_bias).topk(gate.top_k).indices.sort().values
    without = scores.topk(gate.top_k).indices.sort().values
    flipped = (with_bias != without).any(-1).float().mean().item()
    assert 0.02 < flipped < 0.9
    assert gate.e_score_correction_bias.abs().min() > 0


# ------------------------------------------------------------------------------------------------------ determinism


def test_build_is_deterministic(tiny_testbed_dir, tmp_path):
    again = build_testbed(tmp_path / "again", size="tiny", seed=0)
    assert _digests(again) == _digests(tiny_testbed_dir)
    other = build_testbed(tmp_path / "other", size="tiny", seed=1)
    d0, d1 = _digests(tiny_testbed_dir), _digests(other)
    assert d0["tokenizer.json"] == d1["tokenizer.json"]
    assert d0["model-00001-of-00009.safetensors"] != d1["model-00001-of-00009.safetensors"]


def test_build_refuses_existing_output(tiny_testbed_dir):
    from glmgguf.io.atomic import OutputExistsError

    with pytest.raises(OutputExistsError):
        build_testbed(tiny_testbed_dir, size="tiny", seed=0)


# ------------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_roundtrip_and_special_ids(tiny_testbed_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_testbed_dir)
    assert len(tok) == VOCAB_SIZE
    ids = special_token_ids()
    assert sorted(ids.values()) == list(range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE))
    for t, i in ids.items():
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == ids["<|endoftext|>"]
    assert tok.encode("x = 1", add_special_tokens=True) == tok.encode("x = 1", add_special_tokens=False)
    for text in ["def f(x):\n    return x ** 2  # square\n", "héllo wörld 世界 🙂\r\n\t tabs  and   spaces",
                 "It's 12345 o'clock, they'll say", "<think>a</think>[gMASK]<sop><|user|>\nq"]:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc) == text
    # code is compressed: BPE merges learned from the standard library
    code = "    def __init__(self, *args, **kwargs):\n        super().__init__()\n"
    assert len(tok.encode(code, add_special_tokens=False)) < len(code) / 2.5


def test_tokenizer_json_is_glm_style(tiny_testbed_dir):
    data = json.loads((tiny_testbed_dir / "tokenizer.json").read_text())
    pre = data["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    split, byte_level = pre["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == GLM4_SPLIT_REGEX
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert byte_level["type"] == "ByteLevel"
    assert byte_level["use_regex"] is False and byte_level["add_prefix_space"] is False
    assert data["model"]["type"] == "BPE" and data["model"]["ignore_merges"] is True
    assert len(data["model"]["vocab"]) == VOCAB_SIZE - len(SPECIAL_TOKENS)
    added = {a["content"]: a for a in data["added_tokens"]}
    assert added["[gMASK]"]["special"] and added["<|user|>"]["special"]
    assert not added["<think>"]["special"]  # tags stay visible to reasoning / tool-call parsers


def test_chat_template_renders(tiny_testbed_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_testbed_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    out = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello!"
                   "<|user|>\nWeather in Paris?<|assistant|>")
    no_think = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
    assert no_think.endswith("<|user|>\nHi<|assistant|>\n<think></think>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    convo = msgs + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "The tool said sunny."},
    ]
    full = tok.apply_chat_template(convo, tools=tools, tokenize=False)
    assert full.startswith("[gMASK]<sop><|system|>\n# Tools")
    assert '"name": "get_weather"' in full
    assert ("<|assistant|>\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
            "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
            "<|observation|>\n<tool_response>\nsunny\n</tool_response>"
            "<|assistant|>\n<think>The tool said sunny.</think>\nSunny.") in full
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    sid = special_token_ids()
    assert ids[:3] == [sid["[gMASK]"], sid["<sop>"], sid["<|system|>"]] and ids[-1] == sid["<|assistant|>"]


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_builds_and_summarizes(tmp_path):
    from click.testing import CliRunner

    from glmgguf.cli import main

    out = tmp_path / "tb"
    res = CliRunner().invoke(main, ["testbed", str(out), "--size", "tiny", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "parameters:" in res.output and "shard(s)" in res.output
    assert (out / "config.json").is_file()
    res = CliRunner().invoke(main, ["testbed", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output


# ------------------------------------------------------------------------------------------------------ trained


@pytest.mark.slow
def test_trained_model_specializes(trained_testbed_dir):
    report = read_report(trained_testbed_dir)
    before, after = report["before"], report["after"]
    assert after["heldout_loss"] < before["heldout_loss"] - 1.0
    assert after["mtp_heldout_loss"] < before["mtp_heldout_loss"]
    assert set(before["expert_load_entropy"]) == set(after["expert_load_entropy"])
    for layer, ent in before["expert_load_entropy"].items():
        assert after["expert_load_entropy"][layer] < ent, layer


@pytest.mark.slow
def test_trained_model_layout_and_cache(trained_testbed_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = CheckpointReader(trained_testbed_dir)
    assert set(reader.names()) == set(expected_tensor_names(reader.config))
    model = AutoModelForCausalLM.from_pretrained(trained_testbed_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(trained_testbed_dir)
    ids = _code_ids(tok)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all() and out.loss.item() < 6.0
    t0 = time.perf_counter()
    assert trained_testbed("tiny") == trained_testbed_dir
    assert time.perf_counter() - t0 < 10


def test_release_config_keys_understood():
    """GLM-5.2's config.json as published: every key parses; switches with another value are refused."""
    from glmgguf.layout import GlmLayout, LayoutError

    path = Path(__file__).resolve().parent.parent / "examples" / "glm52_fp8_config.json"
    cfg = json.loads(path.read_text())
    lay = GlmLayout.from_config(cfg)
    full = [x.index for x in lay.layers if x.indexer == "full"]
    assert full[:5] == [0, 1, 2, 6, 10] and len(full) == 21  # the release's 21 full-indexer layers
    assert lay.block_count == 79 and lay.moe_layers[-1].is_mtp and lay.moe_layers[-1].n_experts == 256
    assert "bos_token_id" not in cfg and cfg["head_dim"] == 192  # ignored: the MLA dims are used
    for key, bad in (("rope_interleave", False), ("indexer_rope_interleave", False), ("scoring_func", "softmax"),
                     ("topk_method", "greedy")):
        with pytest.raises(LayoutError, match=key):
            GlmLayout.from_config({**cfg, key: bad})
