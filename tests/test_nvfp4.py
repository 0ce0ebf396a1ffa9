"""NVFP4: bit-exactness with nvidia-modelopt, export (ModelOpt and compressed-tensors layouts), dequantized
accuracy, serving-engine loadability (structural), bad input."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from glmgguf.checkpoint import open_checkpoint
from glmgguf.io import CheckpointReader
from glmgguf.layout import GlmLayout, LayerKind, Role, parse_hf_name
from glmgguf.nvfp4 import quant as nq
from glmgguf.nvfp4.dequantize import dequantize_export
from glmgguf.nvfp4.export import MANIFEST_NAME, ExportError, export_nvfp4, plan_export
from glmgguf.nvfp4.formats import HF_QUANT_CONFIG, summarize_exclude

pytestmark = pytest.mark.usefixtures("one_torch_thread")


MODELOPT_NVFP4 = "modelopt.torch.quantization.qtensor.nvfp4_tensor"


def load_modelopt_nvfp4() -> type:
    """ModelOpt's NVFP4QTensor. Skips only when nvidia-modelopt is not installed; an installed but broken one
    (an import error inside it, a moved class) fails the test, so the bit-exactness tests cannot silently vanish."""
    import importlib
    import importlib.util
    import warnings

    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (the `test` extra installs it)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(MODELOPT_NVFP4).NVFP4QTensor
    except Exception as e:  # noqa: BLE001 - any failure of an installed modelopt is a test failure
        pytest.fail(f"nvidia-modelopt is installed but {MODELOPT_NVFP4}.NVFP4QTensor cannot be loaded: {e!r}")


@pytest.fixture(scope="module")
def modelopt_nvfp4():
    """ModelOpt's NVFP4QTensor (the reference quantizer; the `test` extra installs nvidia-modelopt)."""
    return load_modelopt_nvfp4()


def test_broken_modelopt_fails_and_missing_modelopt_skips(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # modelopt installed ...
    monkeypatch.setitem(sys.modules, MODELOPT_NVFP4, None)  # ... but its NVFP4 module cannot be imported
    with pytest.raises(pytest.fail.Exception, match="installed but"):
        load_modelopt_nvfp4()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        load_modelopt_nvfp4()


def _assert_same_as_modelopt(ref_cls, w: torch.Tensor, s2: torch.Tensor | None = None) -> nq.Nvfp4Weight:
    """Our packed weight, block scales and global scale equal ModelOpt's bytes for the same weight_scale_2."""
    s2 = nq.global_scale(nq.amax(w)) if s2 is None else s2
    ours = nq.quantize(w, s2)
    q, scale, scale_2 = ref_cls.quantize(w.clone(), nq.BLOCK_SIZE, weights_scaling_factor_2=s2.clone())
    assert torch.equal(ours.weight, q._quantized_data)
    assert torch.equal(ours.weight_scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours.weight_scale_2.view(torch.int32), scale_2.float().reshape(()).view(torch.int32))
    deq = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: nq.BLOCK_SIZE})
    assert torch.equal(ours.dequantize(), deq)
    return ours


# ---------------------------------------------------------------------------------------------------------------
# Quantization math
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_weights_match_modelopt(modelopt_nvfp4, dtype):
    gen = torch.Generator().manual_seed(0)
    # heavy-tailed rows and columns: block scales over the whole e4m3 range, clamped ones included
    w = torch.randn(96, 512, generator=gen) * torch.logspace(-4, 1, 96).unsqueeze(1)
    w[:, ::37] *= 20
    _assert_same_as_modelopt(modelopt_nvfp4, w.to(dtype))
    _assert_same_as_modelopt(modelopt_nvfp4, torch.randn(3, 4096, generator=gen).to(dtype))


def test_global_scale_is_modelopts(modelopt_nvfp4):
    w = torch.randn(64, 256).bfloat16()
    assert torch.equal(nq.global_scale(nq.amax(w)), modelopt_nvfp4.get_weights_scaling_factor_2(w))


def test_all_zero_blocks_and_tensors(modelopt_nvfp4):
    w = torch.randn(8, 64).bfloat16()
    w[0] = 0
    w[3, 16:48] = 0
    w[5, :16] = -0.0
    ours = _assert_same_as_modelopt(modelopt_nvfp4, w)
    assert ours.weight_scale[0].float().eq(1.0).all()  # an all-zero block gets scale 1.0 ...
    assert ours.weight[0].eq(0).all()  # ... and code 0
    # an all-zero tensor: ModelOpt's own default would give NaN scales; ours gives amax := 1 (zeros after dequant)
    z = torch.zeros(4, 32, dtype=torch.bfloat16)
    assert float(nq.global_scale(nq.amax(z))) == pytest.approx(1 / 2688)
    zq = _assert_same_as_modelopt(modelopt_nvfp4, z)
    assert zq.dequantize().eq(0).all() and zq.weight.eq(0).all()


def test_saturation(modelopt_nvfp4):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=gen).bfloat16()
    # a global scale 10x too small: block scales clamp at 448 and the largest values saturate at +-6
    small = nq.global_scale(nq.amax(w)) / 10
    ours = _assert_same_as_modelopt(modelopt_nvfp4, w, small)
    codes = nq.unpack_codes(ours.weight)
    assert ((codes & 7) == 7).any() and ours.weight_scale.float().eq(448).any()


def test_ties_round_to_even(modelopt_nvfp4):
    # weight_scale_2 = 2^-8 and a block amax of 6 * 2^-8 give block scale exactly 1: the scaled values are exact
    s2 = torch.tensor(2.0**-8)
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = torch.tensor([6.0] + mids + [-m for m in mids] + [0.1]) * 2.0**-8
    ours = _assert_same_as_modelopt(modelopt_nvfp4, row.reshape(1, 16), s2)
    codes = nq.unpack_codes(ours.weight)[0].tolist()
    # 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0 (even codes), negatives with sign bit
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]


def test_tiny_amax(modelopt_nvfp4):
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-12, 1e-30):
        _assert_same_as_modelopt(modelopt_nvfp4, (torch.randn(4, 64, generator=gen) * scale).float())
    _assert_same_as_modelopt(modelopt_nvfp4, (torch.randn(4, 64, generator=gen) * 1e-30).bfloat16())
    w = torch.randn(4, 64, generator=gen).bfloat16()
    w[1] *= 1e-20  # blocks far below the tensor amax: scale clamped at 2^-9, values flush to (signed) zero
    ours = _assert_same_as_modelopt(modelopt_nvfp4, w)
    assert ours.weight_scale[1].float().eq(2.0**-9).all()
    with pytest.raises(nq.Nvfp4Error):
        nq.global_scale(torch.tensor(1e-44))


def test_shared_scale_pair_matches_modelopt(modelopt_nvfp4):
    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(64, 128, generator=gen).bfloat16(), (3 * torch.randn(64, 128, generator=gen)).bfloat16()
    s2 = nq.global_scale(torch.maximum(nq.amax(gate), nq.amax(up)))
    _assert_same_as_modelopt(modelopt_nvfp4, gate, s2)
    _assert_same_as_modelopt(modelopt_nvfp4, up, s2)


def _expert_weights(path, limit: int):
    reader = CheckpointReader(path)
    names = [n for n in reader.names() if (p := parse_hf_name(n)) is not None
             and p.rule.role in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)]
    return [reader.get(n) for n in sorted(names)[:limit]]


@pytest.mark.parametrize("which", ["tiny_testbed_dir", "trained_testbed_dir"])
def test_real_weights_match_modelopt(modelopt_nvfp4, which, request):
    for w in _expert_weights(request.getfixturevalue(which), 12):
        _assert_same_as_modelopt(modelopt_nvfp4, w)


def test_dequantize_within_error_bound():
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(128, 256, generator=gen) * torch.logspace(-3, 0, 128).unsqueeze(1)).bfloat16()
    for s2 in (None, nq.global_scale(nq.amax(w)) / 4):  # own scale, and a saturating one
        q = nq.quantize(w, s2)
        err = (q.dequantize() - w.float()).abs()
        assert (err <= nq.error_bound(q.weight_scale, q.weight_scale_2, w)).all()


def test_chunking_does_not_change_bytes():
    w = torch.randn(100, 96).bfloat16()
    a, b = nq.quantize(w), nq.quantize(w, chunk_elements=96 * 7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale.view(torch.uint8),
                                                           b.weight_scale.view(torch.uint8))


def test_rejects_bad_weights():
    with pytest.raises(nq.Nvfp4Error, match="multiple of 16"):
        nq.quantize(torch.randn(4, 24))
    with pytest.raises(nq.Nvfp4Error, match="inf or NaN"):
        nq.quantize(torch.tensor([[float("nan")] + [0.0] * 15]), torch.tensor(1.0))
    with pytest.raises(nq.Nvfp4Error, match="2-D"):
        nq.quantize(torch.randn(16))
    with pytest.raises(nq.Nvfp4Error):
        nq.input_scale(0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bytes_equal_cpu():
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(512, 1024, generator=gen) * torch.logspace(-5, 1, 512).unsqueeze(1)).bfloat16()
    w[7] = 0
    cpu = nq.quantize(w)
    gpu = nq.quantize(w.cuda())
    assert torch.equal(cpu.weight, gpu.weight.cpu())
    assert torch.equal(cpu.weight_scale.view(torch.uint8), gpu.weight_scale.cpu().view(torch.uint8))
    assert torch.equal(cpu.weight_scale_2, gpu.weight_scale_2.cpu())


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

PACKED = {"gate_up_proj": ["gate_proj", "up_proj"], "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}


@pytest.fixture(scope="module")
def calib_stats(trained_testbed_dir, tmp_path_factory):
    """REAP statistics of the trained testbed (4 x 64 tokens: a few experts are never routed)."""
    from transformers import AutoTokenizer

    from glmgguf.reap.data import pack
    from glmgguf.reap.observe import observe
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(trained_testbed_dir)
    seqs = pack([d[:4000] for d in stdlib_corpus("train")[:20]], tok, 64, num_samples=4, seed=1).sequences
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = observe(trained_testbed_dir, chunk_sequences(seqs, 4), streaming=False, dtype=torch.float32)
    finally:
        torch.set_num_threads(prev)
    path = tmp_path_factory.mktemp("nvfp4") / "stats.safetensors"
    stats.save(path)
    return path


def _export(src, stats, out, fmt="modelopt", **kw):
    plan = plan_export(src, [stats], fmt=fmt, exclude=kw.pop("exclude", ()))
    return export_nvfp4(plan, out, threads=1, **kw)


@pytest.fixture(scope="module")
def modelopt_export(trained_testbed_dir, calib_stats, tmp_path_factory):
    return _export(trained_testbed_dir, calib_stats, tmp_path_factory.mktemp("nvfp4") / "modelopt",
                   max_shard_bytes=8 * 2**20)


@pytest.fixture(scope="module")
def ct_export(trained_testbed_dir, calib_stats, tmp_path_factory):
    return _export(trained_testbed_dir, calib_stats, tmp_path_factory.mktemp("nvfp4") / "ct", "compressed-tensors")


def _expert_modules(layout: GlmLayout):
    for layer in layout.moe_layers:
        for e in range(layer.n_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield layer.index, e, proj, f"model.layers.{layer.index}.mlp.experts.{e}.{proj}"


def _bf16_linear_modules(layout: GlmLayout, mtp_indexer: bool) -> set[str]:
    """Module names (HF's and the fused ones vLLM/SGLang build) of every 2-D weight that stays BF16."""
    out = set()
    for name, shape in layout.expected_hf_tensors(mtp_indexer=mtp_indexer).items():
        p = parse_hf_name(name)
        if len(shape) == 2 and p.rule.role not in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN):
            out.add(name.rsplit(".", 1)[0])
    for layer in layout.layers:
        pre = f"model.layers.{layer.index}."
        out.add(pre + "self_attn.fused_qkv_a_proj")
        out.add(pre + ("mlp.gate_up_proj" if layer.kind is LayerKind.DENSE else "mlp.shared_experts.gate_up_proj"))
    return out


def _vllm_modelopt_excluded(prefix: str, patterns: list[str], expand: bool) -> bool:
    """vLLM's ModelOptQuantConfigBase.is_layer_excluded (exact with fused shards, substring, fnmatch)."""
    if expand:  # apply_vllm_mapper: `x*` -> `x`, `x.*`
        patterns = [q for p in patterns for q in ((p[:-1], p[:-1] + ".*") if len(p) >= 2 and p[-1] == "*"
                                                   and p[-2] != "." else (p,))]
    last = prefix.rsplit(".", 1)[-1]
    if last in PACKED:
        shards = [prefix[: -len(last)] + s for s in PACKED[last]]
        if all(s in patterns for s in shards):
            return True
    elif prefix in patterns:
        return True
    if any(p != prefix and p in prefix for p in patterns):
        return True
    return any(fnmatch.fnmatch(prefix, p) for p in patterns)


def _sglang_excluded(prefix: str, patterns: list[str]) -> bool:
    """SGLang's ModelOptFp4Config: is_layer_skipped (exact, fused shards) or a `*`-wildcard full match."""
    last = prefix.rsplit(".", 1)[-1]
    names = [prefix[: -len(last)] + s for s in PACKED[last]] if last in PACKED else [prefix]
    if all(n in patterns for n in names):
        return True
    return any(re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), prefix) for p in patterns)


def _ct_ignored(prefix: str, ignore: list[str]) -> bool:
    """compressed-tensors ignore semantics in vLLM (exact names or `re:` regexes; fused: every shard)."""
    last = prefix.rsplit(".", 1)[-1]
    names = [prefix[: -len(last)] + s for s in PACKED[last]] if last in PACKED else [prefix]

    def hit(n):
        return any(re.match(p[3:], n) if p.startswith("re:") else p == n for p in ignore)
    return all(hit(n) for n in names)


def test_modelopt_export_structure(modelopt_export, trained_testbed_dir, calib_stats):
    from glmgguf.reap.stats import ReapStats

    out = modelopt_export.out
    src = open_checkpoint(trained_testbed_dir)
    layout, srd = src.layout, src.reader
    rd = CheckpointReader(out)
    assert (out / "model.safetensors.index.json").is_file() and len({i.shard for i in rd.tensors.values()}) > 1
    expected = set()
    for _, _, _, mod in _expert_modules(layout):
        n, k = layout.hf_shape(parse_hf_name(f"{mod}.weight").rule)
        for suffix, dtype, shape in (("weight", "U8", (n, k // 2)), ("weight_scale", "F8_E4M3", (n, k // 16)),
                                     ("weight_scale_2", "F32", ()), ("input_scale", "F32", ())):
            info = rd.info(f"{mod}.{suffix}")
            assert (info.dtype, info.shape) == (dtype, shape), f"{mod}.{suffix}"
            expected.add(f"{mod}.{suffix}")
        for suffix in ("weight_scale_2", "input_scale"):
            v = float(rd.get(f"{mod}.{suffix}"))
            assert math.isfinite(v) and v > 0
    for name in srd.names():
        if parse_hf_name(name).rule.role not in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN):
            expected.add(name)
            assert torch.equal(rd.get(name).view(torch.uint8), srd.get(name).view(torch.uint8)), name
    assert set(rd.names()) == expected  # nothing extra that a loader would not know
    # gate/up share both scales (vLLM/SGLang fuse them into w13 with one scale)
    stats = ReapStats.load(calib_stats)
    fallback = 0
    for layer in layout.moe_layers:
        L, t = layer.index, stats.layers[layer.index]
        routed = t["count"] > 0
        for e in range(layer.n_experts):
            pre = f"model.layers.{L}.mlp.experts.{e}."
            for s in ("weight_scale_2", "input_scale"):
                assert torch.equal(rd.get(pre + f"gate_proj.{s}"), rd.get(pre + f"up_proj.{s}"))
            amax = max(float(srd.get(pre + "gate_proj.weight").abs().max()),
                       float(srd.get(pre + "up_proj.weight").abs().max()))
            assert float(rd.get(pre + "gate_proj.weight_scale_2")) == pytest.approx(amax / 2688, rel=1e-6)
            want_in = float(t["input_amax"][e]) if routed[e] else float(t["input_amax"][routed].max())
            want_down = float(t["down_input_amax"][e]) if routed[e] else float(t["down_input_amax"][routed].max())
            assert float(rd.get(pre + "gate_proj.input_scale")) == pytest.approx(want_in / 2688, rel=1e-6)
            assert float(rd.get(pre + "down_proj.input_scale")) == pytest.approx(want_down / 2688, rel=1e-6)
            fallback += not bool(routed[e])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert fallback > 0 and manifest["n_input_scale_fallbacks"] == fallback
    assert manifest["quantized_layers"] == [x.index for x in layout.moe_layers]  # MTP block included
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (trained_testbed_dir / f).read_bytes()


def test_modelopt_configs_and_exclusions(modelopt_export, trained_testbed_dir):
    out = modelopt_export.out
    ckpt = open_checkpoint(trained_testbed_dir)
    hq = json.loads((out / HF_QUANT_CONFIG).read_text())
    assert hq["producer"]["name"] == "modelopt"
    q = hq["quantization"]
    # every key vLLM's and SGLang's modelopt_fp4 readers require
    assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16 and "kv_cache_quant_algo" in q
    assert q["kv_cache_quant_algo"] is None and isinstance(q["exclude_modules"], list) and q["exclude_modules"]
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4" and qc["group_size"] == 16
    assert qc["ignore"] == q["exclude_modules"] and qc["exclude_modules"] == q["exclude_modules"]
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == ckpt.reader.config
    patterns = q["exclude_modules"]
    for mod in _bf16_linear_modules(ckpt.layout, ckpt.mtp_indexer) | {"model.embed_tokens", "lm_head"}:
        assert _vllm_modelopt_excluded(mod, patterns, False), mod
        assert _vllm_modelopt_excluded(mod, patterns, True), mod
        assert _sglang_excluded(mod, patterns), mod
    for L, _, _, mod in _expert_modules(ckpt.layout):
        for name in (mod, f"model.layers.{L}.mlp.experts"):
            assert not _vllm_modelopt_excluded(name, patterns, False), name
            assert not _vllm_modelopt_excluded(name, patterns, True), name
            assert not _sglang_excluded(name, patterns), name


def test_summarize_exclude_like_modelopt():
    q = [f"model.layers.{L}.mlp.experts.0.gate_proj" for L in (3, 10, 12)]
    u = ["lm_head", "model.layers.1.self_attn.q_a_proj", "model.layers.3.mlp.gate", "model.layers.3.self_attn.o_proj",
         "model.layers.0.mlp.down_proj"]
    assert summarize_exclude(u, q) == ["lm_head", "model.layers.0*", "model.layers.1.*",
                                       "model.layers.3.mlp.gate", "model.layers.3.self_attn*"]
    from modelopt.torch.export.quant_utils import _prefix_wildcard_summarize_exclude_modules as ref

    assert summarize_exclude(u, q) == sorted(ref(u, q))


def test_dequantized_export_within_error_bound(modelopt_export, trained_testbed_dir):
    rd, srd = CheckpointReader(modelopt_export.out), CheckpointReader(trained_testbed_dir)
    layout = GlmLayout.from_dir(trained_testbed_dir)
    for _, _, _, mod in _expert_modules(layout):
        w = srd.get(f"{mod}.weight")
        scale, s2 = rd.get(f"{mod}.weight_scale"), rd.get(f"{mod}.weight_scale_2")
        deq = nq.dequantize(rd.get(f"{mod}.weight"), scale, s2)
        assert ((deq - w.float()).abs() <= nq.error_bound(scale, s2, w)).all(), mod


def test_compressed_tensors_layout(ct_export, modelopt_export, trained_testbed_dir):
    ct, mo = CheckpointReader(ct_export.out), CheckpointReader(modelopt_export.out)
    ckpt = open_checkpoint(trained_testbed_dir)
    for _, _, proj, mod in _expert_modules(ckpt.layout):
        assert torch.equal(ct.get(f"{mod}.weight_packed"), mo.get(f"{mod}.weight"))
        assert torch.equal(ct.get(f"{mod}.weight_scale").view(torch.uint8), mo.get(f"{mod}.weight_scale").view(
            torch.uint8))
        for c, m in (("weight_global_scale", "weight_scale_2"), ("input_global_scale", "input_scale")):
            g = ct.get(f"{mod}.{c}")
            assert g.shape == (1,) and g.dtype == torch.float32
            assert float(g) * float(mo.get(f"{mod}.{m}")) == pytest.approx(1.0, rel=1e-6)  # reciprocal
        if proj == "gate_proj":
            for c in ("weight_global_scale", "input_global_scale"):
                assert torch.equal(ct.get(f"{mod}.{c}"), ct.get(f"{mod.replace('gate_proj', 'up_proj')}.{c}"))
    assert f"{mod}.weight" not in ct
    qc = json.loads((ct_export.out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["weights"]["strategy"] == "tensor_group"
    assert group["weights"]["group_size"] == 16 and group["weights"]["num_bits"] == 4
    assert group["input_activations"]["dynamic"] == "local"
    assert not (ct_export.out / HF_QUANT_CONFIG).exists()
    for mod in _bf16_linear_modules(ckpt.layout, ckpt.mtp_indexer):
        assert _ct_ignored(mod, qc["ignore"]), mod
    for _, _, _, mod in _expert_modules(ckpt.layout):
        assert not _ct_ignored(mod, qc["ignore"])


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_dequantized_export_kl_in_transformers(fmt, modelopt_export, ct_export, trained_testbed_dir, tmp_path):
    """The exported testbed, experts dequantized, loaded in transformers: KL to the BF16 model (float32 compute)."""
    from transformers import AutoModelForCausalLM

    from glmgguf.parity import kl_stats
    from glmgguf.testbed.train import heldout_batch

    export = modelopt_export if fmt == "modelopt" else ct_export
    deq = dequantize_export(export.out, tmp_path / "deq")
    ids = heldout_batch(4, 128)[:, :-1]

    def logits(d):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(ids).logits.reshape(-1, model.config.vocab_size)

    stats = kl_stats(logits(trained_testbed_dir), logits(deq))
    print(f"NVFP4 experts ({fmt}) vs BF16: {stats}")
    assert stats.mean < 0.01 and stats.top1_agreement > 0.9


def test_w4a4_emulation_kl(modelopt_export, trained_testbed_dir, tmp_path):
    """Expert inputs fake-quantized to NVFP4 with the export's input scales, as the engines do on Blackwell."""
    from transformers import AutoModelForCausalLM

    from glmgguf.nvfp4.emulate import emulate_w4a4
    from glmgguf.parity import kl_stats
    from glmgguf.testbed.train import heldout_batch

    deq = dequantize_export(modelopt_export.out, tmp_path / "deq")
    ids = heldout_batch(4, 128)[:, :-1]

    def logits(model):
        with torch.no_grad():
            return model(ids).logits.reshape(-1, model.config.vocab_size)

    ref = logits(AutoModelForCausalLM.from_pretrained(trained_testbed_dir, dtype=torch.float32).eval())
    model = emulate_w4a4(AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval(), modelopt_export.out)
    stats = kl_stats(ref, logits(model))
    print(f"NVFP4 W4A4 (emulated engine activations) vs BF16: {stats}")
    assert stats.mean < 0.02 and stats.top1_agreement > 0.9
    for layer in model.model.layers:  # input scales 100x too small: activations saturate, the KL shows it
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.nvfp4_input_scale = layer.mlp.experts.nvfp4_input_scale / 100
    assert kl_stats(ref, logits(model)).mean > 5 * stats.mean


def test_exclude_mtp_experts(trained_testbed_dir, calib_stats, tmp_path):
    layout = GlmLayout.from_dir(trained_testbed_dir)
    mtp = layout.n_layers
    res = _export(trained_testbed_dir, calib_stats, tmp_path / "out", exclude=[f"model.layers.{mtp}.*"])
    rd = CheckpointReader(res.out)
    assert rd.info(f"model.layers.{mtp}.mlp.experts.0.gate_proj.weight").dtype == "BF16"
    assert f"model.layers.{mtp}.mlp.experts.0.gate_proj.weight_scale" not in rd
    assert rd.info("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == "U8"
    patterns = json.loads((res.out / HF_QUANT_CONFIG).read_text())["quantization"]["exclude_modules"]
    assert _vllm_modelopt_excluded(f"model.layers.{mtp}.mlp.experts", patterns, True)
    assert _sglang_excluded(f"model.layers.{mtp}.mlp.experts.3.down_proj", patterns)
    with pytest.raises(ExportError, match="some but not all"):
        plan_export(trained_testbed_dir, [calib_stats], exclude=["model.layers.1.mlp.experts.0.*"])


def test_default_calibration_beside_pruned_checkpoint(trained_testbed_dir, calib_stats, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(trained_testbed_dir, src)
    with pytest.raises(ExportError, match="no calibration statistics"):
        plan_export(src, None)
    shutil.copy(calib_stats, src / "reap_stats.safetensors")
    assert plan_export(src, None).stats_paths == [src / "reap_stats.safetensors"]


def test_bad_input(trained_testbed_dir, tiny_testbed_dir, calib_stats, modelopt_export, tmp_path):
    from glmgguf.reap.stats import ReapStats

    with pytest.raises(ExportError, match="not found"):
        plan_export(trained_testbed_dir, [tmp_path / "missing.safetensors"])
    other = ReapStats.load(calib_stats)
    other.fingerprint = {**other.fingerprint, "hidden_size": 2 * other.fingerprint["hidden_size"]}
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ExportError, match="another model"):
        plan_export(trained_testbed_dir, [tmp_path / "other.safetensors"])
    fewer = ReapStats.load(calib_stats)
    fewer.fingerprint = {**fewer.fingerprint, "experts": {k: v // 2 for k, v in fewer.fingerprint["experts"].items()}}
    for L, t in fewer.layers.items():
        fewer.layers[L] = {k: v[: len(v) // 2] for k, v in t.items()}
    fewer.save(tmp_path / "fewer.safetensors")
    with pytest.raises(ExportError, match="another model"):
        plan_export(trained_testbed_dir, [tmp_path / "fewer.safetensors"])
    no_mtp = ReapStats.load(calib_stats)
    del no_mtp.layers[max(no_mtp.layers)]
    no_mtp.save(tmp_path / "no_mtp.safetensors")
    with pytest.raises(ExportError, match="MTP block"):
        plan_export(trained_testbed_dir, [tmp_path / "no_mtp.safetensors"])
    with pytest.raises(ExportError, match="already quantized"):
        plan_export(modelopt_export.out, [calib_stats])
    plan = plan_export(trained_testbed_dir, [calib_stats])
    from glmgguf.io.atomic import OutputExistsError

    with pytest.raises(OutputExistsError):
        export_nvfp4(plan, modelopt_export.out, threads=1)
    with pytest.raises(ExportError, match="CUDA is not available") if not torch.cuda.is_available() else \
            pytest.raises(OutputExistsError):
        export_nvfp4(plan, modelopt_export.out, device="cuda")


def test_failed_export_leaves_nothing(trained_testbed_dir, calib_stats, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = nq.quantize

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 20:
            raise nq.Nvfp4Error("weight contains inf or NaN")
        return real(*a, **kw)

    monkeypatch.setattr(nq, "quantize", failing)
    with pytest.raises(ExportError, match="expert"):
        _export(trained_testbed_dir, calib_stats, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli(trained_testbed_dir, calib_stats, tmp_path):
    from glmgguf.cli import main

    run = CliRunner()
    out = tmp_path / "out"
    args = ["nvfp4", "export", str(trained_testbed_dir), str(out), "--calib", str(calib_stats), "--threads", "1"]
    r = run.invoke(main, [*args, "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "experts in NVFP4" in r.output and not out.exists()
    r = run.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "never routed" in r.output and (out / HF_QUANT_CONFIG).is_file()
    r = run.invoke(main, args)
    assert r.exit_code == 1 and "already exists" in r.output
    r = run.invoke(main, [*args, "--force", "--format", "compressed-tensors"])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["nvfp4", "export", str(trained_testbed_dir), str(tmp_path / "x"), "--threads", "1"])
    assert r.exit_code == 1 and "no calibration statistics" in r.output
    r = run.invoke(main, ["nvfp4", "dequantize", str(out), str(tmp_path / "deq")])
    assert r.exit_code == 0, r.output
    assert CheckpointReader(tmp_path / "deq").info("model.layers.1.mlp.experts.0.up_proj.weight").dtype == "F32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_export_equals_cpu(trained_testbed_dir, calib_stats, modelopt_export, tmp_path):
    res = _export(trained_testbed_dir, calib_stats, tmp_path / "gpu", device="cuda", max_shard_bytes=8 * 2**20)
    a, b = CheckpointReader(modelopt_export.out), CheckpointReader(res.out)
    assert a.names() == b.names()
    for n in a.names():
        assert torch.equal(a.get(n).view(torch.uint8), b.get(n).view(torch.uint8)), n


# ---------------------------------------------------------------------------------------------------------------
# NVFP4 inside GGUF (`glmgguf convert --recipe nvfp4_experts`)
# ---------------------------------------------------------------------------------------------------------------

def _nvfp4_gguf(trained_testbed_dir, out):
    from glmgguf.gguf.convert import convert
    from glmgguf.gguf.recipe import load_recipe

    layers = GlmLayout.from_dir(trained_testbed_dir).layers
    return convert(trained_testbed_dir, out, load_recipe("nvfp4_experts").chooser(layers), progress=False)


def test_ggml_nvfp4_repack_is_lossless():
    from glmgguf.nvfp4.gguf import ggml_nvfp4_bytes, ggml_nvfp4_dequantize

    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(48, 320, generator=gen) * torch.logspace(-4, 0, 48).unsqueeze(1)).bfloat16()
    q = nq.quantize(w)
    raw = ggml_nvfp4_bytes(q)
    assert raw.shape == (48, 320 // 64 * 36) and raw.dtype == np.uint8
    # the same values; (E2M1 * scale) * scale_2 vs E2M1 * (scale * scale_2): float32 order, 1 ulp at most
    torch.testing.assert_close(ggml_nvfp4_dequantize(raw, 320) * q.weight_scale_2, q.dequantize(), rtol=2**-22,
                               atol=0)


def test_gguf_nvfp4_tensors(trained_testbed_dir, tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    from glmgguf.nvfp4.gguf import ggml_nvfp4_dequantize

    res = _nvfp4_gguf(trained_testbed_dir, tmp_path / "m.gguf")
    layout = GlmLayout.from_dir(trained_testbed_dir)
    rd = CheckpointReader(trained_testbed_dir)
    tensors = {t.name: t for t in GGUFReader(res.path).tensors}
    for layer in layout.moe_layers:
        for proj, gname in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            t = tensors[f"blk.{layer.index}.ffn_{gname}_exps.weight"]
            if layer.is_mtp:  # the MTP block keeps q4_protected's types (see glmgguf.nvfp4.gguf)
                assert t.tensor_type in (Q.Q4_K, Q.Q6_K) and f"blk.{layer.index}.ffn_{gname}_exps.scale" not in tensors
                continue
            assert t.tensor_type == Q.NVFP4
            scale = tensors[f"blk.{layer.index}.ffn_{gname}_exps.scale"]
            assert scale.tensor_type == Q.F32 and list(scale.shape) == [layer.n_experts]
            raw = np.asarray(t.data).reshape(layer.n_experts, -1)
            for e in (0, layer.n_experts - 1):
                w = rd.get(f"model.layers.{layer.index}.mlp.experts.{e}.{proj}.weight")
                q = nq.quantize(w)
                assert float(scale.data[e]) == float(q.weight_scale_2)
                got = ggml_nvfp4_dequantize(raw[e], w.shape[1]) * float(scale.data[e])
                torch.testing.assert_close(got, q.dequantize(), rtol=2**-22, atol=0)


def test_gguf_nvfp4_refusals(trained_testbed_dir, tmp_path):
    from glmgguf.gguf.convert import convert
    from glmgguf.gguf.recipe import Recipe
    from glmgguf.nvfp4.gguf import Nvfp4GgufError

    layers = GlmLayout.from_dir(trained_testbed_dir).layers
    head = 'description = "t"\ndefault = "Q8_0"\n[[rule]]\n'
    for text, match in ((head + 'name = "attn_output"\ntype = "NVFP4"\n', "routed experts only"),
                        (head + 'role = "expert_down"\ntype = "NVFP4"\n', "MTP block")):
        with pytest.raises(Nvfp4GgufError, match=match):
            convert(trained_testbed_dir, tmp_path / "x.gguf", Recipe.parse(text, "t").chooser(layers), progress=False)
        assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_gguf_nvfp4_equals_upstream_conversion_of_modelopt_export(trained_testbed_dir, modelopt_export, tmp_path,
                                                                  llama_toolchain):
    """The pinned upstream converter, given our ModelOpt export, writes the same NVFP4 blocks and scales (gate/up
    there use the export's shared gate/up scale, so they are compared against that)."""
    import sys

    from gguf import GGUFReader

    from glmgguf.nvfp4.gguf import ggml_nvfp4_bytes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from upstream import run_upstream_convert

    up = run_upstream_convert(llama_toolchain.source_dir, modelopt_export.out, tmp_path / "up.gguf", "bf16",
                              log=tmp_path / "up.log")
    ours = _nvfp4_gguf(trained_testbed_dir, tmp_path / "ours.gguf")
    a = {t.name: t for t in GGUFReader(up["output"]).tensors}
    b = {t.name: t for t in GGUFReader(ours.path).tensors}
    layout = GlmLayout.from_dir(trained_testbed_dir)
    rd = CheckpointReader(trained_testbed_dir)
    for layer in layout.moe_layers:
        if layer.is_mtp:
            continue
        L = layer.index
        for n in (f"blk.{L}.ffn_down_exps.weight", f"blk.{L}.ffn_down_exps.scale"):
            assert np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)), n
        for proj, gname in (("gate_proj", "gate"), ("up_proj", "up")):
            raw = np.asarray(a[f"blk.{L}.ffn_{gname}_exps.weight"].data).reshape(layer.n_experts, -1)
            for e in range(layer.n_experts):
                pre = f"model.layers.{L}.mlp.experts.{e}."
                s2 = nq.global_scale(torch.maximum(nq.amax(rd.get(pre + "gate_proj.weight")),
                                                   nq.amax(rd.get(pre + "up_proj.weight"))))
                want = ggml_nvfp4_bytes(nq.quantize(rd.get(pre + f"{proj}.weight"), s2))
                assert np.array_equal(raw[e], want.reshape(-1))
                assert float(a[f"blk.{L}.ffn_{gname}_exps.scale"].data[e]) == float(s2)


@pytest.mark.slow
def test_gguf_nvfp4_runs_on_cpu_backend(trained_testbed_dir, llama_toolchain, tmp_path):
    """nvfp4_experts GGUF in the pinned llama.cpp (CPU) against the F32 GGUF: KL reported, bounded."""
    from transformers import AutoTokenizer

    from glmgguf.gguf.convert import convert, outtype_chooser
    from glmgguf.parity import kl_stats, llama_logits
    from glmgguf.testbed.train import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(trained_testbed_dir)
    ids = tok("".join(stdlib_corpus("heldout"))[:20000])["input_ids"][:160]
    f32 = convert(trained_testbed_dir, tmp_path / "f32.gguf", outtype_chooser("f32"), progress=False)
    ref = llama_logits(llama_toolchain, f32.path, ids, threads=1)
    nv = _nvfp4_gguf(trained_testbed_dir, tmp_path / "nvfp4.gguf")
    stats = kl_stats(ref, llama_logits(llama_toolchain, nv.path, ids, threads=1))
    print(f"nvfp4_experts GGUF vs F32 GGUF (llama.cpp CPU): {stats}")
    assert stats.mean < 0.02 and stats.top1_agreement > 0.9
