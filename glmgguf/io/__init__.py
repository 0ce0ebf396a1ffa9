"""Streaming safetensors I/O: lazy sharded reader, planned sharded writer, atomic outputs."""

from glmgguf.io.atomic import atomic_dir, atomic_file
from glmgguf.io.reader import CheckpointError, CheckpointReader, TensorInfo
from glmgguf.io.writer import ShardedWriter

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "atomic_dir",
    "atomic_file",
]
