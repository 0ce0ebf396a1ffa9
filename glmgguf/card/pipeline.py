"""The cards of a plan's outputs: one next to each finished output, each with the family table of all of them.

Cards are written after the stages, every run, from the manifests as they are then (so a GGUF's card carries the
evaluations that ran after it); they are not stage outputs and no stage reads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from glmgguf.card.facts import StageRecord, read_stage
from glmgguf.card.gather import gather
from glmgguf.card.render import FamilyRow, render
from glmgguf.errors import GlmggufError
from glmgguf.pipeline.plan import Plan
from glmgguf.pipeline.stages import Stage

CARD = "README.md"
BUILDS = ("prune", "kd", "gguf-", "nvfp4")  # the output stages ("gguf-": every gguf-NAME), in the family's order

log = logging.getLogger(__name__)


def card_path(output: Path) -> Path:
    """Where an output's card goes: inside a folder output (checkpoint, split GGUF), beside a single file."""
    return output / CARD if output.is_dir() else output.parent / CARD


def _kind(name: str) -> str:
    return "gguf-" if name.startswith("gguf-") else name


def build_order(name: str) -> tuple[int, str]:
    """The family table's order: pruned, distilled, the GGUFs by name, NVFP4."""
    return BUILDS.index(_kind(name)), name


def workdir_builds(workdir: Path) -> list[StageRecord]:
    """The finished output stages found in a workdir, in the family table's order."""
    recs = [read_stage(d) for d in workdir.iterdir() if d.is_dir() and _kind(d.name) in BUILDS]
    return sorted((r for r in recs if r is not None and r.output.exists()), key=lambda r: build_order(r.name))


def write_plan_cards(plan: Plan, stages: list[Stage], echo: Callable[[str], None] = print) -> list[Path]:
    """A card for every finished output stage of the plan; returns their paths."""
    info = plan.card
    rows = []
    for s in sorted((s for s in stages if _kind(s.name) in BUILDS), key=lambda s: build_order(s.name)):
        if read_stage(s.dir) is None or not s.output.exists():
            continue
        try:
            facts = gather(s.output, info.base_model if info else None, info.license if info else None)
        except (GlmggufError, OSError) as e:
            log.warning("no card for %s: %s", s.name, e)
            continue
        rows.append(FamilyRow(facts, card_path(s.output)))
    for r in rows:
        tmp = r.card.with_name(r.card.name + ".partial")
        tmp.write_text(render(r.facts, rows, r.card.parent))
        os.replace(tmp, r.card)
    if rows:
        echo(f"[cards] {len(rows)} model card(s): " + ", ".join(str(r.card.relative_to(plan.workdir)) for r in rows))
    return [r.card for r in rows]
