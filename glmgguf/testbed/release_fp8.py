"""Re-store a checkpoint the way the GLM-5.x FP8 release stores it, and back.

`write_fp8_copy` turns a BF16 checkpoint (e.g. the trained testbed) into the layout of `zai-org/GLM-5.2-FP8`:
block-FP8 codes with float32 `weight_scale_inv` on the modules the release quantizes, everything else as stored,
and the release's `quantization_config`. `write_dequantized_copy` is the inverse a user would run: every FP8
weight dequantized to BF16, the quantization config dropped (the FP8 checkpoint's "BF16 twin").
Both stream one tensor at a time and write atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from glmgguf.io import CheckpointReader, ShardedWriter, atomic_dir
from glmgguf.io.fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, Fp8Scheme
from glmgguf.io.fp8 import quantize as fp8_quantize
from glmgguf.layout import GlmLayout
from glmgguf.locks import cache_entry_lock
from glmgguf.testbed.build import fp8_quantization_config, is_fp8_in_release


def _shard_limit(reader: CheckpointReader) -> int:
    """The source's largest shard size: the copy is sharded like the source."""
    return max(os.path.getsize(p) for p in {i.shard for i in reader.tensors.values()})


def _copy_side_files(reader: CheckpointReader, out: Path, config: dict) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for f in reader.extra_files():
        shutil.copy2(f, out / f.name)


def write_fp8_copy(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """`src` (BF16) stored as the block-FP8 release stores it."""
    reader = CheckpointReader(src)
    if reader.fp8 is not None:
        raise ValueError(f"{src} is already block-FP8")
    GlmLayout.from_config(reader.config)
    plan: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name in reader.names():
        info = reader.info(name)
        if is_fp8_in_release(name):
            plan.append((name, info.shape, torch.float8_e4m3fn))
            plan.append((name + SCALE_SUFFIX, Fp8Scheme().scale_shape(info.shape), torch.float32))
        else:
            plan.append((name, info.shape, info.torch_dtype))
    config = {**reader.config, "moe_router_dtype": "float32",
              "quantization_config": fp8_quantization_config(reader.config)}
    with atomic_dir(out, force=force, inputs=[src]) as tmp:
        with ShardedWriter(tmp, plan, max_shard_bytes=_shard_limit(reader)) as writer:
            for name in reader.names():
                if is_fp8_in_release(name):
                    codes, scale = fp8_quantize(reader.get(name), DEFAULT_BLOCK)
                    writer.add(name, codes)
                    writer.add(name + SCALE_SUFFIX, scale)
                else:
                    writer.add(name, reader.get(name))
        _copy_side_files(reader, tmp, config)
    return Path(out)


def write_dequantized_copy(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                           force: bool = False) -> Path:
    """A block-FP8 checkpoint with every FP8 weight dequantized to `dtype` (no scales, no quantization_config)."""
    reader = CheckpointReader(src)
    if reader.fp8 is None:
        raise ValueError(f"{src} is not block-FP8")
    plan = [(n, reader.info(n).shape, dtype if reader.is_fp8(n) else reader.info(n).torch_dtype)
            for n in reader.names()]
    config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
    with atomic_dir(out, force=force, inputs=[src]) as tmp:
        with ShardedWriter(tmp, plan, max_shard_bytes=_shard_limit(reader)) as writer:
            for name, _, dt in plan:
                writer.add(name, reader.get(name).to(dt))
        _copy_side_files(reader, tmp, config)
    return Path(out)


def trained_fp8_testbed(size: str = "tiny", seed: int = 0, steps: int | None = None,
                        log: Callable[[str], None] | None = None) -> Path:
    """The trained testbed stored as the FP8 release stores it (cached beside the trained BF16 one)."""
    from glmgguf.testbed.train import trained_testbed

    bf16 = trained_testbed(size=size, seed=seed, steps=steps, log=log)
    out = bf16.with_name(bf16.name + "-fp8")
    if (out / "config.json").is_file():
        return out
    with cache_entry_lock(out):
        if not (out / "config.json").is_file():
            write_fp8_copy(bf16, out, force=True)
    return out
