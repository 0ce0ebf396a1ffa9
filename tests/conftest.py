"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

from glmgguf.llama import Toolchain, ensure_toolchain


@pytest.fixture(scope="session")
def llama_toolchain() -> Toolchain:
    """The pinned llama.cpp build (built once into the cache on first use, ~6 min on 2 cores)."""
    return ensure_toolchain()
