"""GLM-5.2's real widths: the `glm52-slice` testbed and llama.cpp parity on it.

The slice has GLM-5.2's hidden size, MLA and indexer widths and 154,880-token vocabulary; only the layer and
expert counts are cut (one dense + one MoE layer of 4 experts, plus the MTP layer) so the test stays in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmgguf.io import CheckpointReader
from glmgguf.io.fp8 import quantize as fp8_quantize
from glmgguf.layout import GlmLayout
from glmgguf.parity import kl_stats, llama_logits, transformers_logits
from glmgguf.testbed.glm_tokenizer import real_tokenizer_dir
from glmgguf.testbed.slice import random_tensor

INDEX_TOPK = 16  # the slice's indexer top-k: sparse attention is active from token 17 on
N_TOKENS = 48
NEEDED_DISK = 20 * 10**9


def run_glmgguf(*args: str) -> int:
    """Run `glmgguf ARGS` in a child process; returns its own peak RSS in bytes (what the OS reports)."""
    proc = subprocess.Popen([sys.executable, "-m", "glmgguf", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, output
    return usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def slice_build(tmp_path_factory) -> tuple[Path, int]:
    """`glmgguf testbed OUT --size glm52-slice --experts 4 --index-topk 16 --real-tokenizer 5.2 --fp8` (stored
    as the FP8 release is), and the peak RSS of the command."""
    real_tokenizer_dir("5.2")  # fetched once into the cache, outside the measured run
    out = tmp_path_factory.mktemp("slice") / "glm52-slice"
    free = shutil.disk_usage(out.parent).free
    if free < NEEDED_DISK:  # the 4.5 GB slice and its 12.8 GB F32 GGUF
        pytest.skip(f"needs {NEEDED_DISK / 1e9:.0f} GB of free disk for GLM-5.2-width tensors, "
                    f"{free / 1e9:.1f} GB free")
    peak = run_glmgguf("testbed", str(out), "--size", "glm52-slice", "--layers", "2", "--dense-layers", "1",
                       "--experts", "4", "--index-topk", str(INDEX_TOPK), "--real-tokenizer", "5.2", "--fp8")
    return out, peak


@pytest.fixture(scope="module")
def slice_dir(slice_build) -> Path:
    return slice_build[0]


def test_slice_has_glm52_widths(slice_dir):
    lay = GlmLayout.from_dir(slice_dir)
    reader = CheckpointReader(slice_dir)
    assert (lay.hidden_size, lay.n_heads, lay.vocab_size, lay.index_n_heads, lay.index_head_dim) == \
        (6144, 64, 154_880, 32, 128)
    assert [layer.kind.value for layer in lay.layers] == ["dense", "moe", "moe"] and lay.layers[2].is_mtp
    assert reader.tensors["model.layers.1.self_attn.kv_b_proj.weight"].shape == (28672, 512)
    assert reader.tensors["model.layers.0.mlp.gate_proj.weight"].shape == (12288, 6144)
    assert reader.tensors["model.layers.2.mlp.experts.3.down_proj.weight"].shape == (6144, 2048)
    assert reader.tensors["model.layers.2.self_attn.indexer.wq_b.weight"].shape == (4096, 2048)
    assert set(reader.names()) == set(lay.expected_hf_tensors(mtp_indexer=True))
    expert = "model.layers.2.mlp.experts.3.gate_proj.weight"
    assert reader.fp8 is not None and reader.tensors[expert].dtype == "F8_E4M3"
    assert tuple(reader.get_scale(expert).shape) == (16, 48)  # one scale per 128 x 128 block
    assert reader.tensors["model.layers.1.mlp.gate.weight"].dtype == "BF16"
    assert reader.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"


def test_slice_is_deterministic_per_tensor(slice_dir):
    """Each tensor depends only on (seed, name): a 4-expert slice holds the 256-expert slice's first experts."""
    reader = CheckpointReader(slice_dir)
    for name in ("model.layers.2.mlp.gate.e_score_correction_bias", "model.layers.1.self_attn.kv_a_layernorm.weight"):
        assert torch.equal(reader.get(name), random_tensor(name, tuple(reader.tensors[name].shape), 0, 6144)), name
    expert = "model.layers.1.mlp.experts.2.up_proj.weight"
    codes, _ = fp8_quantize(random_tensor(expert, (2048, 6144), 0, 6144))
    assert torch.equal(reader.get_stored(expert).view(torch.uint8), codes.view(torch.uint8))
    codes, _ = fp8_quantize(random_tensor(expert, (2048, 6144), 1, 6144))
    assert not torch.equal(reader.get_stored(expert).view(torch.uint8), codes.view(torch.uint8))


def test_slice_memory_is_one_tensor(slice_build):
    """Generation holds one tensor at a time: the largest, the embedding or LM head (154,880 x 6144 BF16,
    1.9 GB), bounds the peak, not the checkpoint (6.8 GB) or a layer."""
    out, peak = slice_build
    largest = max(info.nbytes for info in CheckpointReader(out).tensors.values())
    print(f"slice build: peak RSS {peak / 1024**3:.2f} GiB, largest tensor {largest / 1024**3:.2f} GiB")
    assert largest == 154_880 * 6144 * 2
    assert peak < largest + 1.5 * 1024**3


@pytest.mark.slow
def test_real_width_logit_parity(slice_dir, llama_toolchain, tmp_path):
    """Our F32 GGUF in llama.cpp against transformers (float32) at GLM-5.2's widths, sparse DSA active, from the
    block-FP8 source (both sides dequantize it the same way). F32, not BF16: with random weights the indexer's
    scores have near-ties, and BF16 rounding flips which keys a query attends at a few positions (a BF16 GGUF
    of this slice measured KL 6e-3 on average, 0.3 at 2 of 48 positions), which says nothing about the layout."""
    from transformers import AutoTokenizer

    from glmgguf.gguf.convert import convert, outtype_chooser

    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir("5.2"))
    text = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 3
    ids = tok(text)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS > INDEX_TOPK
    out = tmp_path / "slice-f32.gguf"
    convert(slice_dir, out, outtype_chooser("f32"), progress=False)
    candidate = llama_logits(llama_toolchain, out, ids)
    out.unlink()
    stats = kl_stats(transformers_logits(slice_dir, ids), candidate)
    print(f"real-width f32: {stats}")
    assert stats.mean < 1e-5, stats  # the tiny testbed's bound for an F32 GGUF
    assert stats.top1_agreement == 1.0, stats
