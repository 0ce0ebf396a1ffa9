"""Outputs never destroy inputs: an output that is, contains or lies inside an input is refused, even with --force,
and a second run writing the same output fails at once."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from glmgguf.cli import main
from glmgguf.io.atomic import OutputConflictError, atomic_dir, output_lock


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tiny_testbed_dir, tmp_path_factory) -> tuple[Path, Path]:
    """DIR/model (a copy of the tiny testbed) and REAP statistics of it beside DIR."""
    from glmgguf.reap.observe import observe

    root = tmp_path_factory.mktemp("outputs")
    model = root / "dir" / "model"
    shutil.copytree(tiny_testbed_dir, model)
    ids = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    stats = observe(model, [ids], streaming=True, dtype=torch.float32)
    return model, stats.save(root / "stats.safetensors")[0]


def _run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("command", ["prune", "nvfp4", "convert-inside", "convert-same-dir", "observe"])
def test_output_overlapping_the_input_is_refused(workspace, tmp_path, command):
    model, stats = workspace
    parent = model.parent
    before = _digest(parent)
    args = {
        "prune": ["reap", "prune", model, "--stats", stats, "--keep", "8", "--out", parent, "--force"],
        "nvfp4": ["nvfp4", "export", model, parent, "--calib", stats, "--force"],
        "convert-inside": ["convert", model, model / "model-00001-of-00009.safetensors", "--outtype", "f32",
                           "--force"],
        "convert-same-dir": ["convert", model, model / "out.gguf", "--outtype", "f32"],
        "observe": ["reap", "observe", model, "--data", stats, "--out", model / "stats.safetensors"],
    }[command]
    code, out = _run(*args)
    assert code == 1 and ("the input" in out) and "Traceback" not in out, out
    assert _digest(parent) == before  # nothing deleted, replaced or left behind


def test_quantize_onto_its_input_is_refused(workspace, tmp_path):
    model, _ = workspace
    gguf = tmp_path / "m.gguf"
    assert _run("convert", model, gguf, "--outtype", "f32")[0] == 0
    before = gguf.read_bytes()
    code, out = _run("quantize", gguf, gguf, "--recipe", "q8_0", "--force")
    assert code == 1 and "is the input" in out, out
    assert gguf.read_bytes() == before


def test_concurrent_writer_fails_clearly(workspace, tmp_path):
    model, _ = workspace
    out = tmp_path / "m.gguf"
    with output_lock(out):  # another run is writing OUT
        code, text = _run("convert", model, out, "--outtype", "f32", "--force")
    assert code == 1 and "another run is writing" in text, text
    assert not out.exists() and not out.with_name("m.gguf.partial").exists()
    assert _run("convert", model, out, "--outtype", "f32")[0] == 0  # the lock is gone with its holder
    assert not out.with_name("m.gguf.lock").exists()


def test_atomic_dir_refuses_a_parent_of_its_input(tmp_path):
    src = tmp_path / "a" / "model"
    src.mkdir(parents=True)
    (src / "w").write_text("keep me")
    with pytest.raises(OutputConflictError, match="contains the input"), atomic_dir(tmp_path / "a", True, [src]):
        pass
    assert (src / "w").read_text() == "keep me"


def test_unwritable_output_is_refused_before_any_work(workspace, tmp_path):
    model, stats = workspace
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out = _run("reap", "observe", model, "--data", stats, "--out", blocker / "sub" / "stats.safetensors")
    assert code == 1 and "cannot create the folder" in out and "Traceback" not in out, out
    # a missing folder is created up front
    code, out = _run("convert", model, tmp_path / "new" / "dir" / "m.gguf", "--outtype", "f32")
    assert code == 0 and (tmp_path / "new" / "dir" / "m.gguf").is_file(), out


def test_kd_train_into_its_teacher_cache_is_refused(workspace, tmp_path):
    from glmgguf.kd.train import train_router

    model, _ = workspace
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    with pytest.raises(OutputConflictError, match="is the input"):
        train_router(model, cache, cache, force=True)
    assert (cache / "manifest.json").read_text() == "{}"
