"""Seed a CMake build directory from a finished build of the same tree, so only changed files recompile.

The patched llama.cpp is the plain tree with a few files changed. Its build starts from a copy of the plain
build directory, re-pointed at the patched source copy: object files keep their timestamps and the compiler's
dependency files come along, so `make` recompiles only the objects that depend on a patched file (about 30 of
200 for the shipped series) instead of the whole tree.

CMake build directories are not relocatable: the cache, Makefiles and dependency files hold absolute paths of
the source and build trees. They are text, so the copy rewrites them, keeping each file's timestamp (a newer
`flags.make` would make every object out of date). Only the Makefile generator is seeded: Ninja keeps its
dependencies in a binary log that a copy cannot re-point.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SEEDABLE_GENERATOR = "Unix Makefiles"
_COMPILED = re.compile(r"Building (?:C|CXX|ASM) object (\S+)")


def cache_value(build: Path, name: str) -> str | None:
    """The value of `name` in `build/CMakeCache.txt`, or None."""
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return None
    m = re.search(rf"^{re.escape(name)}:[A-Z]+=(.*)$", cache.read_text(errors="replace"), re.M)
    return m.group(1) if m else None


def compiled_objects(build_output: str) -> list[str]:
    """Object files a `cmake --build` run compiled, as its output names them (relative to the build dir)."""
    return sorted(set(_COMPILED.findall(build_output)))


def rewrite_paths(tree: Path, mapping: dict[str, str]) -> int:
    """Replace each key of `mapping` by its value in every text file under `tree`, keeping timestamps.

    Longer keys win where keys overlap; binary files (with a NUL byte) and symlinks are left alone.
    Returns the number of files changed.
    """
    pattern = re.compile(b"|".join(re.escape(k.encode()) for k in sorted(mapping, key=len, reverse=True)))
    targets = {k.encode(): v.encode() for k, v in mapping.items()}
    changed = 0
    for root, _dirs, files in os.walk(tree):
        for name in files:
            path = Path(root) / name
            if path.is_symlink():
                continue
            data = path.read_bytes()
            if b"\0" in data or not pattern.search(data):
                continue
            st = path.stat()
            path.write_bytes(pattern.sub(lambda m: targets[m.group(0)], data))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            changed += 1
    return changed


def seed_build_dir(done_build: Path, source: Path, build: Path) -> bool:
    """Copy the finished build dir `done_build` to `build`, re-pointed at `source` (a changed copy of its tree).

    Returns False, with nothing left at `build`, when `done_build` cannot be reused (then build from scratch).
    """
    old_build = cache_value(done_build, "CMAKE_CACHEFILE_DIR")
    old_source = cache_value(done_build, "CMAKE_HOME_DIRECTORY")
    generator = cache_value(done_build, "CMAKE_GENERATOR")
    if not (old_build and old_source):
        log.warning("%s is not a CMake build directory; building from scratch", done_build)
        return False
    if generator != SEEDABLE_GENERATOR:
        log.warning("cannot reuse the %s build in %s (only %s); building from scratch",
                    generator, done_build, SEEDABLE_GENERATOR)
        return False
    shutil.copytree(done_build, build, symlinks=True)
    rewrite_paths(build, {old_source: str(source), old_build: str(build)})
    return True
