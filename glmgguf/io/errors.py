"""Errors of the I/O layer (importable without torch)."""

from glmgguf.errors import GlmggufError


class CheckpointError(GlmggufError, ValueError):
    """A checkpoint on disk is missing, malformed or inconsistent."""
