"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch

from glmgguf.llama import Toolchain, ensure_toolchain


@pytest.fixture(scope="session")
def llama_toolchain() -> Toolchain:
    """The pinned llama.cpp build (built once into the cache on first use, ~6 min on 2 cores)."""
    return ensure_toolchain()


# ----------------------------------------------------------------------------------------------------------------
# Testbed models (glmgguf.testbed)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_testbed_dir(tmp_path_factory):
    """A random-init tiny testbed checkpoint (GLM-5.2 layout, seed 0), built once per session (~10 s)."""
    from glmgguf.testbed import build_testbed

    return build_testbed(tmp_path_factory.mktemp("testbed") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_fp8_testbed_dir(tiny_testbed_dir, tmp_path_factory):
    """The random-init tiny testbed stored as the block-FP8 release stores it."""
    from glmgguf.testbed.release_fp8 import write_fp8_copy

    return write_fp8_copy(tiny_testbed_dir, tmp_path_factory.mktemp("testbed-fp8") / "tiny-fp8")


@pytest.fixture(scope="session")
def trained_testbed_dir():
    """The tiny testbed trained on standard-library source: minutes the first time, then from the cache."""
    from glmgguf.testbed import trained_testbed

    return trained_testbed("tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on shared CI cores small tensors run several times faster than with
    threads waiting on each other, and torchrun starts every rank with one thread, so references match."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
