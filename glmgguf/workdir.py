"""The work directory of a streaming run: spilled activations, per-layer visitor state and the resume manifest.

It holds nothing but the run's own files (`RUN_FILES`): a directory with anything else in it is refused, and only
the run's files are ever removed (the directory itself only when that leaves it empty).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from glmgguf.errors import GlmggufError

if TYPE_CHECKING:
    from glmgguf.runner import ActivationStore

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_FILES = (MANIFEST, MANIFEST + ".partial", "acts-*", "topk-*", "state-*.safetensors")  # all a work dir holds



class RunnerError(GlmggufError, ValueError):
    """A run that cannot start (work directory, spill settings)."""


class WorkDir:
    """A streaming run's work directory: spilled activations, per-layer visitor state and the resume manifest.

    It is usable when missing, empty, or holding only a run's files (`RUN_FILES`, with a run manifest); anything
    else is refused. Clearing and releasing remove those files only, and the directory itself only when empty.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def manifest(self) -> dict | None:
        """The run manifest, or None when there is none (or it is not a run's)."""
        try:
            m = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return m if isinstance(m, dict) and "key" in m and "done" in m else None

    def _entries(self) -> list[Path]:
        return sorted(self.path.iterdir()) if self.path.is_dir() else []

    def is_ours(self) -> bool:
        entries = self._entries()
        if not entries:
            return not self.path.exists() or self.path.is_dir()
        own = all(any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_FILES) for p in entries)
        return own and self.manifest() is not None

    def check(self) -> None:
        """Raise RunnerError unless a run may use this directory."""
        if not self.is_ours():
            raise RunnerError(f"work directory {self.path} is not empty and is not a streaming run's (files the run "
                              f"did not write, or no run {MANIFEST}): refusing to use it; pass another --work-dir")

    def clear(self) -> None:
        """Start afresh: remove a previous run's files (the directory stays, created if missing)."""
        self.check()
        self._remove_run_files()
        self.path.mkdir(parents=True, exist_ok=True)

    def release(self) -> None:
        """After a finished run: remove its files and the directory when that leaves it empty; a directory that is
        not a run's is left as it is."""
        if not self.path.exists():
            return
        if not self.is_ours():
            log.warning("work directory %s holds files a run did not write: left in place", self.path)
            return
        self._remove_run_files()
        self.path.rmdir()

    def _remove_run_files(self) -> None:
        for p in self._entries():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


class RunRecord:
    """The resume record of a spilled run (the work directory's manifest): the run's key, the finished layers
    and the activation stores the last of them left."""

    def __init__(self, work: WorkDir, key: str):
        self.work = work
        m = work.manifest()
        if m is None or m.get("key") != key:
            work.clear()
            self.data = {"key": key, "done": [], "acts": None, "topk": None}
            self.save()
        else:
            self.data = m

    @property
    def done(self) -> list[int]:
        return list(self.data["done"])

    def save(self) -> None:
        tmp = self.work.path / (MANIFEST + ".partial")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.work.path / MANIFEST)

    def state_path(self, index: int) -> Path:
        return self.work.path / f"state-{index}.safetensors"

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        p = self.state_path(index)
        return load_file(str(p)) if p.is_file() else {}

    def finish_layer(self, index: int, state: dict[str, torch.Tensor] | None, done: list[int],
                     acts: ActivationStore | None, topk: ActivationStore | None) -> None:
        """Persist a finished layer: the visitor's state first, then the manifest naming the new stores."""
        if state:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(self.state_path(index)))
        self.data["done"] = list(done)
        if acts is not None and acts.directory is not None:
            self.data["acts"] = acts.directory.name
        if topk is not None and topk.directory is not None:
            self.data["topk"] = topk.directory.name
        self.save()
