"""Streaming safetensors I/O: lazy sharded reader, planned sharded writer, atomic outputs.

The reader and writer import torch; they load on first use, so that commands which never touch a checkpoint
(GGUF -> GGUF quantization, evaluation) start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from glmgguf.io.atomic import atomic_dir, atomic_file
from glmgguf.io.errors import CheckpointError

if TYPE_CHECKING:
    from glmgguf.io.reader import CheckpointReader, TensorInfo
    from glmgguf.io.writer import ShardedWriter

_LAZY = {"CheckpointReader": "glmgguf.io.reader", "TensorInfo": "glmgguf.io.reader",
         "ShardedWriter": "glmgguf.io.writer"}

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "atomic_dir",
    "atomic_file",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
