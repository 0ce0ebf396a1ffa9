"""Lazy reader for (sharded) safetensors checkpoints: headers up front, one tensor in memory at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glmgguf.io.dtypes import ITEMSIZE, NUMPY_WORDS, element_size, safetensors_to_torch
from glmgguf.io.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, read from its shard's header."""

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return safetensors_to_torch()[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header and check that every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"missing shard {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    base = 8 + n
    for name, h in header.items():
        try:
            dtype, shape, (begin, end) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name}") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if end - begin != math.prod(shape) * element_size(dtype) or begin < 0:
            raise CheckpointError(f"{path}: tensor {name} has inconsistent size in header")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte {base + end}, file has {size}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
    return infos, metadata


class CheckpointReader:
    """A Hugging Face checkpoint directory: config, tokenizer files and lazily-read tensors.

    Headers of all shards are parsed at open time (bytes, not data), so a missing or truncated shard fails
    immediately. `get(name)` reads exactly one tensor with plain file I/O into a fresh buffer: the resident
    memory of a pass over the model is bounded by the largest tensor, not the page cache of a mapping.
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise CheckpointError(f"checkpoint directory {self.root} does not exist")
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self._shards():
            infos, _ = read_header(shard)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} appears in two shards: {shard.name}")
                self.tensors[name] = info
        self._check_index()

    def _read_config(self) -> dict:
        cfg = self.root / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.root}: no config.json")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: invalid JSON ({e})") from None

    def _shards(self) -> list[Path]:
        index = self.root / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e})") from None
            shards = sorted(set(self.weight_map.values()))
            missing = [s for s in shards if not (self.root / s).is_file()]
            if missing:
                raise CheckpointError(f"{self.root}: missing shard {missing[0]} (named in {INDEX_NAME})")
            return [self.root / s for s in shards]
        single = self.root / SINGLE_NAME
        if not single.is_file():
            raise CheckpointError(f"{self.root}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self.weight_map = {}
        return [single]

    def _check_index(self) -> None:
        for name, shard in self.weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.shard.name != shard:
                raise CheckpointError(f"{INDEX_NAME} says {name} is in {shard}, but that shard lacks it")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name} not found") from None

    def _read(self, info: TensorInfo) -> bytearray:
        buf = bytearray(info.nbytes)
        with open(info.shard, "rb") as f:
            f.seek(info.offset)
            if f.readinto(buf) != info.nbytes:
                raise CheckpointError(f"{info.shard}: truncated while reading {info.name}")
        return buf

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (a new, writable tensor in the stored dtype)."""
        import torch

        info = self.info(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(self._read(info), dtype=torch.uint8).view(info.torch_dtype).reshape(info.shape)

    def get_words(self, name: str) -> np.ndarray:
        """Read one tensor as a writable numpy array of its stored words (BF16 as uint16 bits), without torch."""
        info = self.info(name)
        if info.dtype not in NUMPY_WORDS:
            raise CheckpointError(f"{name}: dtype {info.dtype} has no numpy view")
        return np.frombuffer(self._read(info), dtype=NUMPY_WORDS[info.dtype]).reshape(info.shape)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def extra_files(self) -> list[Path]:
        """Non-weight files that travel with the checkpoint (tokenizer, templates, generation config...)."""
        skip = {INDEX_NAME, SINGLE_NAME, "config.json"}
        return sorted(
            p for p in self.root.iterdir()
            if p.is_file() and p.name not in skip and p.suffix != ".safetensors" and not p.name.endswith(".partial")
        )
