"""Open a GGUF with gguf-py's reader, reporting a truncated, empty or foreign file in one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from glmgguf.errors import GlmggufError


class GgufFileError(GlmggufError, ValueError):
    """A file is not a complete, readable GGUF."""


class _Truncated(GgufFileError):
    """A read past the end of the file; `read_gguf` turns it into the message."""

    def __init__(self, needed: int):
        super().__init__(f"a read needs {needed} bytes")
        self.needed = needed


class _BoundedReader(GGUFReader):
    """gguf-py's reader, except that a read past the end of the file (a truncated GGUF) fails as such instead of
    returning a short array that numpy later rejects with a reshape or dtype error."""

    def _get(self, offset: int, dtype, count: int = 1, override_order=None):
        end = offset + int(np.dtype(dtype).itemsize) * int(count)
        if end > len(self.data):
            raise _Truncated(end)
        return super()._get(offset, dtype, count, override_order)


def read_gguf(path: str | os.PathLike, what: str = "GGUF file") -> GGUFReader:
    """A reader of `path` (header, KV and tensor infos parsed, data memory-mapped); `what` names the expected
    content in errors (e.g. "imatrix GGUF")."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise GgufFileError(f"{p} is empty (0 bytes), not a {what}")
    try:
        return _BoundedReader(p)
    except _Truncated as e:
        raise GgufFileError(f"{p} is truncated: {size:,} bytes, but the {what} needs at least {e.needed:,} "
                            "(an interrupted copy or download?)") from None
    except Exception as e:  # noqa: BLE001 - gguf-py raises bare ValueErrors, KeyErrors and struct errors
        raise GgufFileError(f"{p}: not a readable {what} ({e})") from None
