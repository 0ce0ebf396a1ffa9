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
                 ["nvfp4", "export", str(tmp_path / "missing"), str(tmp_path / "out")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.output.startswith("Error: "), (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
