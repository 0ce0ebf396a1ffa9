"""Fault injection: a full disk, a file-size limit, a read-only place, SIGTERM / kill -9 mid-write, a concurrent run
and damaged inputs each end in one `Error:` line (or a clean exit), with the inputs byte-identical and no partial or
corrupt output left behind; the next run succeeds and leaves nothing stale.

The real commands run as child processes: a file-size limit (`RLIMIT_FSIZE`, SIGXFSZ ignored: writes fail with
EFBIG) works unprivileged and as root; a small or read-only filesystem needs a user namespace (`unshare -rm`) and
is skipped where the system forbids one. A run is stopped mid-write with SIGSTOP once its `X.partial` has data.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from glmgguf.cli import main
from glmgguf.errors import StorageError
from glmgguf.io.atomic import atomic_file

LEFTOVER_SUFFIXES = (".partial", ".lock")


def _digest(*roots: Path) -> dict[str, str]:
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(LEFTOVER_SUFFIXES))


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _glmgguf(*args, limit: int | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [*prefix, sys.executable, "-m", "glmgguf", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(limit) if limit else None)


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmgguf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _one_error_line(r: subprocess.CompletedProcess, message: str) -> None:
    lines = [s for s in r.stderr.splitlines() if s.startswith("Error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.fixture(scope="module")
def inputs(tiny_testbed_dir, tmp_path_factory) -> dict[str, Path]:
    """A copy of the tiny testbed, an f32 GGUF of it and REAP statistics (the inputs every case reads)."""
    from glmgguf.gguf.convert import convert, outtype_chooser
    from glmgguf.reap.observe import observe

    root = tmp_path_factory.mktemp("faults")
    model = root / "model"
    shutil.copytree(tiny_testbed_dir, model)
    ids = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    stats = observe(model, [ids], streaming=True, dtype=torch.float32).save(root / "stats.safetensors")[0]
    gguf = root / "model.gguf"
    convert(model, gguf, outtype_chooser("f32"), progress=False)
    return {"model": model, "stats": stats, "gguf": gguf}


COMMANDS = {  # name -> (arguments, OUT standing for the output; a file-size limit the output exceeds)
    "convert": (["convert", "{model}", "OUT", "--outtype", "f32"], 1 << 20),
    "convert-split": (["convert", "{model}", "OUT", "--outtype", "f32", "--split-max-size", "15M"], 1 << 20),
    "quantize": (["quantize", "{gguf}", "OUT", "--recipe", "q8_0"], 1 << 20),
    "prune": (["reap", "prune", "{model}", "--stats", "{stats}", "--keep", "8", "--out", "OUT"], 1 << 20),
    "nvfp4": (["nvfp4", "export", "{model}", "OUT", "--calib", "{stats}"], 1 << 20),
}


def _args(name: str, inputs: dict[str, Path], out: Path) -> list[str]:
    return [str(out) if a == "OUT" else a.format(**inputs) for a in COMMANDS[name][0]]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_file_size_limit_is_one_error_line_and_leaves_nothing(inputs, tmp_path, name):
    before = _digest(*inputs.values())
    out = tmp_path / "out"
    r = _glmgguf(*_args(name, inputs, out), limit=COMMANDS[name][1])
    _one_error_line(r, f"cannot write {out}: file too large")
    assert list(tmp_path.iterdir()) == [] and _digest(*inputs.values()) == before
    r = _glmgguf(*_args(name, inputs, out))  # the same run without the limit
    assert r.returncode == 0, r.stderr
    assert _leftovers(tmp_path) == [] and _digest(*inputs.values()) == before


def test_file_size_limit_in_a_rust_writer(inputs, tmp_path):
    """safetensors (Rust) reports the errno only inside its message: still one StorageError, nothing left."""
    from glmgguf.reap.stats import ReapStats

    stats = ReapStats.load(inputs["stats"])
    out = tmp_path / "s.safetensors"
    with pytest.raises(StorageError, match=f"cannot write {out}: file too large"), _file_size_limit_here(2048):
        stats.save(out)
    assert list(tmp_path.iterdir()) == []


def _userns_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_userns = pytest.mark.skipif(not _userns_available(), reason="no unprivileged user namespace (unshare -rm)")


def _in_tmpfs(mount: Path, options: str, *args) -> subprocess.CompletedProcess:
    """Run glmgguf with a fresh tmpfs (`options`) on `mount`, then list what is left there (`left:` lines)."""
    script = ('mount -t tmpfs -o "$0" none "$1" || exit 99; shift; "$@"; rc=$?; '
              'ls -A "$MNT" | sed "s/^/left: /"; exit $rc')
    env = {**os.environ, "MNT": str(mount)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, options, str(mount), sys.executable, "-m",
                           "glmgguf", *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@needs_userns
def test_full_disk_removes_every_part_of_a_split_gguf(inputs, tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    before = _digest(inputs["model"])
    # 40 MiB: the first parts fit, a later one fills the disk while the others hold buffered data
    r = _in_tmpfs(mount, "size=40m", "convert", inputs["model"], mount / "out.gguf", "--outtype", "f32",
                  "--split-max-size", "15M")
    assert r.returncode != 99, r.stderr
    _one_error_line(r, f"cannot write {mount / 'out.gguf'}: no space left on the device")
    assert "left:" not in r.stdout, r.stdout
    assert _digest(inputs["model"]) == before


@needs_userns
def test_full_disk_during_a_kd_checkpoint(inputs, tmp_path):
    """Router-KD's checkpoint (gates, then AdamW state through torch.save, whose own writer would turn ENOSPC into
    an opaque RuntimeError) on a disk that fills: one line naming the checkpoint, no partial checkpoint left."""
    from glmgguf.kd.teacher import build_teacher_cache

    ids = torch.randint(0, 4000, (4, 24), generator=torch.Generator().manual_seed(1))
    build_teacher_cache(inputs["model"], ids, tmp_path / "cache", top_k=8, dtype=torch.float32)
    mount = tmp_path / "disk"
    mount.mkdir()
    # 128 KiB: the float32 gates (64 KiB) fit, their AdamW state (twice that) does not
    r = _in_tmpfs(mount, "size=128k", "kd", "train", inputs["model"], "--teacher-cache", tmp_path / "cache",
                  "--out", tmp_path / "out", "--work-dir", mount / "work", "--steps", "2", "--batch-size", "2",
                  "--save-every", "1")
    assert r.returncode != 99, r.stderr
    _one_error_line(r, f"cannot write {mount / 'work' / 'checkpoint-0000001'}: no space left on the device")
    assert "left: work" in r.stdout and not (tmp_path / "out").exists()


@needs_userns
def test_read_only_filesystem_is_refused_before_any_work(inputs, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    r = _in_tmpfs(mount, "ro", "convert", inputs["model"], mount / "out.gguf", "--outtype", "f32")
    assert r.returncode != 99, r.stderr
    _one_error_line(r, f"cannot write {mount / 'out.gguf'}: {mount} is not writable")
    assert "convert:" not in r.stderr  # refused before the progress bar started


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT])
def test_storage_errno_while_writing_removes_the_partial(tmp_path, code):
    out = tmp_path / "x.bin"
    with pytest.raises(StorageError, match=f"cannot write {out}: ") as info, atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(code, os.strerror(code))
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code
    assert list(tmp_path.iterdir()) == []


@contextmanager
def _file_size_limit_here(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE in this process (SIGXFSZ is ignored by Python: a write past `limit` fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_failing_close_of_one_split_part_still_removes_them_all(inputs, tmp_path):
    """Part 2's file is swapped for one already past the size limit before the headers are written: flushing its
    header fails, and fails again when the cleanup closes it (as on a full disk); every part must still go."""
    from glmgguf.gguf.convert import convert, outtype_chooser
    from glmgguf.gguf.metadata import write_provenance

    limit = 64 << 20  # above every real part
    full = tmp_path / "full"
    full.write_bytes(b"")
    os.truncate(full, limit + 1)
    out = tmp_path / "out"
    out.mkdir()
    parts = []

    def fill_part_two(w, *args, **kwargs):
        parts.extend(w.fout)
        fd = os.open(full, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, w.fout[1].fileno())
        os.close(fd)
        return write_provenance(w, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr("glmgguf.gguf.convert.write_provenance", fill_part_two)
    try:
        with pytest.raises(StorageError, match="file too large"), _file_size_limit_here(limit):
            convert(inputs["model"], out / "m.gguf", outtype_chooser("f32"), progress=False,
                    split_max_size=15 << 20)
    finally:
        mp.undo()
    assert len(parts) == 5 and all(f.closed for f in parts) and list(out.iterdir()) == []


def _stop_mid_write(proc: subprocess.Popen, partial: Path) -> None:
    """Wait until `proc` has written part of `partial`, then stop it there (SIGSTOP) until it is sent SIGCONT."""
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 0):
        assert proc.poll() is None, f"finished before it was stopped: {proc.communicate()}"
        assert time.monotonic() < deadline, "no partial output appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)


def _slow_quantize(inputs, out: Path) -> list[str]:
    return ["quantize", str(inputs["gguf"]), str(out), "--recipe", "q4_protected"]  # seconds of writing


def test_sigterm_mid_write_cleans_up_like_ctrl_c(inputs, tmp_path):
    before = _digest(inputs["gguf"])
    out = tmp_path / "q.gguf"
    proc = _start(*_slow_quantize(inputs, out))
    _stop_mid_write(proc, tmp_path / "q.gguf.partial")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [] and _digest(inputs["gguf"]) == before


def test_kill_9_mid_write_leaves_nothing_that_looks_complete(inputs, tmp_path):
    before = _digest(inputs["gguf"])
    out = tmp_path / "q.gguf"
    proc = _start(*_slow_quantize(inputs, out))
    _stop_mid_write(proc, tmp_path / "q.gguf.partial")
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists()  # only the marked partial, never a file under the final name
    r = _glmgguf(*_slow_quantize(inputs, out))
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"] and _digest(inputs["gguf"]) == before
    assert _glmgguf("inspect", out).returncode == 0


def test_concurrent_run_fails_and_the_first_output_is_intact(inputs, tmp_path):
    out = tmp_path / "q.gguf"
    first = _start(*_slow_quantize(inputs, out))
    _stop_mid_write(first, tmp_path / "q.gguf.partial")
    second = _glmgguf(*_slow_quantize(inputs, out), "--force")
    first.send_signal(signal.SIGCONT)
    _one_error_line(second, f"another run is writing {out}")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    alone = tmp_path / "alone.gguf"
    assert _glmgguf(*_slow_quantize(inputs, alone)).returncode == 0
    assert out.read_bytes() == alone.read_bytes()  # the second run did not touch the first's output
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("cut", ["header", "tensor-data"])
@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_truncated_gguf_is_reported_as_truncated(inputs, tmp_path, cut, command):
    data = inputs["gguf"].read_bytes()
    size = 3000 if cut == "header" else len(data) // 2
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:size])
    args = ["inspect", bad] if command == "inspect" else ["quantize", bad, tmp_path / "q.gguf", "--recipe", "q8_0"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {bad} is truncated: {size:,} bytes"), \
        result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_eval_shows_why_llama_server_cannot_load_the_gguf(inputs, tmp_path, llama_toolchain):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(inputs["gguf"].read_bytes()[: 30 << 20])
    result = CliRunner().invoke(main, ["eval", "loops", "--gguf", str(bad), "--prompts", "fuzz",
                                       "--out", str(tmp_path / "ev.json")])
    assert result.exit_code == 1, result.output
    assert "llama-server exited" in result.output and "not within the file bounds" in result.output, result.output
    assert not (tmp_path / "ev.json").exists()


@pytest.mark.parametrize("command", ["observe", "teacher"])
def test_empty_calibration_file_is_named(inputs, tmp_path, command):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "out"
    args = (["reap", "observe", inputs["model"], "--data", empty, "--out", out / "s.safetensors"]
            if command == "observe" else ["kd", "teacher", inputs["model"], "--data", empty, "--out", out])
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and f"calibration file {empty} is empty" in result.output, result.output
    assert not out.exists() or list(out.iterdir()) == []
