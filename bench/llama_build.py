#!/usr/bin/env python3
"""Cold llama.cpp builds: the plain build, then the patched one started from the plain build's objects.

    python bench/llama_build.py [--cache DIR]

Runs `glmgguf llama build` and then `glmgguf llama build --patches` with `GLMGGUF_CACHE` set to a fresh folder
(default: a temporary one; the pinned sdist is copied in from the usual cache when it is there, so nothing is
downloaded). Each run's wall time, CPU time and the CPU time other processes took meanwhile (a loaded machine
stretches the wall time, not the CPU time) come from `bench/upstream.measure`; the objects each build compiled
come from its `toolchain.json`. Before the patched build reused the plain build's objects it compiled every
object again, like the plain build. Writes bench/results/llama_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from upstream import measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "llama_build.json"


def _entry(cache: Path, patched: bool) -> dict:
    for meta in (cache / "llama").glob("*/toolchain.json"):
        data = json.loads(meta.read_text())
        if bool(data["patched"]) == patched:
            return data
    raise SystemExit(f"no {'patched' if patched else 'plain'} build under {cache / 'llama'}")


def run(cache: Path, logs: Path) -> dict:
    """Both cold builds in `cache`; their measurements."""
    from glmgguf.llama.source import SDIST_NAME

    usual = Path.home() / ".cache" / "glmgguf" / "src" / SDIST_NAME
    if usual.is_dir() and not (cache / "src" / SDIST_NAME).exists():
        shutil.copytree(usual, cache / "src" / SDIST_NAME, symlinks=True)
    env = {**os.environ, "GLMGGUF_CACHE": str(cache)}
    env.pop("GLMGGUF_LLAMA_BUILD", None)
    out = {}
    for label, extra in (("plain", []), ("patched", ["--patches"])):
        stats = measure([sys.executable, "-m", "glmgguf", "llama", "build", *extra], env=env,
                        log=logs / f"llama_build_{label}.log")
        if stats["returncode"] != 0:
            raise SystemExit((logs / f"llama_build_{label}.log").read_text()[-3000:])
        meta = _entry(cache, label == "patched")
        out[label] = {"wall_s": stats["wall_s"], "cpu_s": stats["user_s"] + stats["sys_s"],
                      "other_cpu_s": stats["other_cpu_s"], "compiled_objects": len(meta["compiled_objects"]),
                      "seeded_from_plain": bool(meta.get("seeded_from"))}
        print(f"{label}: {stats['wall_s']:.0f} s wall, {out[label]['cpu_s']:.0f} s CPU, "
              f"{out[label]['compiled_objects']} objects compiled", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="a fresh GLMGGUF_CACHE (default: a temporary folder)")
    args = ap.parse_args()
    logs = RESULTS.parent / "logs"
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        cache = args.cache or Path(tmp)
        if (cache / "llama").exists():
            raise SystemExit(f"{cache} already holds llama.cpp builds; give a fresh folder")
        builds = run(cache, logs)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "builds": builds,
              "patched_share_of_plain_cpu": builds["patched"]["cpu_s"] / builds["plain"]["cpu_s"]}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
