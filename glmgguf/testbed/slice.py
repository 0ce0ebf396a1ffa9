"""GLM-5.2 at its real width, cut to a few layers: a checkpoint to run every stage at the released dimensions.

`build_slice` writes GLM-5.2's exact tensor shapes (hidden 6144, 64 MLA heads, q_lora 2048, kv_lora 512, the
32 x 128 indexer, 256 experts of width 2048 plus the shared expert, dense width 12288, vocabulary 154,880) for
`layers` trunk layers (the first `dense` of them dense) and the MTP layer, in the release's on-disk layout, BF16
or block-FP8 as `zai-org/GLM-5.2-FP8` stores it. Weights are random (the testbed's initialization rules) and
deterministic: each tensor has its own generator seeded from (seed, name), so an `experts=4` slice holds the
same first four experts as the 256-expert one. Tensors are generated and written one at a time, large ones in
row chunks: peak memory is one tensor, never a layer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from glmgguf.io import ShardedWriter, atomic_dir
from glmgguf.io.fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, Fp8Scheme
from glmgguf.io.fp8 import quantize as fp8_quantize
from glmgguf.layout import GlmLayout
from glmgguf.testbed.build import (
    config_json,
    init_value,
    is_fp8_in_release,
    storage_dtype,
    tokenizer_overrides,
    write_side_files,
)
from glmgguf.testbed.glm_tokenizer import REAL_VOCAB_SIZE

log = logging.getLogger(__name__)

SLICE_SIZE = "glm52-slice"
SLICE_SHARD_BYTES = 5 * 1024**3  # the release's shards are ~5.4 GB
CHUNK_ELEMENTS = 1 << 24  # rows are drawn in chunks of about 16 M values (64 MB of float32)

# GLM-5.2's dimensions (REFERENCE 1 / 1b); the layer count, expert count and indexer top-k are the slice's own.
GLM52_DIMS: dict = {
    "vocab_size": REAL_VOCAB_SIZE,
    "hidden_size": 6144,
    "intermediate_size": 12288,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 2048,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "index_n_heads": 32,
    "index_head_dim": 128,
    "index_topk": 2048,
    "index_topk_freq": 4,  # full at 0, 1, 2, then every 4th
    "index_skip_topk_offset": 3,
    "max_position_embeddings": 202752,
}

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def slice_overrides(layers: int = 2, dense: int = 1, experts: int = 256, index_topk: int | None = None,
                    tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """`GlmMoeDsaConfig` keyword arguments of a slice: GLM-5.2's widths with its own layer / expert counts."""
    if not 0 <= dense <= layers or layers < 1:
        raise ValueError(f"a slice needs 1 or more layers and 0..layers dense ones (got {layers}, {dense})")
    if experts < 1:
        raise ValueError(f"a slice needs 1 or more experts (got {experts})")
    kw = {**GLM52_DIMS, "num_hidden_layers": layers, "first_k_dense_replace": dense, "n_routed_experts": experts,
          "num_experts_per_tok": min(GLM52_DIMS["num_experts_per_tok"], experts)}
    if index_topk is not None:
        kw["index_topk"] = index_topk
    if tokenizer_dir is not None:
        kw.update(tokenizer_overrides(tokenizer_dir))
    return kw


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: independent of every other tensor and of the write order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def random_tensor(name: str, shape: tuple[int, ...], seed: int, hidden_size: int) -> torch.Tensor:
    """One tensor's initial value in its storage dtype, drawn in row chunks (no float32 copy of the whole)."""
    dtype = storage_dtype(name)
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    out = torch.empty(shape, dtype=dtype)
    rows = out.reshape(shape[0], -1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for r in range(0, rows.shape[0], step):
        chunk = rows[r:r + step]
        noise = torch.randn(chunk.shape, generator=gen, dtype=torch.float32)
        chunk.copy_(init_value(name, noise, hidden_size, len(shape)).to(dtype))
    return out


def _layer_order(name: str) -> int:
    """Checkpoint order: embeddings, then layer by layer, then the final norm and head."""
    if name == "model.embed_tokens.weight":
        return -1
    m = _LAYER.match(name)
    return int(m.group(1)) if m else 1 << 30


def slice_plan(layout: GlmLayout, fp8: bool) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every stored tensor in write order, FP8 scales right after their weights."""
    shapes = layout.expected_hf_tensors(mtp_indexer=True)
    plan = []
    for name in sorted(shapes, key=_layer_order):  # stable: the layout table's order within a layer
        shape = shapes[name]
        if fp8 and is_fp8_in_release(name):
            plan.append((name, shape, torch.float8_e4m3fn))
            plan.append((name + SCALE_SUFFIX, Fp8Scheme(DEFAULT_BLOCK).scale_shape(shape), torch.float32))
        else:
            plan.append((name, shape, storage_dtype(name)))
    return plan


def _stored(name: str, shape: tuple[int, ...], seed: int, hidden: int, fp8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    t = random_tensor(name, shape, seed, hidden)
    if fp8 and is_fp8_in_release(name):
        codes, scale = fp8_quantize(t, DEFAULT_BLOCK)
        yield name, codes
        yield name + SCALE_SUFFIX, scale
    else:
        yield name, t


def build_slice(
    out_dir: str | os.PathLike,
    layers: int = 2,
    dense: int = 1,
    experts: int = 256,
    fp8: bool = False,
    seed: int = 0,
    index_topk: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    force: bool = False,
    max_shard_bytes: int = SLICE_SHARD_BYTES,
    progress: Callable[[str, int], None] | None = None,
) -> Path:
    """Write a GLM-5.2-width slice checkpoint into `out_dir`, atomically (see the module docstring).

    `tokenizer_dir`: a GLM tokenizer directory (the real one); without it the testbed's own tokenizer is written
    and the vocabulary still has GLM-5.2's 154,880 rows. `progress(name, nbytes)` is called after each tensor.
    """
    cfg = config_json("tiny", slice_overrides(layers, dense, experts, index_topk, tokenizer_dir), fp8)
    layout = GlmLayout.from_config(cfg)
    plan = slice_plan(layout, fp8)
    shapes = {name: shape for name, shape, dtype in plan if not name.endswith(SCALE_SUFFIX)}
    with atomic_dir(out_dir, force=force) as tmp:
        with torch.no_grad(), ShardedWriter(tmp, plan, max_shard_bytes=max_shard_bytes) as writer:
            for name, shape in shapes.items():
                for stored_name, t in _stored(name, shape, seed, layout.hidden_size, fp8):
                    writer.add(stored_name, t)
                    if progress is not None:
                        progress(stored_name, t.numel() * t.element_size())
        write_side_files(tmp, cfg, tokenizer_dir)
    return Path(out_dir)
