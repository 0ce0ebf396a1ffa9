"""The llama.cpp patch series: which GGUF features need which patch, and the apply tool as a module.

`patches/apply.py` is stdlib-only so that it runs inside any llama.cpp checkout; this module loads it and names
the patches the converter records in `glmgguf.requires_patches` when a GGUF uses a feature that the pinned,
unpatched llama.cpp cannot load.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from glmgguf.resources import package_path

PATCH_DIR = package_path("patches")  # top-level patches/ in a checkout links here
SERIES = PATCH_DIR / "llama.cpp" / "series"

# glm-dsa.expert_count as an array (one entry per block): non-uniformly pruned models
PER_LAYER_EXPERTS = "0001-glm-dsa-per-layer-routed-expert-counts.patch"
# glm-dsa.attention.indexer.layer_norm_epsilon (unpatched runtimes ignore the key and use eps 0)
INDEXER_NORM_EPS = "0002-glm-dsa-indexer-k_norm-epsilon-from-metadata.patch"


def apply_module() -> ModuleType:
    """`patches/apply.py`, loaded as a module (package data: it is meant to run as a script too)."""
    spec = importlib.util.spec_from_file_location("glmgguf_patch_apply", PATCH_DIR / "apply.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {PATCH_DIR / 'apply.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
