"""Obtain the pinned llama.cpp source: the llama-cpp-python sdist, or a user-given tree."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from glmgguf.cache import cache_root
from glmgguf.errors import GlmggufError

log = logging.getLogger(__name__)

PINNED_LLAMA_CPP_PYTHON = "0.3.36"
PINNED_LLAMA_CPP_COMMIT = "0c1e5709"
SDIST_NAME = f"llama_cpp_python-{PINNED_LLAMA_CPP_PYTHON}"
REQUIRED_FILES = ("CMakeLists.txt", "src/models/glm-dsa.cpp")


class LlamaSourceError(GlmggufError, RuntimeError):
    """The llama.cpp source could not be obtained or is not usable."""


@dataclass(frozen=True)
class LlamaSource:
    """A llama.cpp source tree plus what identifies it for the build cache."""

    llama_cpp_dir: Path
    python_package_dir: Path | None  # directory holding the `llama_cpp` binding (sdist only)
    identity: str


def pinned_identity() -> str:
    """Build-cache identity of the pinned sdist (known without downloading it)."""
    return f"llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}"


def validate_source_tree(path: str | os.PathLike[str]) -> Path:
    """Return `path` resolved if it is a llama.cpp tree with the glm-dsa arch, else raise."""
    tree = Path(path).expanduser().resolve()
    if not tree.is_dir():
        raise LlamaSourceError(f"llama.cpp source {tree} is not a directory")
    missing = [f for f in REQUIRED_FILES if not (tree / f).is_file()]
    if missing:
        raise LlamaSourceError(
            f"{tree} is not a usable llama.cpp source tree: missing {', '.join(missing)} "
            f"(need a llama.cpp with the glm-dsa arch, e.g. commit {PINNED_LLAMA_CPP_COMMIT} or later)"
        )
    return tree


def tree_identity(tree: Path) -> str:
    """Identity of a user tree: git HEAD plus uncommitted diff, else a hash of its file listing."""
    h = hashlib.sha256()
    if (tree / ".git").exists():
        try:
            for args in (["rev-parse", "HEAD"], ["diff", "HEAD"]):
                h.update(subprocess.run(["git", "-C", str(tree), *args], capture_output=True,
                                        check=True).stdout)
            return f"git:{h.hexdigest()}"
        except (OSError, subprocess.CalledProcessError):
            h = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        rel = Path(root).relative_to(tree)
        dirs[:] = sorted(d for d in dirs if d != ".git" and not (rel == Path(".") and d.startswith("build")))
        for name in sorted(files):
            st = (Path(root) / name).stat()
            h.update(f"{rel / name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"files:{h.hexdigest()}"


def user_source(path: str | os.PathLike[str]) -> LlamaSource:
    """A user-given llama.cpp tree, validated.

    The `llama_cpp` binding is offered only when the tree is the `vendor/llama.cpp` of an sdist.
    """
    tree = validate_source_tree(path)
    binding_root = tree.parent.parent
    has_binding = tree.parent.name == "vendor" and (binding_root / "llama_cpp" / "__init__.py").is_file()
    return LlamaSource(tree, binding_root if has_binding else None, tree_identity(tree))


def _download_sdist(src_dir: Path) -> Path:
    sdist = src_dir / f"{SDIST_NAME}.tar.gz"
    if sdist.is_file():
        return sdist
    src_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           f"llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}", "-d", str(src_dir)]
    log.info("downloading llama-cpp-python %s sdist to %s", PINNED_LLAMA_CPP_PYTHON, src_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not sdist.is_file():
        raise LlamaSourceError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
    return sdist


def fetch_pinned_source() -> LlamaSource:
    """Download (once) and extract (once, atomically) the pinned llama-cpp-python sdist."""
    src_dir = cache_root() / "src"
    root = src_dir / SDIST_NAME
    if not root.is_dir():
        sdist = _download_sdist(src_dir)
        partial = src_dir / f"{SDIST_NAME}.partial.{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        log.info("extracting %s", sdist.name)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(sdist) as tar:
            tar.extractall(partial, **safe)
        try:
            (partial / SDIST_NAME).rename(root)
        except OSError:
            if not root.is_dir():  # a concurrent extraction may have won the race
                raise
        shutil.rmtree(partial, ignore_errors=True)
    tree = validate_source_tree(root / "vendor" / "llama.cpp")
    return LlamaSource(tree, root, pinned_identity())


def resolve_source(source: str | os.PathLike[str] | None) -> LlamaSource:
    """The pinned sdist when `source` is None, else the validated user tree."""
    return fetch_pinned_source() if source is None else user_source(source)
