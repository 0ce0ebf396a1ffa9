"""Fingerprints of inputs and outputs, and the manifest each finished stage leaves in its directory.

A file up to 64 MiB is fingerprinted by its SHA-256. A larger file (a checkpoint shard, a GGUF) by its size, its
modification time and the SHA-256 of its first and last MiB: hashing 1.5 TB on every run would cost more than
most stages. A directory is the fingerprint of its files (`*.partial` and stage work directories excluded).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from glmgguf import __version__

FULL_HASH_LIMIT = 64 * 2**20
EDGE = 2**20
SKIP_DIRS = frozenset({"work"})


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if st.st_size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(EDGE), b""):
                h.update(block)
            return h.hexdigest()
        h.update(f"{st.st_size}:{st.st_mtime_ns}:".encode())
        h.update(fh.read(EDGE))
        fh.seek(-EDGE, os.SEEK_END)
        h.update(fh.read(EDGE))
    return "big:" + h.hexdigest()


def fingerprint(path: Path) -> str:
    """Fingerprint of a file or a directory tree (see the module docstring)."""
    if path.is_file():
        return file_fingerprint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".partial"))
        for name in sorted(files):
            if name.endswith(".partial"):
                continue
            f = Path(root) / name
            h.update(f"{f.relative_to(path).as_posix()}={file_fingerprint(f)}\n".encode())
    return "dir:" + h.hexdigest()


def stage_key(args: list[str], workdir: Path, inputs: dict[str, str], upstream: dict[str, str]) -> str:
    """What decides whether a stage must run again: its command, its inputs, the outputs it reads, the version."""
    blob = json.dumps({"args": [a.replace(str(workdir), "$WORKDIR") for a in args], "inputs": inputs,
                       "upstream": upstream, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomically (write `path.partial`, then rename)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
