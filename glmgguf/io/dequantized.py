"""Writing a plain checkpoint from a quantized export: the part NVFP4's and GPTQ's `dequantize` share."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from glmgguf.io.atomic import atomic_dir
from glmgguf.io.reader import CheckpointReader
from glmgguf.io.writer import PlanEntry, ShardedWriter


def natural_key(name: str) -> tuple:
    """Sort key of tensor names with their numbers compared as numbers (layer 2 before layer 10)."""
    return tuple(int(t) if t.isdigit() else t for t in name.replace(".", " . ").split())


def copy_extra_files(reader: CheckpointReader, out: Path, skip: Iterable[str] = ()) -> None:
    """Tokenizer, generation config and the like, but the files named in `skip` (written anew by the output)."""
    skip = set(skip)
    for f in reader.extra_files():
        if f.name not in skip:
            shutil.copy2(f, out / f.name)


def write_dequantized(reader: CheckpointReader, out: str | os.PathLike, plan: list[PlanEntry],
                      dequantized: dict[str, Callable[[], torch.Tensor]], force: bool,
                      skip_files: Iterable[str] = ()) -> Path:
    """Write `plan` into `out` (atomically): the tensors named in `dequantized` from their function, every other
    one copied byte for byte; config.json without its quantization_config, and the extra files but `skip_files`
    (the export's quantization files)."""
    with atomic_dir(out, force=force, inputs=[reader.root]) as tmp:
        with ShardedWriter(tmp, plan) as writer:
            for name, _, _ in plan:
                make = dequantized.get(name)
                if make is None:
                    writer.add_bytes(name, reader.stored_chunks(reader.info(name)))
                else:
                    writer.add(name, make())
        cfg = dict(reader.config)
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        copy_extra_files(reader, tmp, skip_files)
    return Path(out)
