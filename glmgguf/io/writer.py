"""Planned, streaming writer of sharded safetensors checkpoints.

The caller declares every tensor (name, shape, dtype) up front; shards are laid out from that plan, so each
shard's header is written before its data and tensors stream to disk one at a time: peak memory is one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

import torch

from glmgguf.io.dtypes import element_size, torch_to_safetensors
from glmgguf.io.reader import INDEX_NAME

PlanEntry = tuple[str, tuple[int, ...], torch.dtype]


def plan_bytes(plan: Iterable[PlanEntry]) -> int:
    """The tensor bytes a plan writes (headers aside)."""
    return sum(math.prod(shape) * element_size(torch_to_safetensors()[dtype]) for _, shape, dtype in plan)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (contiguous CPU copy when needed)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardedWriter:
    """Write tensors, in plan order, into `model-0000i-of-0000N.safetensors` shards plus the index."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Sequence[PlanEntry],
        max_shard_bytes: int = 5 * 1024**3,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.plan = [(n, tuple(s), torch_to_safetensors()[d]) for n, s, d in plan]
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[list[int]] = []
        size = 0
        for i, (_, shape, code) in enumerate(self.plan):
            nbytes = math.prod(shape) * element_size(code)
            if not self.shards or (size + nbytes > max_shard_bytes and self.shards[-1]):
                self.shards.append([])
                size = 0
            self.shards[-1].append(i)
            size += nbytes
        self.shard_of = {i: s for s, idxs in enumerate(self.shards) for i in idxs}
        self._next = 0
        self._file: BinaryIO | None = None
        self.total_size = 0

    def shard_name(self, s: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{s + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _open_shard(self, s: int) -> None:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for i in self.shards[s]:
            name, shape, code = self.plan[i]
            nbytes = math.prod(shape) * element_size(code)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.out_dir / self.shard_name(s), "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; name, shape and dtype must match the plan."""
        self._expect(name)
        _, exp_shape, exp_code = self.plan[self._next]
        if tuple(tensor.shape) != exp_shape or torch_to_safetensors()[tensor.dtype] != exp_code:
            raise ValueError(
                f"{name}: planned {exp_code}{list(exp_shape)}, got {tensor.dtype}{list(tensor.shape)}"
            )
        self._write_next([tensor_bytes(tensor)])

    def add_bytes(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """Append the next planned tensor from its raw bytes in pieces (a copy that never holds the whole)."""
        self._expect(name)
        self._write_next(chunks)

    def _expect(self, name: str) -> None:
        if self._next >= len(self.plan):
            raise ValueError(f"tensor {name} is not in the write plan")
        if name != self.plan[self._next][0]:
            raise ValueError(f"write plan expects {self.plan[self._next][0]} next, got {name}")

    def _write_next(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        name, shape, code = self.plan[self._next]
        s = self.shard_of[self._next]
        if self._next == self.shards[s][0]:
            self.close_shard()
            self._open_shard(s)
        assert self._file is not None
        written = 0
        for chunk in chunks:
            self._file.write(chunk)
            written += memoryview(chunk).nbytes
        if written != math.prod(shape) * element_size(code):
            raise ValueError(f"{name}: wrote {written} bytes, planned {math.prod(shape) * element_size(code)}")
        self.total_size += written
        self._next += 1

    def close_shard(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def close(self) -> None:
        """Finish the last shard and write the index; fails if planned tensors were never written."""
        self.close_shard()
        if self._next != len(self.plan):
            raise ValueError(f"write plan incomplete: {self.plan[self._next][0]} was never written")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {self.plan[i][0]: self.shard_name(s) for s, idxs in enumerate(self.shards)
                               for i in idxs},
            }
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            with suppress(OSError):  # closing flushes, which fails again on a full disk: keep the first error
                self.close_shard()
