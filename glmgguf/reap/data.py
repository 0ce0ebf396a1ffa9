"""Calibration data: text or chat records from .txt / .jsonl / .parquet, packed into equal-length sequences.

Records: a .txt file is one document; a .jsonl line or a parquet row is a document with a `text` field (or the
field named by `text_field`), or a chat with a `messages` list of {role, content}, rendered with the model's chat
template. Documents are taken in a seeded random order and tokenized until the token budget is filled; tokens are
concatenated with the end-of-text token between documents and cut into `seq_len` windows (a last partial window
is dropped). The same files, seed and budget always give the same sequences.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from glmgguf.io.errors import CheckpointError
from glmgguf.reap.errors import DataError


@dataclass(frozen=True)
class Calibration:
    """Packed calibration sequences [N, seq_len] and where they came from."""

    sequences: torch.Tensor
    documents_used: int
    documents_total: int

    @property
    def n_tokens(self) -> int:
        return int(self.sequences.numel())

    def describe(self) -> dict:
        return {"sequences": int(self.sequences.shape[0]), "seq_len": int(self.sequences.shape[1]),
                "tokens": self.n_tokens, "documents_used": self.documents_used,
                "documents_total": self.documents_total}


def _record(obj: object, where: str, text_field: str) -> str | list[dict]:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        if isinstance(obj.get("messages"), list):
            return obj["messages"]
        if isinstance(obj.get(text_field), str):
            return obj[text_field]
        if isinstance(obj.get("conversations"), list):
            return obj["conversations"]
    raise DataError(f"{where}: a record needs a '{text_field}' string or a 'messages' list")


def read_records(path: str | os.PathLike, text_field: str = "text") -> list[str | list[dict]]:
    """All documents of one file: strings (text) or message lists (chats)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} not found")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".md", ".py", ".text"):
        return [p.read_text(encoding="utf-8", errors="replace")]
    if suffix in (".jsonl", ".json"):
        out: list[str | list[dict]] = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{n}: invalid JSON ({e.msg})") from None
                    out.append(_record(obj, f"{p}:{n}", text_field))
        return out
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is a dependency
            raise DataError("reading parquet needs pyarrow") from None
        table = pq.read_table(p)
        cols = table.column_names
        if "messages" in cols:
            return [_record({"messages": m}, f"{p} row {i}", text_field)
                    for i, m in enumerate(table.column("messages").to_pylist())]
        if text_field in cols:
            return [_record(t, f"{p} row {i}", text_field)
                    for i, t in enumerate(table.column(text_field).to_pylist())]
        raise DataError(f"{p}: parquet needs a '{text_field}' or 'messages' column (has {cols})")
    raise DataError(f"{p}: unsupported calibration format {suffix!r} (use .txt, .jsonl or .parquet)")


def _render(tokenizer, doc: str | list[dict]) -> list[int]:
    if isinstance(doc, str):
        return tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
    msgs = [{"role": m.get("role") or m.get("from"), "content": m.get("content") or m.get("value") or ""}
            for m in doc]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _separator(tokenizer) -> list[int]:
    for name in ("eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return [int(tid)]
    return []


def pack(docs: Sequence[str | list[dict]], tokenizer, seq_len: int, max_tokens: int | None = None,
         num_samples: int | None = None, seed: int = 0) -> Calibration:
    """Tokenize documents in a seeded order until the budget is met; cut into [N, seq_len] rows."""
    if seq_len < 2:
        raise DataError("--seq-len must be at least 2")
    budget_rows = None
    if max_tokens is not None:
        budget_rows = max_tokens // seq_len
    if num_samples is not None:
        budget_rows = num_samples if budget_rows is None else min(budget_rows, num_samples)
    if budget_rows is not None and budget_rows < 1:
        raise DataError(f"a budget of {max_tokens} tokens holds no sequence of {seq_len} tokens")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sep = _separator(tokenizer)
    stream: list[int] = []
    used = 0
    for i in order:
        if budget_rows is not None and len(stream) >= budget_rows * seq_len:
            break
        stream.extend(_render(tokenizer, docs[i]))
        stream.extend(sep)
        used += 1
    rows = len(stream) // seq_len
    if budget_rows is not None:
        rows = min(rows, budget_rows)
    if rows == 0:
        raise DataError(f"calibration data has {len(stream)} tokens: not one sequence of {seq_len}")
    seqs = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
    return Calibration(seqs, used, len(docs))


def load_calibration(paths: Sequence[str | os.PathLike], tokenizer, seq_len: int, max_tokens: int | None = None,
                     num_samples: int | None = None, seed: int = 0, text_field: str = "text") -> Calibration:
    """Read every file, then `pack`."""
    docs: list[str | list[dict]] = []
    for p in paths:
        records = read_records(p, text_field)
        if all(isinstance(r, str) and not r.strip() for r in records):
            raise DataError(f"calibration file {p} is empty (no text)")
        docs.extend(records)
    if not docs:
        raise DataError("no calibration documents found")
    return pack(docs, tokenizer, seq_len, max_tokens=max_tokens, num_samples=num_samples, seed=seed)


def load_tokenizer(model_dir: str | os.PathLike):
    """The checkpoint's own tokenizer (never a hub lookup: a missing directory is a `CheckpointError`)."""
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
