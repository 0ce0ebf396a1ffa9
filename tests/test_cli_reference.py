"""docs/CLI.md is generated from the click commands; it must match them. Regenerate: python scripts/cli_reference.py"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from types import ModuleType

import click
import pytest

from glmgguf.cli import main

ROOT = Path(__file__).resolve().parent.parent


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_md_is_current() -> None:
    gen = generator()
    want = gen.render(main)
    have = gen.OUT.read_text() if gen.OUT.exists() else ""
    if have != want:
        diff = list(difflib.unified_diff(have.splitlines(), want.splitlines(), "docs/CLI.md", "generated", lineterm=""))
        pytest.fail("docs/CLI.md is out of date with the click commands: run `python scripts/cli_reference.py` and "
                    "commit docs/CLI.md\n" + "\n".join(diff[:60]), pytrace=False)


def test_render_ignores_terminal_and_restores_options(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = generator()
    before = [(c.command_path, o.name, o.show_default) for c in gen.walk(main, "glmgguf") for o in c.command.params
              if isinstance(o, click.Option)]
    wide = gen.render(main)
    monkeypatch.setenv("COLUMNS", "40")
    assert gen.render(main) == wide
    assert str(ROOT) not in wide and str(Path.home()) + "/" not in wide  # no machine paths in the docs
    after = [(c.command_path, o.name, o.show_default) for c in gen.walk(main, "glmgguf") for o in c.command.params
             if isinstance(o, click.Option)]
    assert after == before
