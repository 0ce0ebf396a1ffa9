"""The keep-map `reap prune` writes beside a pruned checkpoint (`reap_keep_map.json`), read without torch.

Per MoE layer the original ids of the kept experts (position = new id) and the layer's expert count before
pruning: what slicing an imatrix of the unpruned model needs (`glmgguf imatrix slice`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from glmgguf.reap.errors import PruneError

KEEP_MAP_NAME = "reap_keep_map.json"


@dataclass(frozen=True)
class KeepMap:
    """MoE layer -> kept original expert ids, and MoE layer -> expert count of the unpruned model."""

    keep: dict[int, list[int]]
    source_experts: dict[int, int]


def read_keep_map(path: str | os.PathLike) -> KeepMap:
    """The keep-map of a pruned checkpoint directory, or of a `reap_keep_map.json` file itself."""
    path = Path(path)
    file = path / KEEP_MAP_NAME if path.is_dir() else path
    if not file.is_file():
        raise PruneError(f"{path} has no {KEEP_MAP_NAME} (not a pruned checkpoint)" if path.is_dir()
                         else f"keep-map {path} not found")
    try:
        data = json.loads(file.read_text())
        keep = {int(k): [int(e) for e in v] for k, v in data["keep_map"].items()}
        source = {int(k): int(v) for k, v in data.get("source_experts", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PruneError(f"{file}: not a keep-map written by `reap prune` ({e!r})") from None
    return KeepMap(keep, source)
