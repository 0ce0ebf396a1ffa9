"""Lazy reader for (sharded) safetensors checkpoints: headers up front, one tensor in memory at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glmgguf.io import fp8
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

    Block-FP8 checkpoints (the GLM-5.x FP8 release) are read transparently: `tensors` lists the weights, their
    `_scale_inv` companions live in `scales`, and `get` returns a quantized weight dequantized to float32;
    `get_stored` / `get_scale` give the stored FP8 codes and scales to stages that keep the stored form.
    `get_rows` reads a dim-0 slice only; `bytes_read` counts the tensor bytes read from the shards so far.
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise CheckpointError(f"checkpoint directory {self.root} does not exist")
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        self.bytes_read = 0
        for shard in self._shards():
            infos, _ = read_header(shard)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} appears in two shards: {shard.name}")
                self.tensors[name] = info
        self._check_index()
        self.fp8 = fp8.scheme_from_config(self.config)
        # other schemes (e.g. an NVFP4 export, whose block scales are FP8 too) are read as stored
        self.scales = self._split_scales() if fp8.quant_method(self.config) in (None, "fp8") else {}

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

    def _split_scales(self) -> dict[str, TensorInfo]:
        """Move `<weight>_scale_inv` tensors out of `tensors`, checking every FP8 weight against its scale."""
        scales = {n.removesuffix(fp8.SCALE_SUFFIX): self.tensors.pop(n)
                  for n in [n for n in self.tensors if n.endswith(fp8.SCALE_SUFFIX)]}
        quantized = [n for n, i in self.tensors.items() if i.dtype == fp8.FP8_DTYPE]
        if (scales or quantized) and self.fp8 is None:
            raise CheckpointError(
                f"{self.root}: {(quantized or list(scales))[0]} is block-FP8 but config.json declares no "
                "quantization_config (quant_method 'fp8', weight_block_size)"
            )
        for name in quantized:
            if name not in scales:
                raise CheckpointError(f"{self.root}: FP8 weight {name} has no {name}{fp8.SCALE_SUFFIX}")
        for name, info in scales.items():
            weight = self.tensors.get(name)
            if weight is None or weight.dtype != fp8.FP8_DTYPE:
                what = "no such weight" if weight is None else f"the weight is {weight.dtype}, not FP8"
                raise CheckpointError(f"{self.root}: scale {name}{fp8.SCALE_SUFFIX} has {what}")
            expected = self.fp8.scale_shape(weight.shape)
            if info.shape != expected or info.dtype not in ("F32", "BF16", "F16"):
                raise CheckpointError(
                    f"{self.root}: {name}{fp8.SCALE_SUFFIX} is {info.dtype}{list(info.shape)}; a {list(weight.shape)} "
                    f"weight in {list(self.fp8.block)} blocks needs a float scale of shape {list(expected)}"
                )
        return scales

    def is_fp8(self, name: str) -> bool:
        return name in self.scales

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name} not found") from None

    def _read(self, info: TensorInfo, start: int = 0, nbytes: int | None = None) -> bytearray:
        """`nbytes` bytes (default: all) of tensor `info`'s data from byte `start` of it."""
        n = info.nbytes - start if nbytes is None else nbytes
        buf = bytearray(n)
        with open(info.shard, "rb") as f:
            f.seek(info.offset + start)
            if f.readinto(buf) != n:
                raise CheckpointError(f"{info.shard}: truncated while reading {info.name}")
        self.bytes_read += n
        return buf

    def stored_chunks(self, info: TensorInfo, chunk_bytes: int = 64 * 2**20) -> Iterator[bytearray]:
        """The stored bytes of `info` (a weight's codes or its scale) in pieces of at most `chunk_bytes`."""
        for start in range(0, info.nbytes, chunk_bytes):
            yield self._read(info, start, min(chunk_bytes, info.nbytes - start))

    def take_rows(self, name: str, ids: Sequence[int]) -> torch.Tensor:
        """Rows `ids` (sorted, distinct) of a tensor in its stored dtype, read run by run: an embedding lookup
        without the whole table (GLM-5.2's is 1.9 GB). Block-FP8 weights come dequantized, read whole."""
        import torch

        info = self.info(name)
        if name in self.scales:
            return self.get(name)[torch.tensor(list(ids), dtype=torch.long)]
        row_bytes = info.nbytes // max(1, info.shape[0])
        buf = bytearray(len(ids) * row_bytes)
        view, pos, i = memoryview(buf), 0, 0
        with open(info.shard, "rb") as f:
            while i < len(ids):
                j = i + 1
                while j < len(ids) and ids[j] == ids[j - 1] + 1:
                    j += 1
                n = (j - i) * row_bytes
                f.seek(info.offset + ids[i] * row_bytes)
                if f.readinto(view[pos:pos + n]) != n:
                    raise CheckpointError(f"{info.shard}: truncated while reading {name}")
                pos, i = pos + n, j
        if not buf:
            return torch.empty((0, *info.shape[1:]), dtype=info.torch_dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(info.torch_dtype).reshape(len(ids), *info.shape[1:])

    def row_block(self, name: str) -> int:
        """The row granularity of `row_words`: a block-FP8 weight's block height, else 1."""
        return self.fp8.block[0] if name in self.scales and self.fp8 is not None else 1

    def row_words(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (first axis) without reading the rest: its stored words as `get_words`
        gives them, a block-FP8 weight dequantized to float32 (`start` then a multiple of `row_block`)."""
        info = self.info(name)
        row_bytes = info.nbytes // max(1, info.shape[0])
        shape = (stop - start, *info.shape[1:])
        raw = self._read(info, start * row_bytes, (stop - start) * row_bytes)
        if name not in self.scales:
            if info.dtype not in NUMPY_WORDS:
                raise CheckpointError(f"{name}: dtype {info.dtype} has no numpy view")
            return np.frombuffer(raw, dtype=NUMPY_WORDS[info.dtype]).reshape(shape)
        assert self.fp8 is not None
        block = self.fp8.block[0]
        if start % block:
            raise ValueError(f"{name}: row {start} is not on a {block}-row FP8 block boundary")
        scale = self._scale_words(name)[start // block:math.ceil(stop / block)]
        return fp8.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(shape), scale, self.fp8.block)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk: a new, writable tensor in the stored dtype (float32 for FP8 weights)."""
        import torch

        if name in self.scales:
            return torch.from_numpy(self.get_f32(name))
        return self.get_stored(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of tensor `name`, as `get` converts it, reading only those rows (for a
        block-FP8 weight: the block rows that hold them, dequantized exactly as `get` dequantizes the whole)."""
        import torch

        info = self.info(name)
        rows = info.shape[0] if info.shape else 1
        start, stop = min(start, rows), min(max(stop, start), rows)
        if name not in self.scales:
            row_bytes = info.nbytes // rows if rows else 0
            shape = (stop - start, *info.shape[1:])
            if start == stop or row_bytes == 0:
                return torch.empty(shape, dtype=info.torch_dtype)
            raw = self._read(info, start * row_bytes, (stop - start) * row_bytes)
            return torch.frombuffer(raw, dtype=torch.uint8).view(info.torch_dtype).reshape(shape)
        br = self.row_block(name)
        r0, r1 = start // br * br, min(-(-stop // br) * br, rows)  # the block rows holding [start, stop)
        return torch.from_numpy(self.row_words(name, r0, r1)[start - r0:stop - r0])

    def get_stored(self, name: str) -> torch.Tensor:
        """One tensor exactly as stored (FP8 codes for a block-FP8 weight)."""
        return self.read_stored(self.info(name))

    def get_words(self, name: str) -> np.ndarray:
        """Read one tensor as a writable numpy array of its stored words (BF16 as uint16 bits), without torch."""
        info = self.info(name)
        if info.dtype not in NUMPY_WORDS:
            raise CheckpointError(f"{name}: dtype {info.dtype} has no numpy view")
        return np.frombuffer(self._read(info), dtype=NUMPY_WORDS[info.dtype]).reshape(info.shape)

    def stored_parts(self, name: str) -> list[tuple[str, TensorInfo]]:
        """(stored name, info) of what stores tensor `name`: itself, then a block-FP8 weight's scale."""
        parts = [(name, self.info(name))]
        if name in self.scales:
            parts.append((name + fp8.SCALE_SUFFIX, self.scales[name]))
        return parts

    def read_stored(self, info: TensorInfo) -> torch.Tensor:
        """The stored tensor `info` describes (a weight's codes or its scale), unconverted."""
        import torch

        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(self._read(info), dtype=torch.uint8).view(info.torch_dtype).reshape(info.shape)

    def check_scales(self) -> None:
        """Read every block-FP8 scale once and refuse NaN/Inf/zero/negative ones (scales are ~1/16000 of the
        weights: GLM-5.2-FP8 has 0.2 GB of them), so a stage fails before it writes anything."""
        for name in self.scales:
            self._scale_words(name)

    def get_scale(self, name: str) -> torch.Tensor:
        """The float32 block scales (`_scale_inv`) of FP8 weight `name`, checked finite and positive."""
        import torch

        return torch.from_numpy(self._scale_words(name))

    def _scale_words(self, name: str) -> np.ndarray:
        info = self.scales.get(name)
        if info is None:
            raise CheckpointError(f"{self.root}: {name} is not a block-FP8 weight")
        raw = np.frombuffer(self._read(info), dtype=NUMPY_WORDS[info.dtype]).reshape(info.shape)
        scale = (raw.astype(np.uint32) << 16).view(np.float32) if info.dtype == "BF16" else raw.astype(np.float32)
        fp8.check_scale(name, scale)
        return scale

    def get_f32(self, name: str) -> np.ndarray:
        """A block-FP8 weight dequantized to float32 (numpy, bit-identical to the upstream converter)."""
        info = self.info(name)
        codes = np.frombuffer(self._read(info), dtype=np.uint8).reshape(info.shape)
        assert self.fp8 is not None
        return fp8.dequantize(codes, self._scale_words(name), self.fp8.block)

    def total_bytes(self) -> int:
        """Stored bytes of every tensor, FP8 scales included."""
        return sum(i.nbytes for i in self.tensors.values()) + sum(i.nbytes for i in self.scales.values())

    def extra_files(self) -> list[Path]:
        """Non-weight files that travel with the checkpoint (tokenizer, templates, generation config...)."""
        skip = {INDEX_NAME, SINGLE_NAME, "config.json", "README.md"}  # a model card describes its own folder only
        return sorted(
            p for p in self.root.iterdir()
            if p.is_file() and p.name not in skip and p.suffix != ".safetensors" and not p.name.endswith(".partial")
        )
