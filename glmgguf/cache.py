"""Where the toolkit keeps what it builds, downloads and trains once (toolchains, tokenizers, testbeds)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of the toolkit's cache: `$GLMGGUF_CACHE`, else `~/.cache/glmgguf`."""
    env = os.environ.get("GLMGGUF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glmgguf"
