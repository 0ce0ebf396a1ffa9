"""`glmgguf demo`: the main job on the built-in testbed, through a real llama-server."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from glmgguf.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, llama_toolchain, trained_testbed_dir):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--max-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "testbed-q4_protected.gguf").stat().st_size > 0
    m = re.search(r"generation: (\d+) tokens at", result.output)
    assert m and int(m.group(1)) > 0, result.output
    assert "127.0.0.1" in result.output and (tmp_path / "llama-server.log").exists()
