"""Files shipped inside the package (recipes, the llama.cpp patch series, plans, prompts), found the same way in a
source checkout, an editable install and an installed wheel."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path


def package_path(name: str) -> Path:
    """The filesystem path of `name` inside the installed `glmgguf` package (a directory or a file)."""
    with as_file(files("glmgguf") / name) as path:  # a real path for any regular (non-zip) installation
        return Path(path)
