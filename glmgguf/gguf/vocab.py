"""Tokenizer metadata for GGUF: GLM's byte-level BPE (`gpt2` model, `glm4` pre-tokenizer) and chat template.

Every `tokenizer.ggml.*` key is what the pinned upstream converter writes for the same checkpoint, with one
deliberate difference, decided with Hugging Face tokenization as the judge (tests/test_real_tokenizer.py):

- Token types. An added token marked `special` is CONTROL; an added token that is not `special` is
  USER_DEFINED, whatever it looks like, except GLM's three fill-in-the-middle tokens `<|code_prefix|>`,
  `<|code_middle|>`, `<|code_suffix|>`, which llama.cpp forces to CONTROL when it loads any GGUF (with a
  "probably a bug in the model" warning if the file says otherwise), so the file says CONTROL. Upstream also
  makes CONTROL the 4 other non-special `<|...|>` tokens, `<|begin_of_box|>`, `<|end_of_box|>`, `<|image|>`,
  `<|video|>`; we keep them USER_DEFINED. Hugging Face matches non-special added tokens in text even with
  special-token parsing off (`split_special_tokens=True`) and keeps them when decoding with
  `skip_special_tokens`; llama.cpp does the same for USER_DEFINED tokens and the opposite for CONTROL ones
  (with `parse_special` off it splits `<|image|>` into 5 BPE pieces, and llama-server drops CONTROL tokens from
  generated text). USER_DEFINED is the type that tokenizes and detokenizes as Hugging Face does.
- `add_bos_token` is always written (from tokenizer_config.json, false for GLM); `add_eos_token` is written
  whenever the tokenizer files say it (GLM's `ByteLevel` post-processor: no BOS/EOS added, both false; or
  tokenizer_config.json's `add_eos_token`), exactly as upstream does. Hugging Face adds neither for GLM.
- Special-token ids: bos, eos, unk, sep, pad, cls, mask from tokenizer_config.json's `<type>_token`, else
  config.json's integer `<type>_token_id` (so a pad token named only in config.json is written, as upstream
  does); then GLM's own: bos `[gMASK]` and unk `<|endoftext|>` where still unset, eot `<|user|>` (the end of
  an assistant turn) and eom `<|observation|>`. config.json's `eos_token_id` list is not a key (a GGUF holds
  one eos id); llama.cpp treats all three of its tokens as end-of-generation by their text.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf

from glmgguf.io import CheckpointError

log = logging.getLogger(__name__)

GLM_SPECIAL = {"bos": "[gMASK]", "eot": "<|user|>", "unk": "<|endoftext|>", "eom": "<|observation|>"}
# Added tokens llama.cpp treats as CONTROL whatever the file says (its fill-in-the-middle token detection).
RUNTIME_CONTROL = frozenset({"<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>"})
# Special-token types looked up in tokenizer_config.json, then config.json (gguf-py SpecialVocab's list).
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: object) -> object:
    return value.get("content") if isinstance(value, dict) else value


def special_token_ids(tok: dict, tcfg: dict, config: dict, vocab_size: int) -> dict[str, int]:
    """Special-token type -> id, in the order and from the sources the upstream converter uses."""
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    ids: dict[str, int] = {}
    for typ in SPECIAL_TYPES:
        content = _token_content(tcfg.get(f"{typ}_token"))
        if content in added:
            ids[typ] = added[content]
    for typ in SPECIAL_TYPES:
        value = config.get(f"{typ}_token_id")
        if typ not in ids and isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < vocab_size:
                ids[typ] = value
            else:
                log.warning("config.json %s_token_id %d is outside the vocabulary; not written", typ, value)
    missing = [t for t in GLM_SPECIAL.values() if t not in added]
    if missing:
        raise CheckpointError(f"GLM special tokens missing from tokenizer.json: {missing}")
    for typ in ("bos", "unk"):
        ids.setdefault(typ, added[GLM_SPECIAL[typ]])
    ids["eot"] = added[GLM_SPECIAL["eot"]]
    ids["eom"] = added[GLM_SPECIAL["eom"]]
    return ids


def add_special_flags(tok: dict, tcfg: dict) -> dict[str, bool]:
    """`add_bos` / `add_eos`: what Hugging Face's post-processor adds when encoding (see the module docstring)."""
    post = tok.get("post_processor") or {}
    processors = post.get("processors", [post]) if post else []
    flags: dict[str, bool] = {}
    if any(p.get("type") == "ByteLevel" for p in processors):
        flags = {"bos": False, "eos": False}
    for typ in ("bos", "eos"):
        value = tcfg.get(f"add_{typ}_token")
        if isinstance(value, bool) and typ not in flags:
            flags[typ] = value
    flags.setdefault("bos", False)
    return flags


def _tokens_and_types(tok: dict, vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Token strings and types for ids 0..vocab_size-1 (`[PADi]` UNUSED past the tokenizer's last id)."""
    id_to_token: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    special_ids: set[int] = set()
    added_ids: set[int] = set()
    for added in tok.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        is_control = added.get("special") or added["content"] in RUNTIME_CONTROL
        (special_ids if is_control else added_ids).add(added["id"])
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
    return tokens, types


def write_vocab(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Token list, types, merges, special ids and chat template from the checkpoint's tokenizer files."""
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.json (GLM's BPE tokenizer is required)")
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{tok_path}: tokenizer model is {model.get('type')}, expected BPE")
    tokens, types = _tokens_and_types(tok, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(model))

    tcfg = _read_json(model_dir / "tokenizer_config.json")
    try:
        ids = special_token_ids(tok, tcfg, _read_json(model_dir / "config.json"), vocab_size)
    except CheckpointError as e:
        raise CheckpointError(f"{tok_path}: {e}") from None
    for typ, token_id in ids.items():
        getattr(w, f"add_{typ}_token_id")(token_id)
    for typ, value in add_special_flags(tok, tcfg).items():
        getattr(w, f"add_add_{typ}_token")(value)
    template = tcfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template:
        w.add_chat_template(template)
