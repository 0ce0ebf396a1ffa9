"""The GPTQ stage's user error."""

from __future__ import annotations

from glmgguf.errors import GlmggufError


class ExportError(GlmggufError, ValueError):
    """The GPTQ export cannot be planned or run with these inputs."""
