"""Sizes as users write and read them: one parser per convention and one formatter."""

from __future__ import annotations

import math
import re

_SPLIT_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '0' -> bytes (K/M/G/T are powers of 1024): memory and shard sizes."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for i, u in enumerate("KMGT", start=1):
        if s.endswith(u):
            mult, s = 1024**i, s[:-1]
            break
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"invalid size {text!r} (e.g. 4G, 512M)") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"invalid size {text!r}")
    return int(value * mult)


def parse_split_size(text: str) -> int:
    """'50G' -> bytes, as llama.cpp's gguf-split and convert_hf_to_gguf read it (K/M/G/T = powers of 1000)."""
    m = _SPLIT_SIZE.match(str(text))
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"invalid split size {text!r} (e.g. 50G, 500M)")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


def format_size(n: int) -> str:
    """Bytes in decimal units, one decimal: 755.6 GB (how checkpoints and disks are sized)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
