"""Errors of the Router-KD stage (each one clear line on the command line)."""

from glmgguf.errors import GlmggufError


class KdError(GlmggufError, ValueError):
    """Base of the KD stage's input errors."""


class CacheError(KdError):
    """A teacher cache that is malformed, incomplete, or was made from another tokenizer or text."""


class StudentMismatchError(KdError):
    """A student that cannot be distilled from this teacher cache (vocab, layout, experts, keep-map)."""


class NanLossError(KdError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


class WriteVerifyError(KdError):
    """The written student differs from the input in a tensor that KD must not change."""
