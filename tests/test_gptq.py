"""GPTQ W4A16: the math (bit-exact with llm-compressor's GPTQModifier), packing, the sequential export of the
trained testbed (KL against BF16 and round-to-nearest), serving-engine loadability (structural), CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from glmgguf.cache import cache_root
from glmgguf.checkpoint import open_checkpoint
from glmgguf.gptq import pack
from glmgguf.gptq import quant as gq
from glmgguf.gptq.dequantize import dequantize_export
from glmgguf.gptq.errors import ExportError
from glmgguf.gptq.export import MANIFEST_NAME, export_gptq, plan_export
from glmgguf.gptq.sequential import GptqSettings
from glmgguf.io import CheckpointReader
from glmgguf.layout import parse_hf_name, released_as_fp8
from glmgguf.locks import cache_entry_lock

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# llmcompressor 0.14 pins compressed-tensors 0.19.0; the same torch as here, so that BLAS and LAPACK match
REFERENCE = {"torch": torch.__version__.split("+")[0], "llmcompressor": "0.14.0"}
REFERENCE_SCRIPT = Path(__file__).with_name("gptq_reference.py")


# ---------------------------------------------------------------------------------------------------------------
# Math and packing
# ---------------------------------------------------------------------------------------------------------------

def _weights_and_inputs(n: int, k: int, rows: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)  # correlated input columns
    x = (torch.randn(rows, k, generator=g) * torch.linspace(0.1, 3.0, k)) @ mix
    return w, x.to(torch.bfloat16)


def test_pack_layout_and_roundtrip():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    packed = pack.pack_rows(codes)
    assert packed.shape == (3, 4) and packed.dtype == torch.int32
    assert int(packed[0, 0]) & 0xF == 0 and (int(packed[0, 0]) >> 4) & 0xF == 1  # -8 -> 0 in the low nibble
    assert int(packed[0, 1]) == sum((8 + i) << (4 * i) for i in range(8)) - 2**32  # codes 0..7, sign bit set
    assert torch.equal(pack.unpack_rows(packed), codes)


def test_scales_and_round_to_nearest():
    w = torch.zeros(2, 256, dtype=torch.bfloat16)
    w[0, :128] = torch.linspace(-3.0, 1.5, 128)
    w[1, 128:] = 0.75
    q = gq.round_to_nearest(w)
    assert q.scale.dtype == torch.bfloat16 and q.scale.shape == (2, 2)
    assert float(q.scale[0, 0]) == pytest.approx(3.0 / 7.5, rel=2**-8)
    assert float(q.scale[1, 1]) == float(torch.tensor(0.1, dtype=torch.bfloat16))  # 0.75 / 7.5 rounded to bf16
    assert float(q.scale[0, 1]) == torch.finfo(torch.bfloat16).eps  # all-zero group
    assert int(q.codes[0, 0]) == -7 and int(q.codes[1, 200]) == 7 and int(q.codes[0, 200]) == 0  # -3 / 0.4004
    want = torch.round(w.double() / q.scale.double().repeat_interleave(128, -1)).clamp(-8, 7)
    assert torch.equal(q.codes.double(), want)
    err = (q.dequantize(torch.float32) - w.float()).abs()
    bound = q.scale.float().repeat_interleave(128, -1) * (0.5 + 8 * 2**-8)  # half a step + bf16 rounding of q
    assert bool((err <= bound).all())


def _proxy_loss(w: torch.Tensor, q: gq.Int4Weight, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer-output error GPTQ minimizes."""
    d = (w.float() - q.dequantize(torch.float32)).double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


def test_gptq_beats_round_to_nearest_on_its_objective():
    w, x = _weights_and_inputs(64, 512, 2000, seed=1)
    h = gq.Hessian(512)
    h.add(x)
    q, failed, _ = gq.gptq_one(w, h.value())
    rtn = gq.round_to_nearest(w)
    assert not failed and torch.equal(q.scale, rtn.scale)
    ratio = _proxy_loss(w, q, h.value()) / _proxy_loss(w, rtn, h.value())
    print(f"GPTQ / RTN output error: {ratio:.3f}")
    assert ratio < 0.45  # measured 0.29


def test_dead_columns_and_failed_cholesky():
    w, x = _weights_and_inputs(32, 256, 400, seed=2)
    x[:, 5] = 0
    h = gq.Hessian(256)
    h.add(x)
    q, failed, _ = gq.gptq_one(w, h.value())
    assert not failed and bool((q.codes[:, 5] == 0).all())  # a column never activated is zeroed
    q, failed, _ = gq.gptq_one(w, -torch.eye(256))
    assert failed and torch.equal(q.codes, gq.round_to_nearest(w).codes)
    with pytest.raises(gq.GptqError, match="not a multiple"):
        gq.round_to_nearest(torch.zeros(4, 100))


# ---------------------------------------------------------------------------------------------------------------
# Reference: llm-compressor's GPTQModifier in its own environment
# ---------------------------------------------------------------------------------------------------------------

def _reference_python() -> Path:
    """A virtual environment with llm-compressor (and the same torch), built once into the cache from PyPI."""
    entry = cache_root() / "gptq-reference" / "-".join(f"{k}-{v}" for k, v in REFERENCE.items())
    python, ok = entry / "bin" / "python", entry / "ready"
    with cache_entry_lock(entry):
        if ok.is_file():
            return python
        shutil.rmtree(entry, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(entry)], check=True, capture_output=True)
            for pkg in ("torch", "llmcompressor"):
                subprocess.run([str(python), "-m", "pip", "install", "-q", f"{pkg}=={REFERENCE[pkg]}"], check=True,
                               capture_output=True, timeout=1200)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(entry, ignore_errors=True)
            out = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()[-1:]
            pytest.skip(f"llm-compressor {REFERENCE['llmcompressor']} could not be installed from the package "
                        f"registry: {out}")
        ok.write_text("ok\n")
    return python


REFERENCE_CASES = {  # name -> (rows N, columns K, calibration rows, weight dtype, dead input columns)
    "bf16": (96, 384, 600, torch.bfloat16, ()),
    "few-rows": (64, 256, 24, torch.bfloat16, ()),
    "dead-columns": (64, 256, 300, torch.bfloat16, (3, 130, 131)),
    "f32": (48, 256, 300, torch.float32, ()),
}


def test_matches_llmcompressor_bit_for_bit(tmp_path):
    """Same weight, same calibration rows, W4A16 preset defaults: identical codes (packed words) and scales."""
    python = _reference_python()
    args, ours = [], {}
    for i, (name, (n, k, rows, dtype, dead)) in enumerate(REFERENCE_CASES.items()):
        w, x = _weights_and_inputs(n, k, rows, seed=10 + i, dtype=dtype)
        x[:, list(dead)] = 0
        save_file({"weight": w, "x": x}, tmp_path / f"{name}.in")
        args += [str(tmp_path / f"{name}.in"), str(tmp_path / f"{name}.out")]
        h = gq.Hessian(k)
        h.add(x.to(dtype))
        ours[name] = gq.gptq_one(w, h.value())
    proc = subprocess.run([str(python), str(REFERENCE_SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("actorder=ActivationOrdering.STATIC group=128") == len(REFERENCE_CASES)
    for name, (q, failed, _) in ours.items():
        ref = load_file(tmp_path / f"{name}.out")
        assert torch.equal(pack.pack_rows(q.codes), ref["weight_packed"]), name
        assert ref["weight_scale"].dtype == q.scale.dtype and torch.equal(ref["weight_scale"], q.scale), name
        assert torch.equal(q.dequantize(), ref["weight_gptq"]), name
        assert bool(ref["rtn_fallback"]) == failed, name
        assert torch.equal(ref["weight_shape"], torch.tensor(list(q.codes.shape))), name


# ---------------------------------------------------------------------------------------------------------------
# Export of the trained testbed
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calib_chunks(trained_testbed_dir):
    """16 x 128 tokens of training text (a few experts get fewer than 64 tokens)."""
    from transformers import AutoTokenizer

    from glmgguf.reap.data import pack as pack_text
    from glmgguf.runner import chunk_sequences
    from glmgguf.testbed import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(trained_testbed_dir)
    seqs = pack_text([d[:20000] for d in stdlib_corpus("train")[:40]], tok, 128, num_samples=16, seed=1).sequences
    return chunk_sequences(seqs, 4)


def _export(src, chunks, out, fmt="compressed-tensors", settings=None, **kw):
    plan = plan_export(src, fmt=fmt, exclude=kw.pop("exclude", ()))
    return export_gptq(plan, out, chunks, settings=settings, dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def exports(trained_testbed_dir, calib_chunks, tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq")
    return {"gptq": _export(trained_testbed_dir, calib_chunks, d / "gptq", max_shard_bytes=4 * 2**20),
            "rtn": _export(trained_testbed_dir, calib_chunks, d / "rtn", settings=GptqSettings(rtn=True)),
            "autogptq": _export(trained_testbed_dir, calib_chunks, d / "autogptq", fmt="gptq")}


def _logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.reshape(-1, model.config.vocab_size)


def test_dequantized_kl_gptq_beats_round_to_nearest(exports, trained_testbed_dir, tmp_path):
    """Held-out KL to the BF16 model of the dequantized exports, loaded in transformers (float32 compute)."""
    from glmgguf.parity import kl_stats
    from glmgguf.testbed.train import heldout_batch

    ids = heldout_batch(16, 128)[:, :-1]  # 2048 positions: 512 leave the mean to a handful of outliers
    ref = _logits(trained_testbed_dir, ids)
    kl = {}
    for name in ("gptq", "rtn"):
        kl[name] = kl_stats(ref, _logits(dequantize_export(exports[name].out, tmp_path / name), ids))
        print(f"{name} (INT4 W4A16) vs BF16: {kl[name]}")
    assert kl["gptq"].mean < 0.02 and kl["gptq"].top1_agreement > 0.88  # measured 0.0160, 0.902
    assert kl["gptq"].mean < 0.9 * kl["rtn"].mean  # measured 0.0160 vs 0.0195
    assert kl["gptq"].top1_agreement > kl["rtn"].top1_agreement  # measured 0.902 vs 0.880


def test_gptq_format_holds_the_same_weights(exports, tmp_path):
    """The AutoGPTQ layout is the same quantization: dequantized, equal to the compressed-tensors export."""
    a = CheckpointReader(dequantize_export(exports["gptq"].out, tmp_path / "ct"))
    b = CheckpointReader(dequantize_export(exports["autogptq"].out, tmp_path / "ag"))
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)), n


def test_manifest_counts(exports, trained_testbed_dir):
    res = exports["gptq"]
    doc = json.loads((res.out / MANIFEST_NAME).read_text())
    counts = doc["expert_tokens"]
    few = {f"model.layers.{L}.mlp.experts.{e}.{p}" for L, c in counts.items() for e, n in enumerate(c) if n < 64
           for p in ("gate_proj", "up_proj", "down_proj")}
    assert few and set(doc["rtn_few_tokens"]) == few  # measured: 6 experts below 64 tokens
    assert doc["modules"]["gptq"] + len(few) == len(res.plan.targets) and doc["modules"]["rtn_no_input"] == 0
    assert all(sum(c) == 16 * 128 * 4 for L, c in counts.items() if int(L) < 4)  # top-4 of every trunk token
    assert sum(counts["4"]) == 16 * 127 * 4  # the MTP block: every position with a next token
    assert doc["scheme"]["group_size"] == 128 and doc["scheme"]["dampening_frac"] == 0.01


# vLLM fuses these into one linear: their shards must share one scheme
PACKED = {"gate_up_proj": ["gate_proj", "up_proj"], "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}


def _ct_ignored(module: str, ignore: list[str]) -> bool:
    """compressed-tensors ignore semantics in vLLM: exact names or `re:` regexes."""
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)


def test_compressed_tensors_loadability(exports, trained_testbed_dir):
    """What vLLM's compressed-tensors W4A16 loader (CompressedTensorsWNA16, its MoE method) reads."""
    out = exports["gptq"].out
    rd = CheckpointReader(out)
    ckpt = open_checkpoint(trained_testbed_dir)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    group = qc["config_groups"]["group_0"]
    w = group["weights"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None and group["format"] == qc["format"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group",
                                                                                          128)
    assert w["actorder"] in ("static", "weight", None)  # no g_idx tensor is read for these
    linears = {n.rsplit(".", 1)[0]: rd.info(n) for n in rd.names() if n.endswith(".weight") and
               len(rd.info(n).shape) == 2}
    packed = {n.rsplit(".", 1)[0] for n in rd.names() if n.endswith(".weight_packed")}
    for mod in packed:
        n, k = (int(v) for v in rd.get(f"{mod}.weight_shape"))
        assert rd.info(f"{mod}.weight_packed").shape == (n, k // 8) and rd.info(f"{mod}.weight_packed").dtype == "I32"
        assert rd.info(f"{mod}.weight_scale").shape == (n, k // 128) and rd.info(f"{mod}.weight_scale").dtype == "BF16"
        assert rd.info(f"{mod}.weight_shape").dtype == "I64" and not _ct_ignored(mod, qc["ignore"])
        assert (n, k) == ckpt.reader.info(f"{mod}.weight").shape
    for mod in linears:  # every linear left unquantized is ignored (else vLLM expects packed weights)
        assert _ct_ignored(mod, qc["ignore"]), mod
    assert {"lm_head", "model.embed_tokens"} <= set(qc["ignore"])
    for layer in ckpt.layout.layers:
        pre = f"model.layers.{layer.index}."
        for fused in ("self_attn.", "mlp.", "mlp.shared_experts."):
            for shards in PACKED.values():
                present = [pre + fused + s for s in shards if pre + fused + s + ".weight" in ckpt.reader]
                assert len({m in packed for m in present}) <= 1, present
        if layer.n_experts:
            assert {m in packed for m in (f"{pre}mlp.experts.{e}.{p}" for e in range(layer.n_experts)
                                          for p in ("gate_proj", "up_proj", "down_proj"))} == {True}
            assert _ct_ignored(pre + "mlp.gate", qc["ignore"])
    # the default targets: the roles the FP8 release stores as FP8, less widths 128 does not divide and the
    # indexer's wk (recent vLLM fuses it with the unquantized weights_proj)
    want = {n.rsplit(".", 1)[0] for n in ckpt.reader.names()
            if (p := parse_hf_name(n)) and released_as_fp8(p.rule) and ckpt.reader.info(n).shape[-1] % 128 == 0
            and ".indexer.wk." not in n}
    assert packed == want and {f"model.layers.{i}.self_attn.indexer.wk" for i in (0, 2, 4)} <= set(qc["ignore"])
    assert {m for m in linears if m.endswith("kv_b_proj")} == {f"model.layers.{i}.self_attn.kv_b_proj"
                                                               for i in range(5)}  # kv_lora_rank 64 < 128


def test_autogptq_layout(exports):
    out = exports["autogptq"].out
    rd = CheckpointReader(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 128
    assert cfg["sym"] is True and cfg["desc_act"] is False
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    mod = "model.layers.1.mlp.experts.3.down_proj"
    assert rd.info(f"{mod}.qweight").shape == (256 // 8, 256) and rd.info(f"{mod}.qzeros").shape == (2, 256 // 8)
    assert rd.info(f"{mod}.scales").dtype == "F16" and rd.info(f"{mod}.g_idx").dtype == "I32"
    assert bool((rd.get(f"{mod}.qzeros") == 0x77777777).all())  # zero point 8, stored as 7
    assert "-:model\\.layers\\.0\\.self_attn\\.kv_b_proj$" in cfg["dynamic"]  # vLLM skips it (kept BF16)


def test_fp8_source_and_exclude(tiny_fp8_testbed_dir, calib_chunks, tmp_path):
    """The block-FP8 release layout is read dequantized; --exclude keeps the MTP block in BF16."""
    res = _export(tiny_fp8_testbed_dir, calib_chunks[:1], tmp_path / "out", exclude=["model.layers.4.*"])
    rd = CheckpointReader(res.out)
    assert rd.info("model.layers.4.mlp.experts.0.up_proj.weight").dtype == "BF16"
    assert rd.info("model.layers.4.self_attn.q_a_proj.weight").dtype == "BF16"
    assert rd.info("model.layers.3.mlp.experts.0.up_proj.weight_packed").dtype == "I32"
    assert not any(n.endswith("weight_scale_inv") for n in rd.names())
    qc = json.loads((res.out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "model.layers.4.mlp.experts.0.up_proj" in qc["ignore"]
    with pytest.raises(ExportError, match="already quantized"):
        plan_export(res.out)


def test_cli(trained_testbed_dir, tmp_path):
    from glmgguf.cli import main
    from glmgguf.testbed import stdlib_corpus

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(d[:3000] for d in stdlib_corpus("train")[:10]))
    run = CliRunner()
    out = tmp_path / "out"
    args = ["gptq", "export", str(trained_testbed_dir), str(out), "--calib", str(calib), "--seq-len", "64",
            "--num-samples", "4", "--threads", "1"]
    r = run.invoke(main, [*args, "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "230 linear modules to INT4" in r.output and not out.exists()
    r = run.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "rounded to nearest for fewer than 64 tokens" in r.output and (out / MANIFEST_NAME).is_file()
    r = run.invoke(main, args)
    assert r.exit_code == 1 and "already exists" in r.output
    r = run.invoke(main, ["gptq", "dequantize", str(out), str(tmp_path / "deq"), "--dtype", "f32"])
    assert r.exit_code == 0, r.output
    assert CheckpointReader(tmp_path / "deq").info("model.layers.1.mlp.experts.0.up_proj.weight").dtype == "F32"
    r = run.invoke(main, ["gptq", "dequantize", str(trained_testbed_dir), str(tmp_path / "x")])
    assert r.exit_code == 1 and "not a GPTQ export" in r.output


def test_pruned_source(trained_testbed_dir, calib_chunks, tmp_path):
    """A REAP-pruned checkpoint (12 of 16 experts per layer) exports like any other."""
    from glmgguf.layout import GlmLayout
    from glmgguf.reap.observe import observe
    from glmgguf.reap.prune import plan_prune, prune_checkpoint

    stats = observe(trained_testbed_dir, calib_chunks[:1], streaming=False, dtype=torch.float32)
    plan = plan_prune(GlmLayout.from_dir(trained_testbed_dir), stats, keep=12)
    pruned = prune_checkpoint(trained_testbed_dir, plan, tmp_path / "pruned", stats=stats).out
    calls = []
    res = _export(pruned, calib_chunks[:1], tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    n = len(res.plan.targets)
    assert calls == [(i, n) for i in range(1, n + 1)]  # one call per quantized module
    rd = CheckpointReader(res.out)
    assert "model.layers.4.mlp.experts.11.down_proj.weight_packed" in rd
    assert not any(".experts.12." in n for n in rd.names())
    doc = json.loads((res.out / MANIFEST_NAME).read_text())
    assert {len(c) for c in doc["expert_tokens"].values()} == {12}
    assert json.loads((res.out / "config.json").read_text())["n_routed_experts"] == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_export_close_to_cpu(trained_testbed_dir, calib_chunks, exports, tmp_path):
    """The same code on CUDA: the scales (from the weights alone) are identical; the codes differ only where
    float32 summation order moves a value across a rounding boundary."""
    res = _export(trained_testbed_dir, calib_chunks, tmp_path / "gpu", device="cuda")
    a, b = CheckpointReader(exports["gptq"].out), CheckpointReader(res.out)
    same = total = 0
    for n in a.names():
        if n.endswith(".weight_scale"):
            assert torch.equal(a.get(n), b.get(n)), n
        elif n.endswith(".weight_packed"):
            ca, cb = pack.unpack_rows(a.get(n)), pack.unpack_rows(b.get(n))
            same, total = same + int((ca == cb).sum()), total + ca.numel()
    print(f"CUDA vs CPU: {same / total:.4f} of the codes equal")
    assert same / total > 0.98


def test_stacked_weights_equal_separate():
    """Weights reading one input (gate and up; q_a, kv_a and wk) are quantized stacked: rows are independent given
    H, and the stacked result is bit for bit the separate ones (one Hessian and one factorization instead of two)."""
    w, x = _weights_and_inputs(96, 384, 500, seed=3)
    h = gq.Hessian(384)
    h.add(x)
    both, _, _ = gq.gptq_one(w, h.value())
    top, _, _ = gq.gptq_one(w[:40], h.value())
    rest, _, _ = gq.gptq_one(w[40:], h.value())
    assert torch.equal(both.codes, torch.cat([top.codes, rest.codes]))
    assert torch.equal(both.scale, torch.cat([top.scale, rest.scale]))


def test_bad_input(trained_testbed_dir, calib_chunks, tmp_path):
    with pytest.raises(ExportError, match="nothing to quantize"):
        plan_export(trained_testbed_dir, exclude=["*"])
    with pytest.raises(ExportError, match="unknown format"):
        plan_export(trained_testbed_dir, fmt="awq")
    plan = plan_export(trained_testbed_dir)
    with pytest.raises(ExportError, match="no calibration tokens"):
        export_gptq(plan, tmp_path / "out", [])
    with pytest.raises(ExportError, match="is the source checkpoint"):
        export_gptq(plan, trained_testbed_dir, calib_chunks)
    if not torch.cuda.is_available():
        with pytest.raises(ExportError, match="CUDA is not available"):
            export_gptq(plan, tmp_path / "out", calib_chunks, device="cuda")
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(trained_testbed_dir, calib_chunks, tmp_path, monkeypatch):
    from glmgguf.gptq import sequential

    def boom(*a, **kw):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sequential.gq, "gptq_one", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        _export(trained_testbed_dir, calib_chunks[:1], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_bad_device(trained_testbed_dir, tmp_path):
    from glmgguf.cli import main

    r = CliRunner().invoke(main, ["gptq", "export", str(trained_testbed_dir), str(tmp_path / "o"), "--calib",
                                  str(tmp_path / "none.txt"), "--device", "tpu"])
    assert r.exit_code == 2 and "--device" in r.output and not (tmp_path / "o").exists()
