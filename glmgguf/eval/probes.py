"""Probe prompts: JSONL files of `{"messages": [...]}` or `{"text": ...}` lines, and the built-in fuzz suite."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from glmgguf.errors import GlmggufError

BUILTIN = {"fuzz": "fuzz.jsonl"}


class EvalError(GlmggufError, ValueError):
    """Bad evaluation input (prompts, run files, sampler settings): a one-line CLI error."""


@dataclass(frozen=True)
class Prompt:
    """One probe: chat `messages` or a raw `text` prompt, with its `id` and `source` tag."""

    id: str
    source: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None


def _parse(line: str, number: int) -> Prompt:
    """One JSONL line -> Prompt; ValueError says what is wrong."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    messages, text = obj.get("messages"), obj.get("text")
    if (messages is None) == (text is None):
        raise ValueError("needs exactly one of 'messages' or 'text'")
    if text is not None and not (isinstance(text, str) and text):
        raise ValueError("'text' must be a non-empty string")
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise ValueError("'messages' must be a non-empty list of {role, content} strings")
    return Prompt(id=str(obj.get("id", f"line-{number}")), source=str(obj.get("source", "default")),
                  messages=messages, text=text)


def load_prompts(spec: str | os.PathLike[str]) -> tuple[list[Prompt], str]:
    """Prompts from a JSONL file, or a built-in suite by name ("fuzz"); also returns the content's sha256."""
    if str(spec) in BUILTIN:
        name = f"{spec} (built-in)"
        raw = resources.files("glmgguf.eval").joinpath("prompts", BUILTIN[str(spec)]).read_bytes()
    else:
        name = str(spec)
        raw = Path(spec).read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise EvalError(f"{name} is not a text file; prompts must be JSONL ({{\"messages\": ...}} or "
                        "{\"text\": ...} per line)") from None
    prompts: list[Prompt] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                prompts.append(_parse(line, number))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                bad.append((number, str(e).split(":")[0]))
    if not prompts:
        raise EvalError(f"{name} is not a prompts file: expected JSONL with one {{\"messages\": [...]}} or "
                        f"{{\"text\": ...}} object per line" + (f" (line 1: {bad[0][1]})" if bad else " (empty)"))
    if bad:
        numbers = ", ".join(str(n) for n, _ in bad[:20]) + (", ..." if len(bad) > 20 else "")
        raise EvalError(f"{name}: {len(bad)} malformed line(s): {numbers} (line {bad[0][0]}: {bad[0][1]})")
    dup = sorted(i for i, k in Counter(p.id for p in prompts).items() if k > 1)
    if dup:
        raise EvalError(f"{name}: duplicate prompt ids: {', '.join(dup[:10])}")
    return prompts, hashlib.sha256(raw).hexdigest()
