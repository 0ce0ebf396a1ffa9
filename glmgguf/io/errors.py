"""Errors of the I/O layer (importable without torch)."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed or inconsistent."""
