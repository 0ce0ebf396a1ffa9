"""Tokenizer metadata for GGUF: GLM's byte-level BPE (`gpt2` model, `glm4` pre-tokenizer) and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from glmgguf.io import CheckpointError

GLM_SPECIAL = {"bos": "[gMASK]", "eot": "<|user|>", "unk": "<|endoftext|>", "eom": "<|observation|>"}


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def write_vocab(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Token list, types, merges, special ids and chat template from tokenizer.json/tokenizer_config.json."""
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.json (GLM's BPE tokenizer is required)")
    tok = json.loads(tok_path.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{tok_path}: tokenizer model is {model.get('type')}, expected BPE")
    id_to_token: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special_ids: set[int] = set()
    added_ids: set[int] = set()
    for added in tok.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        (special_ids if added.get("special") else added_ids).add(added["id"])
    if max(id_to_token) >= vocab_size:
        raise CheckpointError(f"tokenizer has token id {max(id_to_token)} but vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(id_to_token[i])
        types.append(gguf.TokenType.CONTROL if i in special_ids
                     else gguf.TokenType.USER_DEFINED if i in added_ids else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(model))

    ids = {t: i for i, t in id_to_token.items()}
    missing = [t for t in GLM_SPECIAL.values() if t not in ids]
    if missing:
        raise CheckpointError(f"{tok_path}: GLM special tokens missing: {missing}")
    w.add_bos_token_id(ids[GLM_SPECIAL["bos"]])
    w.add_eot_token_id(ids[GLM_SPECIAL["eot"]])
    w.add_unk_token_id(ids[GLM_SPECIAL["unk"]])
    w.add_eom_token_id(ids[GLM_SPECIAL["eom"]])
    cfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    for key, add in (("eos_token", w.add_eos_token_id), ("pad_token", w.add_pad_token_id)):
        value = tcfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            add(ids[value])
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if template:
        w.add_chat_template(template)
