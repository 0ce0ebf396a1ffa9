"""The package as users install it: sdist -> wheel -> a fresh virtual environment, used outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("glmgguf/quant_recipes/q4_protected.toml", "glmgguf/patches/apply.py", "glmgguf/patches/llama.cpp/series",
           "glmgguf/patches/llama.cpp/0001-glm-dsa-per-layer-routed-expert-counts.patch",
           "glmgguf/pipeline/plans/testbed.toml", "glmgguf/eval/prompts/fuzz.jsonl")


def _build(tmp: Path) -> Path:
    """sdist from the checkout, then the wheel from the unpacked sdist (what pip does with an sdist)."""
    hook = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    dist = tmp / "dist"
    sdist = dist / subprocess.run([sys.executable, "-c", hook, "build_sdist", str(dist)], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp / "src", filter="data")
    assert all(any(n.endswith(f) for n in names) for f in SHIPPED), names
    unpacked = next((tmp / "src").iterdir())
    wheel = dist / subprocess.run([sys.executable, "-c", hook, "build_wheel", str(dist)], cwd=unpacked, check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
    assert set(SHIPPED) <= set(zipfile.ZipFile(wheel).namelist())
    return wheel


@pytest.mark.slow
def test_wheel_works_outside_the_source_tree(tmp_path, llama_toolchain):
    wheel = _build(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel, as scripts/setup.sh installs it
    subprocess.run([*pip, str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def glmgguf(*args: str) -> str:
        proc = subprocess.run([str(venv / "bin" / "glmgguf"), *args], cwd=work, env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc.stdout

    from glmgguf import __version__

    assert glmgguf("--version").strip().endswith(__version__)
    location = subprocess.run([str(venv / "bin" / "python"), "-c", "import glmgguf; print(glmgguf.__file__)"],
                              cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in location  # the installed copy, not the checkout
    assert {"q4_protected", "q3_protected", "q8_0"} <= {line.split()[0] for line in glmgguf("recipes").splitlines()}
    glmgguf("testbed", "tb", "--size", "tiny")
    glmgguf("convert", "tb", "out.gguf", "--recipe", "q4_protected", "--threads", "2")
    from gguf import GGUFReader

    fields = GGUFReader(work / "out.gguf").fields
    assert fields["glmgguf.recipe"].contents() == "q4_protected"
    assert fields["glmgguf.version"].contents() == __version__
    assert "not applied" in glmgguf("patch", "check", "--llama-cpp", str(llama_toolchain.source_dir))
    assert "llama-server" in glmgguf("llama", "where")
