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
    gguf = tmp_path / "pipeline" / "gguf-q4_protected" / "q4_protected.gguf"
    assert gguf.stat().st_size > 0
    for stage in ("observe", "prune", "teacher", "kd", "lora", "gguf-q4_protected", "eval-greedy", "eval-report",
                  "variants-report"):
        assert (tmp_path / "pipeline" / stage / "manifest.json").is_file(), stage
    assert "kept 11 of 16 experts" in result.output and "held-out KL to the teacher" in result.output
    assert "LoRA-KD: rank 8 on attn,shared + router gates" in result.output
    assert "| lora-guarded | 16 |" in result.output and "| lora |" in result.output
    assert "Loop evaluation" in result.output
    m = re.search(r"generation: (\d+) tokens at", result.output)
    assert m and int(m.group(1)) > 0, result.output
    assert "127.0.0.1" in result.output and (tmp_path / "llama-server.log").exists()
