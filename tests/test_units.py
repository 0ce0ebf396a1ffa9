"""Sizes: binary for memory and shards, decimal for llama.cpp's split sizes, and the decimal formatter."""

from __future__ import annotations

import pytest

from glmgguf.units import format_size, parse_size, parse_split_size


def test_sizes():
    assert parse_size("4G") == 4 * 1024**3 and parse_size("512MiB") == 512 * 1024**2 and parse_size("0") == 0
    assert parse_size("1.5k") == 1536
    assert parse_split_size("50G") == 50 * 10**9 and parse_split_size("5M") == 5 * 10**6
    assert format_size(755_600_000_000) == "755.6 GB" and format_size(999) == "999 B"
    for bad in ("-1G", "lots", "inf"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)
    for bad in ("0", "5X", ""):
        with pytest.raises(ValueError, match="invalid split size"):
            parse_split_size(bad)
