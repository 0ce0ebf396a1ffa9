#!/usr/bin/env python3
"""Apply, check or revert the llama.cpp patch series (stdlib only).

    python patches/apply.py apply|check|revert --llama-cpp DIR [--series FILE] [--dry-run]

The series file lists patch files (paths relative to it) in order, each followed by the upstream llama.cpp
version it was made against; `#` starts a comment. The series is a stack: a tree holds its first k patches
(k = 0..n). Every action first replays the work on a scratch copy of the files the series touches, so that:

- `apply` and `revert` are idempotent (an applied series applies as a no-op) and all-or-none: the tree is
  only written once the whole series went through on the copy, and a failed write restores every file;
- a tree that matches neither state (another llama.cpp version, or local edits in the patched lines) is
  refused with an error that names the expected upstream version and the files that differ from it;
  nothing is changed;
- it works on a git checkout and on a plain source tree alike (`git apply` outside any repository, or
  `patch -p1` when git is missing), and `--dry-run` reports what would change.

Exit status: 0 on success (and for `check`: the tree is unpatched, partly or fully patched), 1 on refusal.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_SERIES = Path(__file__).resolve().parent / "llama.cpp" / "series"
_DIFF_GIT = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.M)
_OLD_NEW = re.compile(r"^(?:---|\+\+\+) [ab]/(\S+)", re.M)  # plain unified diffs (no git header)
_INDEX = re.compile(r"^index ([0-9a-f]+)\.\.([0-9a-f]+)", re.M)


class PatchError(RuntimeError):
    """The series cannot be applied to / reverted from this tree; nothing was changed."""


class Patch:
    """One series entry: the patch file, the upstream version it was made against, the files it touches."""

    def __init__(self, path: Path, upstream: str):
        self.path, self.upstream = path, upstream

    def __repr__(self) -> str:
        return f"Patch({self.path.name!r}, {self.upstream!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def files(self) -> list[str]:
        """Paths (relative to the tree) this patch reads or writes."""
        text = self.path.read_text(errors="replace")
        out: list[str] = []
        for rel in [r for pair in _DIFF_GIT.findall(text) for r in pair] + _OLD_NEW.findall(text):
            if rel not in out:
                out.append(rel)
        return out

    def preimages(self) -> dict[str, str]:
        """Git blob ids (as abbreviated in the patch) of every touched file before the patch."""
        text = self.path.read_text(errors="replace")
        out: dict[str, str] = {}
        for section in re.split(r"(?=^diff --git )", text, flags=re.M):
            m, idx = _DIFF_GIT.search(section), _INDEX.search(section)
            if m and idx and set(idx.group(1)) != {"0"}:
                out[m.group(1)] = idx.group(1)
        return out


def read_entries(series: Path) -> list[Patch]:
    """The series' patches in order; raises if one is missing."""
    entries = []
    for line in series.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, upstream = line.partition(" ")
        patch = series.parent / name
        if not patch.is_file():
            raise FileNotFoundError(f"{series}: listed patch {patch} does not exist")
        entries.append(Patch(patch, upstream.strip() or "unknown upstream version"))
    return entries


def read_series(series: Path) -> list[Path]:
    """Patch files listed in `series`, in order; raises if one is missing."""
    return [p.path for p in read_entries(series)]


def blob_id(path: Path) -> str:
    """Git's blob id of a file's bytes (what a patch's `index` line records)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _apply_one(scratch: Path, patch: Path, reverse: bool) -> bool:
    """Apply (or reverse) `patch` inside `scratch`, exactly (no fuzz); True on success."""
    rev = ["-R"] if reverse else []
    if shutil.which("git"):
        # GIT_DIR at a path that does not exist: `git apply` works as outside any repository, whatever .git
        # files (e.g. a submodule's pointer) lie around
        env = dict(os.environ, GIT_DIR=str(scratch / ".no-git-dir"))
        cmd = ["git", "apply", "--whitespace=nowarn", *rev, str(patch)]
    else:
        env = dict(os.environ)
        cmd = ["patch", "-p1", "-s", "-f", "-F0", "--no-backup-if-mismatch", *rev, "-i", str(patch)]
    return subprocess.run(cmd, cwd=scratch, env=env, capture_output=True).returncode == 0


class Scratch:
    """A temporary copy of the tree's files that the series touches."""

    def __init__(self, tree: Path, files: list[str]):
        self.tree, self.files = tree, files
        self._tmp = tempfile.TemporaryDirectory(prefix="llama-patch-")
        self.root = Path(self._tmp.name)
        for rel in files:
            src = tree / rel
            if src.is_file():
                (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, self.root / rel)

    def run(self, patches: list[Patch], reverse: bool) -> Patch | None:
        """Apply `patches` in order (reverse: un-apply them, in the given order); the first failure or None."""
        for p in patches:
            if not _apply_one(self.root, p.path, reverse):
                return p
        return None

    def changed(self) -> list[str]:
        """Files whose scratch content differs from the tree."""
        out = []
        for rel in self.files:
            a, b = self.tree / rel, self.root / rel
            if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
                out.append(rel)
        return out

    def write_back(self) -> list[str]:
        """Copy the scratch state into the tree, all files or none (originals restored on any failure)."""
        changed = self.changed()
        backup = self.root.parent / (self.root.name + ".orig")
        done: list[str] = []
        try:
            for rel in changed:
                if (self.tree / rel).is_file():
                    (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(self.tree / rel, backup / rel)
            for rel in changed:
                dst, src = self.tree / rel, self.root / rel
                done.append(rel)
                if src.is_file():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dst.with_name(f".{dst.name}.patching")
                    shutil.copy2(src, tmp)
                    os.replace(tmp, dst)
                else:
                    dst.unlink()
        except BaseException:
            for rel in done:
                dst, orig = self.tree / rel, backup / rel
                if orig.is_file():
                    shutil.copy2(orig, dst)
                elif dst.exists():
                    dst.unlink()
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
        return changed

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TreeState:
    """How many patches of the series the tree holds (a prefix of the series)."""

    def __init__(self, n_applied: int, n_total: int):
        self.n_applied, self.n_total = n_applied, n_total


def _all_files(patches: list[Patch]) -> list[str]:
    files: list[str] = []
    for p in patches:
        files += [f for f in p.files() if f not in files]
    return files


def tree_state(tree: Path, patches: list[Patch]) -> TreeState:
    """The k such that the tree is upstream + the first k patches; raises PatchError when there is none."""
    files = _all_files(patches)
    for k in range(len(patches), -1, -1):
        with Scratch(tree, files) as s:
            # un-apply patches k-1..0, then the whole series must go on again: the tree is upstream + k patches
            if s.run(patches[:k][::-1], reverse=True) is None and s.run(patches, reverse=False) is None:
                return TreeState(k, len(patches))
    raise PatchError(_mismatch_message(tree, patches))


def _git_head(tree: Path) -> str | None:
    if not shutil.which("git"):
        return None
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                          text=True, env=env)
    lines = proc.stdout.split()
    if proc.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != tree.resolve():
        return None
    return lines[1][:12]


def _mismatch_message(tree: Path, patches: list[Patch]) -> str:
    """Which patch fails first, the expected upstream version(s), and the files that differ from them."""
    files = _all_files(patches)
    with Scratch(tree, files) as s:
        failed = s.run(patches, reverse=False)
    expected: dict[str, str] = {}
    for p in patches:
        for rel, blob in p.preimages().items():
            expected.setdefault(rel, blob)
    differ = [rel for rel, blob in expected.items()
              if not (tree / rel).is_file() or not blob_id(tree / rel).startswith(blob)]
    versions = sorted({p.upstream for p in patches})
    head = _git_head(tree)
    where = f"{tree}" + (f" (git HEAD {head})" if head else "")
    msg = [f"the patch series does not fit {where}:"]
    if failed is not None:
        msg.append(f"{failed.name} neither applies nor is already applied;")
    msg.append(f"the series was made against {' / '.join(versions)}")
    if differ:
        msg.append(f"and these files differ from that version: {', '.join(differ)}")
    msg.append("(a different llama.cpp version, or local edits in the patched lines). Nothing was changed.")
    return " ".join(msg)


def run(action: str, tree: Path, series: Path, dry_run: bool = False) -> int:
    """Do `action` (apply/check/revert) on `tree`; prints a report and returns the exit status."""
    patches = read_entries(series)
    print(f"{series}: {len(patches)} patches")
    try:
        state = tree_state(tree, patches)
    except PatchError as e:
        print(f"error: {e}")
        return 1
    for i, p in enumerate(patches):
        print(f"  {'applied' if i < state.n_applied else 'not applied':12s} {p.name}  (against {p.upstream})")
    if action == "check":
        return 0
    reverse = action == "revert"
    todo = patches[:state.n_applied][::-1] if reverse else patches[state.n_applied:]
    verb = "revert" if reverse else "apply"
    if not todo:
        print(f"nothing to {verb}")
        return 0
    with Scratch(tree, _all_files(patches)) as s:
        failed = s.run(todo, reverse=reverse)
        if failed is not None:  # tree_state replayed the same steps, so only a tree changing under us gets here
            print(f"error: failed to {verb} {failed.name}; nothing was changed")
            return 1
        if dry_run:
            print(f"would {verb} {len(todo)} patches, changing {len(s.changed())} files: {', '.join(s.changed())}")
            return 0
        changed = s.write_back()
    print(f"{verb}: {len(todo)} patches ({', '.join(p.name for p in todo)}), {len(changed)} files changed")
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
    if not args.series.is_file():
        ap.error(f"--series {args.series} does not exist")
    return run(args.action, args.llama_cpp.resolve(), args.series.resolve(), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
