"""Errors of the REAP stage (all one-line user errors on the command line)."""

from glmgguf.errors import GlmggufError


class ReapError(GlmggufError, ValueError):
    """Base of the REAP stage's input errors."""


class StatsError(ReapError):
    """Statistics that are malformed or belong to another model."""


class PruneError(ReapError):
    """A pruning plan that cannot be carried out (too few experts, broken expert groups, bad options)."""


class DataError(ReapError):
    """Calibration input that cannot be read or is too small."""


class RoutingError(ReapError):
    """A router configuration that cannot route (group sizes, top-k larger than the experts left)."""
