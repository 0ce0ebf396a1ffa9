"""Build the pinned llama.cpp tools with CMake into a content-keyed cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from glmgguf.cache import cache_root
from glmgguf.errors import GlmggufError
from glmgguf.llama.patches import PATCH_DIR, SERIES, apply_module
from glmgguf.llama.seed import compiled_objects, seed_build_dir
from glmgguf.llama.source import LlamaSource, pinned_identity, resolve_source, user_source
from glmgguf.locks import cache_entry_lock
from glmgguf.threads import usable_cores

log = logging.getLogger(__name__)

TOOLS = (
    "llama-server", "llama-quantize", "llama-perplexity", "llama-imatrix", "llama-cli", "llama-gguf-split",
)
OPTIONAL_TOOLS = frozenset({"llama-cli"})
BASE_CMAKE_FLAGS = (
    "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",  # binaries find their libs after the .partial dir is renamed
)
BACKEND_FLAGS = {"cpu": ("-DGGML_METAL=OFF",), "cuda": ("-DGGML_CUDA=ON",), "metal": ("-DGGML_METAL=ON",)}
META = "toolchain.json"
logger = logging.getLogger(__name__)
_PROGRESS = re.compile(r"^\[\s*(\d+)%\]|^\[(\d+)/(\d+)\]")


class LlamaBuildError(GlmggufError, RuntimeError):
    """Building or locating the llama.cpp tools failed."""


@dataclass(frozen=True)
class Toolchain:
    """A built llama.cpp: tool binaries, shared libraries and (for the sdist) the Python binding."""

    bin_dir: Path
    source_dir: Path
    lib_dir: Path
    python_package_dir: Path | None
    patched: list[str] = field(default_factory=list)

    def tool(self, name: str) -> Path:
        """Path of the binary `name` (e.g. 'llama-cli'); raises if it was not built."""
        path = self.bin_dir / name
        if not path.is_file():
            raise LlamaBuildError(f"{name} is not in {self.bin_dir}")
        return path

    @property
    def server(self) -> Path:
        return self.tool("llama-server")

    @property
    def quantize(self) -> Path:
        return self.tool("llama-quantize")

    @property
    def perplexity(self) -> Path:
        return self.tool("llama-perplexity")

    @property
    def imatrix(self) -> Path:
        return self.tool("llama-imatrix")

    @property
    def gguf_split(self) -> Path:
        return self.tool("llama-gguf-split")


def series_patches() -> list[Path]:
    """Patch files listed in `patches/llama.cpp/series`."""
    return apply_module().read_series(SERIES)


def cmake_flags(backend: str) -> list[str]:
    """CMake configure flags for `backend` ('cpu', 'cuda' or 'metal')."""
    if backend not in BACKEND_FLAGS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_FLAGS)}")
    return [*BASE_CMAKE_FLAGS, *BACKEND_FLAGS[backend]]


def build_key(identity: str, patches: list[Path], backend: str) -> str:
    """Short hash of source identity, patch contents, backend and CMake flags."""
    h = hashlib.sha256(identity.encode())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update("\0".join([backend, *cmake_flags(backend), *TOOLS]).encode())
    return h.hexdigest()[:16]


def _load_entry(entry: Path) -> Toolchain:
    meta = json.loads((entry / META).read_text())
    pkg = meta["python_package_dir"]
    return Toolchain(bin_dir=entry / "build" / "bin", source_dir=Path(meta["source_dir"]),
                     lib_dir=entry / "build" / "bin", python_package_dir=Path(pkg) if pkg else None,
                     patched=meta["patched"])


def toolchain_from_build_dir(build_dir: str | os.PathLike[str]) -> Toolchain:
    """A Toolchain for an existing llama.cpp CMake build directory (e.g. `GLMGGUF_LLAMA_BUILD`)."""
    root = Path(build_dir).expanduser().resolve()
    if (root / META).is_file():
        return _load_entry(root)
    candidates = (root / "bin", root / "build" / "bin", root)
    bin_dir = next((d for d in candidates if (d / "llama-server").is_file()), None)
    if bin_dir is None:
        raise LlamaBuildError(f"no llama-server under {root} (looked in bin/, build/bin/ and the dir itself)")
    source = bin_dir.parent.parent  # the usual llama.cpp/build/bin layout
    cache = bin_dir.parent / "CMakeCache.txt"
    if cache.is_file():
        m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache.read_text(errors="replace"), re.M)
        source = Path(m.group(1)) if m else source
    pkg = source.parent.parent
    has_binding = source.parent.name == "vendor" and (pkg / "llama_cpp" / "__init__.py").is_file()
    return Toolchain(bin_dir, source, bin_dir, pkg if has_binding else None, [])


def _cache_dir() -> Path:
    return cache_root() / "llama"


def find_toolchain(source: str | os.PathLike[str] | None = None, patches: bool = False,
                   backend: str = "cpu") -> Toolchain | None:
    """The cached build for these options (or `GLMGGUF_LLAMA_BUILD`), or None; never builds."""
    if os.environ.get("GLMGGUF_LLAMA_BUILD"):
        return toolchain_from_build_dir(os.environ["GLMGGUF_LLAMA_BUILD"])
    identity = pinned_identity() if source is None else user_source(source).identity
    entry = _cache_dir() / build_key(identity, series_patches() if patches else [], backend)
    return _load_entry(entry) if (entry / META).is_file() else None


def _run_logged(cmd: list[str], log: Path, step: str, bar: tqdm | None = None) -> str:
    """Run `cmd`, appending its output to `log`; returns the output; raises naming the log on failure."""
    out: list[str] = []
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            out.append(line)
            m = _PROGRESS.match(line)
            if bar is not None and m:
                pct = int(m.group(1)) if m.group(1) else 100 * int(m.group(2)) // int(m.group(3))
                bar.update(max(0, pct - bar.n))
        rc = proc.wait()
    if rc != 0:
        tail = "".join(out[-25:])
        raise LlamaBuildError(f"llama.cpp {step} failed (exit {rc}); full log: {log}\n{tail}")
    return "".join(out)


def _patched_copy(src_dir: Path, dest: Path, log: Path) -> Path:
    """Copy `src_dir` to `dest` (timestamps kept) and apply the patch series there."""
    shutil.copytree(src_dir, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n == ".git" or
                                             (Path(d) == src_dir and n.startswith("build"))])
    _run_logged([sys.executable, str(PATCH_DIR / "apply.py"), "apply", "--llama-cpp", str(dest),
                 "--series", str(SERIES)], log, "patching")
    return dest


def _configure(source: Path, build: Path, backend: str, log: Path, seed: Path | None) -> bool:
    """CMake-configure `build`, first seeded from the finished build dir `seed`; returns whether it was."""
    seeded = seed is not None and seed_build_dir(seed, source, build)
    try:
        _run_logged(["cmake", "-S", str(source), "-B", str(build), *cmake_flags(backend)], log, "configure")
    except LlamaBuildError:
        if not seeded:
            raise
        logger.warning("configuring the build seeded from %s failed; building from scratch (log: %s)", seed, log)
        shutil.rmtree(build)
        return _configure(source, build, backend, log, None)
    return seeded


def _build_targets(build: Path, log: Path) -> list[str]:
    """The TOOLS this tree can build; raises when a required one is missing."""
    targets_help = _run_logged(["cmake", "--build", str(build), "--target", "help"], log, "target listing")
    targets = [t for t in TOOLS if re.search(rf"(^|\s){re.escape(t)}(:|\s|$)", targets_help, re.M)]
    missing = sorted(set(TOOLS) - set(targets) - OPTIONAL_TOOLS)
    if missing:
        raise LlamaBuildError(f"this llama.cpp tree has no target(s) {', '.join(missing)}; log: {log}")
    return targets


def _compile(build: Path, targets: list[str], log: Path, progress: bool, seeded: bool) -> str:
    """`cmake --build` the targets with a progress bar; returns the build output."""
    desc = "building llama.cpp (what the patches change)" if seeded else "building llama.cpp"
    with tqdm(total=100, desc=desc, unit="%", disable=not progress) as bar:
        return _run_logged(["cmake", "--build", str(build), "--config", "Release", "-j", str(usable_cores()),
                            "--target", *targets], log, "build", bar)


def _build(src_dir: Path, pkg_dir: Path | None, patches: list[Path], backend: str, entry: Path,
           progress: bool, seed: Path | None = None) -> None:
    """Build into `<entry>.partial`, then rename it to `entry`.

    `seed`: a finished build dir of the same source and backend whose objects the build starts from.
    """
    partial = entry.with_name(entry.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    partial = partial.resolve()  # the paths CMake records, and a seeded build dir is re-pointed to
    log = partial / "build.log"
    source = _patched_copy(src_dir, partial / "source", log) if patches else src_dir
    build = partial / "build"
    t0 = time.monotonic()
    if progress:
        logger.info("configuring llama.cpp (%s); log: %s", backend, entry / "build.log")
    seeded = _configure(source, build, backend, log, seed)
    targets = _build_targets(build, log)
    out = _compile(build, targets, log, progress, seeded)  # a compile error is the patches': no retry
    absent = [t for t in targets if not (build / "bin" / t).is_file()]
    if absent or not any((build / "bin").glob("libllama.*")):
        raise LlamaBuildError(f"build finished but {absent or 'libllama'} is missing from {build / 'bin'}; "
                              f"log: {log}")
    meta = {"source_dir": str(entry / "source" if patches else src_dir),
            "python_package_dir": str(pkg_dir) if pkg_dir else None,
            "patched": [p.name for p in patches], "backend": backend, "cmake_flags": cmake_flags(backend),
            "targets": targets, "build_seconds": round(time.monotonic() - t0, 1),
            "seeded_from": str(seed.parent) if seeded and seed else None,
            "compiled_objects": compiled_objects(out)}
    (partial / META).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(entry, ignore_errors=True)  # an incomplete leftover; finished entries never get here
    partial.rename(entry)


def _ensure_entry(src: LlamaSource, patches: list[Path], backend: str, progress: bool) -> Path:
    """The cache entry for this build, built first if missing.

    A patched build starts from the plain build's objects (built first if missing), so that only what the
    patches touch compiles twice.
    """
    entry = _cache_dir() / build_key(src.identity, patches, backend)
    seed = None
    if patches and not (entry / META).is_file():
        seed = _ensure_entry(src, [], backend, progress) / "build"
        if progress:
            logger.info("building the patched llama.cpp from the plain build's objects")
    with cache_entry_lock(entry):
        if not (entry / META).is_file():
            _build(src.llama_cpp_dir, src.python_package_dir, patches, backend, entry, progress, seed)
    return entry


def ensure_toolchain(source: str | os.PathLike[str] | None = None, patches: bool = False,
                     backend: str = "cpu", progress: bool = True) -> Toolchain:
    """Return a built llama.cpp toolchain, fetching the source and building it if not cached.

    `source`: a llama.cpp tree (default: the pinned llama-cpp-python sdist). `patches`: build a copy
    with `patches/llama.cpp/series` applied, starting from the plain build's objects (the plain build is
    made first when missing). `GLMGGUF_LLAMA_BUILD` (an existing build dir) wins.
    """
    if os.environ.get("GLMGGUF_LLAMA_BUILD"):
        return toolchain_from_build_dir(os.environ["GLMGGUF_LLAMA_BUILD"])
    src = resolve_source(source)
    return _load_entry(_ensure_entry(src, series_patches() if patches else [], backend, progress))

