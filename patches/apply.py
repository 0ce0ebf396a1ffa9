#!/usr/bin/env python3
"""Apply, check or revert the llama.cpp patch series (stdlib only).

    python patches/apply.py apply|check|revert --llama-cpp DIR [--series FILE] [--dry-run]

The series file lists patch files (paths relative to it), one per line; `#` starts a comment.
Each patch's state is probed on its own (applied / applicable / conflict), so patches in a series
must touch separate hunks. `apply` and `revert` are idempotent and all-or-none: any conflict
changes nothing, and a failure half-way rolls back what this run did. Works on a tree that is not
a git checkout (`git apply` outside a repository), falling back to `patch -p1` without git.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_SERIES = Path(__file__).resolve().parent / "llama.cpp" / "series"


def read_series(series: Path) -> list[Path]:
    """Patch files listed in `series`, in order; raises if one is missing."""
    patches = []
    for line in series.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patch = series.parent / line
            if not patch.is_file():
                raise FileNotFoundError(f"{series}: listed patch {patch} does not exist")
            patches.append(patch)
    return patches


def _patch_ok(tree: Path, patch: Path, reverse: bool = False, dry: bool = False) -> bool:
    """Run git apply (or patch -p1) in `tree`; True on success."""
    env = dict(os.environ)
    if shutil.which("git"):
        env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)  # never patch relative to an enclosing repo
        cmd = ["git", "apply", "--whitespace=nowarn", *(["-R"] if reverse else []),
               *(["--check"] if dry else []), str(patch)]
    else:
        cmd = ["patch", "-p1", "-s", "-f", "--no-backup-if-mismatch", *(["-R"] if reverse else []),
               *(["--dry-run"] if dry else []), "-i", str(patch)]
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True).returncode == 0


def state(tree: Path, patch: Path) -> str:
    """'applied', 'applicable' or 'conflict'."""
    if _patch_ok(tree, patch, reverse=True, dry=True):
        return "applied"
    return "applicable" if _patch_ok(tree, patch, dry=True) else "conflict"


def run(action: str, tree: Path, series: Path, dry_run: bool = False) -> int:
    """Do `action` (apply/check/revert) on `tree`; returns the exit status."""
    patches = read_series(series)
    print(f"{series}: {len(patches)} patches")
    states = {p: state(tree, p) for p in patches}
    for p, s in states.items():
        print(f"  {s:10s} {p.name}")
    conflicts = [p.name for p, s in states.items() if s == "conflict"]
    if conflicts:
        print(f"error: {len(conflicts)} patches neither apply nor revert cleanly: {', '.join(conflicts)}")
        return 1
    if action == "check":
        return 0
    reverse = action == "revert"
    todo = [p for p in patches if states[p] == ("applied" if reverse else "applicable")]
    if reverse:
        todo.reverse()
    verb = "revert" if reverse else "apply"
    if dry_run or not todo:
        print(f"{'would ' + verb if dry_run else 'nothing to ' + verb}: {len(todo)} patches")
        return 0
    done: list[Path] = []
    for p in todo:
        if not _patch_ok(tree, p, reverse=reverse):
            for q in reversed(done):
                _patch_ok(tree, q, reverse=not reverse)
            print(f"error: failed to {verb} {p.name}; rolled back {len(done)} patches")
            return 1
        done.append(p)
    print(f"{verb}: {len(done)} patches")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("apply", "check", "revert"))
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree")
    ap.add_argument("--series", type=Path, default=DEFAULT_SERIES, help="series file")
    ap.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    args = ap.parse_args(argv)
    if not args.llama_cpp.is_dir():
        ap.error(f"--llama-cpp {args.llama_cpp} is not a directory")
    return run(args.action, args.llama_cpp.resolve(), args.series.resolve(), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
