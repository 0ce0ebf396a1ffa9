#!/usr/bin/env python3
"""GGUF size and bits per weight of every shipped recipe at GLM-5.2's size, from its config alone.

    python bench/glm52_sizes.py

The tensor bytes are what `glmgguf pipeline --dry-run` estimates (`glmgguf.pipeline.estimate.gguf_bytes`: the
converter's own tensor plan and the recipe's type per tensor, exact against real conversions in
tests/test_pipeline.py), for `examples/glm52_config.json` unpruned and REAP-pruned to 168 experts per layer; bits
per weight = 8 x tensor bytes / parameters (metadata aside). Writes bench/results/glm52_sizes.json.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from upstream import portable

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "glm52_sizes.json"
CONFIG = BENCH.parent / "examples" / "glm52_config.json"
PRUNED_KEEP = 168


def parameters(layout) -> int:
    """Weights of the checkpoint (MTP layer included), counted from the layout's tensor shapes."""
    from math import prod

    return sum(prod(shape) for shape in layout.expected_hf_tensors().values())


def recipe_sizes(layout) -> dict[str, dict]:
    """Per shipped recipe: GGUF tensor bytes and bits per weight."""
    from glmgguf.gguf.recipe import builtin_recipes, load_recipe
    from glmgguf.pipeline.estimate import gguf_bytes

    n = parameters(layout)
    out = {}
    for name in builtin_recipes():
        size = gguf_bytes(layout, load_recipe(name))
        out[name] = {"tensor_bytes": size, "bpw": 8 * size / n}
    return out


def main() -> None:
    from glmgguf.layout import GlmLayout
    from glmgguf.pipeline.estimate import pruned_layout

    full = GlmLayout.from_config(json.loads(CONFIG.read_text()))
    pruned = pruned_layout(full, PRUNED_KEEP, None)
    res = {"machine": {"python": platform.python_version()}, "config": str(CONFIG),
           "models": {"unpruned": {"parameters": parameters(full), "recipes": recipe_sizes(full)},
                      f"reap{PRUNED_KEEP}": {"parameters": parameters(pruned), "recipes": recipe_sizes(pruned)}}}
    for model, m in res["models"].items():
        print(f"{model}: {m['parameters'] / 1e9:.1f} B parameters")
        for name, r in m["recipes"].items():
            print(f"  {name:14s} {r['tensor_bytes'] / 1e9:8.1f} GB  {r['bpw']:.2f} bpw")
    RESULTS.write_text(json.dumps(portable(res), indent=1) + "\n")


if __name__ == "__main__":
    main()
