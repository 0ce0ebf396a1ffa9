"""One error hierarchy: every exception class the toolkit defines is a `GlmggufError`, printed as one line."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from click.testing import CliRunner

import glmgguf
from glmgguf.cli import main
from glmgguf.errors import GlmggufError


def _modules():
    for info in pkgutil.walk_packages(glmgguf.__path__, "glmgguf."):
        if not info.name.endswith("__main__"):  # runs the command line when imported
            yield importlib.import_module(info.name)


def test_every_toolkit_exception_is_a_glmgguf_error():
    defined = {cls for mod in _modules() for _, cls in inspect.getmembers(mod, inspect.isclass)
               if issubclass(cls, BaseException) and cls.__module__.startswith("glmgguf.")}
    assert len(defined) > 20
    outside = sorted(c.__qualname__ for c in defined if not issubclass(c, GlmggufError))
    # control-flow signals, never shown to users: an eval prompt cut short, a runner stopped on purpose in tests
    assert outside == ["Cancelled", "RunInterrupted"], outside


def test_errors_become_one_line_for_every_command(tmp_path):
    for args in (["convert", str(tmp_path / "missing"), str(tmp_path / "x.gguf")],
                 ["pipeline", str(tmp_path / "missing.toml")],
                 ["quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "y.gguf"), "--recipe", "q8_0"],
                 ["nvfp4", "export", str(tmp_path / "missing"), str(tmp_path / "out")],
                 ["reap", "observe", str(tmp_path / "missing"), "--data", __file__, "--out", str(tmp_path / "s")],
                 ["kd", "teacher", str(tmp_path / "missing"), "--data", __file__, "--out", str(tmp_path / "c")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.output.startswith("Error: "), (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_device_that_is_not_one_is_refused_before_any_work(tmp_path):
    """A mistyped device is a usage error naming the option and the accepted forms, before any file is read."""
    for args, words in ((["nvfp4", "export", str(tmp_path), str(tmp_path / "o"), "--device", "cdua"],
                         "Invalid value for '--device': 'cdua' is not a device: use cpu, cuda or cuda:N"),
                        (["reap", "observe", str(tmp_path), "--data", "x", "--out", "o", "--device", "gpu0"],
                         "Invalid value for '--device': 'gpu0' is not a device: use cpu, cuda, cuda:N or auto"),
                        (["kd", "train", str(tmp_path), "--teacher-cache", str(tmp_path), "--out", "o",
                          "--device-map", "cuda:x"],
                         "Invalid value for '--device-map': 'cuda:x' is not a device: use cpu, cuda, cuda:N or auto")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)
