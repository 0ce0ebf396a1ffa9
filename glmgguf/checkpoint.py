"""Open a GLM-5.x checkpoint and check it against its config before any work starts."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glmgguf.io import CheckpointError
from glmgguf.io.fp8 import check_readable
from glmgguf.layout import GlmLayout, LayoutError, Part, parse_hf_name

if TYPE_CHECKING:
    from glmgguf.io.reader import CheckpointReader


@dataclass
class GlmCheckpoint:
    """A validated checkpoint: the lazy tensor reader plus its layout."""

    reader: CheckpointReader
    layout: GlmLayout
    mtp_indexer: bool  # the MTP block(s) carry indexer tensors


def _check_experts(reader: CheckpointReader, layout: GlmLayout) -> None:
    seen: dict[int, set[int]] = defaultdict(set)
    for name in reader.names():
        p = parse_hf_name(name)
        if p is not None and p.expert is not None and p.layer is not None:
            seen[p.layer].add(p.expert)
    for layer in layout.moe_layers:
        ids = seen.get(layer.index, set())
        if ids != set(range(layer.n_experts)):
            extra = sorted(ids - set(range(layer.n_experts)))
            missing = sorted(set(range(layer.n_experts)) - ids)
            raise CheckpointError(
                f"layer {layer.index}: experts must be numbered 0..{layer.n_experts - 1} "
                f"(config n_routed_experts={layer.n_experts}); "
                + (f"found extra expert ids {extra[:8]}" if extra else f"missing expert ids {missing[:8]}")
            )


def open_checkpoint(path: str | os.PathLike) -> GlmCheckpoint:
    """Read headers and config; raise CheckpointError/LayoutError with one clear line on any mismatch."""
    from glmgguf.io.reader import CheckpointReader

    reader = CheckpointReader(path)
    check_readable(reader.config)
    reader.check_scales()
    layout = GlmLayout.from_config(reader.config)
    _check_experts(reader, layout)
    mtp_indexer = any(
        (p := parse_hf_name(n)) is not None and p.rule.part is Part.INDEXER and p.layer is not None
        and p.layer >= layout.n_layers
        for n in reader.names()
    )
    expected = layout.expected_hf_tensors(mtp_indexer=mtp_indexer)
    for name, shape in expected.items():
        if name not in reader:
            raise CheckpointError(f"{path}: tensor {name} is missing (the config implies it)")
        got = reader.info(name).shape
        if got != shape:
            raise LayoutError(
                f"{name} has shape {list(got)} but config.json implies {list(shape)}: config and weights disagree"
            )
    return GlmCheckpoint(reader, layout, mtp_indexer)
