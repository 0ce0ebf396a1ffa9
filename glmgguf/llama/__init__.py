"""The pinned llama.cpp toolchain: source, CMake build, llama-server runner, Python binding."""

from glmgguf.llama.build import LlamaBuildError, Toolchain, ensure_toolchain, find_toolchain
from glmgguf.llama.server import LlamaServer, LlamaServerError, llama_cpp_module
from glmgguf.llama.source import PINNED_LLAMA_CPP_COMMIT, PINNED_LLAMA_CPP_PYTHON, LlamaSourceError

__all__ = [
    "PINNED_LLAMA_CPP_COMMIT",
    "PINNED_LLAMA_CPP_PYTHON",
    "LlamaBuildError",
    "LlamaServer",
    "LlamaServerError",
    "LlamaSourceError",
    "Toolchain",
    "ensure_toolchain",
    "find_toolchain",
    "llama_cpp_module",
]
