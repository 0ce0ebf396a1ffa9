"""The testbed: small GLM-5.x-shaped checkpoints (GLM-5.2's exact on-disk layout) built from a seed.

`build_testbed(out, size)` writes a random-init checkpoint; `trained_testbed(size)` returns a cached one trained
on Python standard-library source so its routers specialize. Both carry the GLM-style tokenizer and chat template.
Names are imported lazily so that the command line starts without loading torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_testbed": "build",
    "expected_tensor_names": "build",
    "new_testbed_model": "build",
    "save_testbed": "build",
    "TESTBED_SIZES": "configs",
    "testbed_config": "configs",
    "testbed_config_kwargs": "configs",
    "SPECIAL_TOKENS": "tokenizer",
    "build_tokenizer": "tokenizer",
    "special_token_ids": "tokenizer",
    "stdlib_corpus": "tokenizer",
    "read_report": "train",
    "train_testbed": "train",
    "trained_testbed": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"glmgguf.testbed.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'glmgguf.testbed' has no attribute {name!r}")
