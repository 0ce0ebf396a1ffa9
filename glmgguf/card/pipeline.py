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
OUTPUT_STAGES = ("prune", "kd", "nvfp4")  # besides every gguf-NAME

log = logging.getLogger(__name__)


def card_path(output: Path) -> Path:
    """Where an output's card goes: inside a folder output (checkpoint, split GGUF), beside a single file."""
    return output / CARD if output.is_dir() else output.parent / CARD


def _is_output(name: str) -> bool:
    return name in OUTPUT_STAGES or name.startswith("gguf-")


def workdir_builds(workdir: Path) -> list[StageRecord]:
    """The finished output stages found in a workdir."""
    recs = [read_stage(d) for d in sorted(workdir.iterdir()) if d.is_dir() and _is_output(d.name)]
    return [r for r in recs if r is not None and r.output.exists()]


def write_plan_cards(plan: Plan, stages: list[Stage], echo: Callable[[str], None] = print) -> list[Path]:
    """A card for every finished output stage of the plan; returns their paths."""
    info = plan.card
    source = plan.model if ":" in plan.model else Path(plan.model).name
    rows = []
    for s in stages:
        if not _is_output(s.name) or read_stage(s.dir) is None or not s.output.exists():
            continue
        try:
            facts = gather(s.output, info.base_model if info else None, info.license if info else None, source)
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
