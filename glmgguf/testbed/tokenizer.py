"""A small, real GLM-style byte-level BPE tokenizer trained on the Python standard library's own sources.

Every machine with Python has the same text for the same Python version, so the tokenizer (and the testbed
models built on it) can be rebuilt anywhere, deterministically, without downloading anything.

Layout follows GLM-4.5 / GLM-5: byte-level BPE whose pre-tokenizer is a regex `Split` (the regex llama.cpp's
`glm4` pre-tokenizer implements) followed by `ByteLevel` without its own regex or prefix space; the GLM
special tokens come after the BPE tokens, at the end of the vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 4096

# The pre-tokenizer regex of llama.cpp's LLAMA_VOCAB_PRE_TYPE_CHATGLM4 (`glm4` / `glm5` pre-tokenizer names),
# spelled exactly as llama.cpp spells it so both sides split text identically.
GLM4_SPLIT_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GLM special tokens in GLM's order (so <|endoftext|>, <|user|>, <|observation|> keep GLM-5's relative offsets
# 0, 7, 9). Control tokens are `special`; the reasoning / tool-call tags are ordinary added tokens, so they
# survive decoding with skip_special_tokens and reasoning/tool parsers can see them.
CONTROL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>",
]
TAG_TOKENS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
]
SPECIAL_TOKENS = CONTROL_TOKENS + TAG_TOKENS
N_BPE = VOCAB_SIZE - len(SPECIAL_TOKENS)

EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]
PAD_TOKEN = "<|endoftext|>"

# Excluded from the corpus: tests (huge, odd encodings), generated tables and doc dumps.
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
               "pydoc_data", "lib2to3", "ensurepip", "turtledemo"}
HELDOUT_MODULUS = 10  # about one file in ten is held out
TOKENIZER_TRAIN_BYTES = 4 * 1024 * 1024

# GLM-4.5-style chat template: `[gMASK]<sop>` prefix, role tokens each followed by a newline, an empty
# `<think></think>` for answers without reasoning, optional tools / tool calls in GLM's XML argument format.
# Only plain Jinja (if/for/set, namespace, tojson, string methods strip/split) so both transformers and
# llama.cpp's Jinja engine render it.
CHAT_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
{{- '<|system|>\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' -}}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\\n' -}}
{%- for tool in tools -%}
{{- tool | tojson -}}{{- '\\n' -}}
{%- endfor -%}
{{- '</tools>\\n\\nFor each function call, output the function name and arguments within the following XML ' -}}
{{- 'format:\\n<tool_call>{function-name}\\n<arg_key>{arg-key-1}</arg_key>\\n<arg_value>{arg-value-1}</arg_value>' -}}
{{- '\\n...\\n</tool_call>' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
{%- set content = m.content if m.content is string else '' -%}
{%- if m.role == 'system' -%}
{{- '<|system|>\\n' + content -}}
{%- elif m.role == 'user' -%}
{{- '<|user|>\\n' + content -}}
{%- elif m.role == 'assistant' -%}
{%- set reasoning = '' -%}
{%- if m.reasoning_content is string -%}
{%- set reasoning = m.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] -%}
{%- endif -%}
{{- '<|assistant|>' -}}
{%- if loop.index0 > ns.last_user and reasoning.strip() -%}
{{- '\\n<think>' + reasoning.strip() + '</think>' -}}
{%- else -%}
{{- '\\n<think></think>' -}}
{%- endif -%}
{%- if content.strip() -%}
{{- '\\n' + content.strip() -}}
{%- endif -%}
{%- if m.tool_calls -%}
{%- for tc in m.tool_calls -%}
{%- set f = tc.function if tc.function is defined else tc -%}
{{- '\\n<tool_call>' + f.name -}}
{%- for k, v in f.arguments.items() -%}
{{- '\\n<arg_key>' + k + '</arg_key>\\n<arg_value>' -}}
{{- v if v is string else v | tojson -}}
{{- '</arg_value>' -}}
{%- endfor -%}
{{- '\\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{%- elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
{{- '<|observation|>' -}}
{%- endif -%}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>' -}}
{%- if enable_thinking is defined and not enable_thinking -%}
{{- '\\n<think></think>' -}}
{%- endif -%}
{%- endif -%}"""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _file_key(rel: str) -> bytes:
    return hashlib.sha256(rel.encode()).digest()


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, str], ...]:
    """(relative path, split) for every corpus file, in a fixed pseudo-random order (by path hash)."""
    root = stdlib_root()
    rels = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _SKIP_PARTS for part in rel.parts) or not p.is_file():
            continue
        rels.append(rel.as_posix())
    rels.sort(key=_file_key)
    return tuple((r, "heldout" if _file_key(r)[0] % HELDOUT_MODULUS == 0 else "train") for r in rels)


def stdlib_corpus(split: str = "train", max_bytes: int | None = None) -> list[str]:
    """Texts of the standard library's source files of one split ("train" or "heldout").

    The split is a fixed function of each file's relative path, so a held-out file is never trained on, and the
    order (by path hash) is the same on every machine. `max_bytes` keeps whole files up to that many bytes.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    root = stdlib_root()
    texts: list[str] = []
    total = 0
    for rel, s in _stdlib_files():
        if s != split:
            continue
        raw = (root / rel).read_bytes()
        if max_bytes is not None and total + len(raw) > max_bytes and texts:
            break
        texts.append(raw.decode("utf-8", errors="replace"))
        total += len(raw)
    return texts


def corpus_fingerprint() -> str:
    """Identifies the corpus (Python version + file list): part of cache keys for trained artifacts."""
    h = hashlib.sha256(f"{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}".encode())
    root = stdlib_root()
    for rel, split in _stdlib_files():
        h.update(f"{rel}\0{split}\0{(root / rel).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _train_tokenizer_json(train_bytes: int) -> str:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=N_BPE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(stdlib_corpus("train", max_bytes=train_bytes), trainer=trainer)
    if tok.get_vocab_size() != N_BPE:
        raise RuntimeError(f"BPE training produced {tok.get_vocab_size()} tokens, wanted {N_BPE}")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    # `add_tokens` marks every token non-special; set the control tokens' flag in the serialized form.
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        entry["special"] = entry["content"] in CONTROL_TOKENS
    data["model"]["ignore_merges"] = True  # llama.cpp's glm4 pre-tokenizer sets ignore_merges too
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=False) + "\n"


def build_tokenizer(train_bytes: int = TOKENIZER_TRAIN_BYTES) -> Tokenizer:
    """Train (or reuse within this process) the testbed tokenizer."""
    return Tokenizer.from_str(_train_tokenizer_json(train_bytes))


def special_token_ids() -> dict[str, int]:
    """Ids of the GLM special tokens: they follow the BPE tokens, in GLM's order."""
    return {t: N_BPE + i for i, t in enumerate(SPECIAL_TOKENS)}


def tokenizer_config() -> dict:
    ids = special_token_ids()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": t in CONTROL_TOKENS}
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": list(CONTROL_TOKENS[1:]),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": PAD_TOKEN,
        "model_max_length": 4096,
        "padding_side": "left",
        "remove_space": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out_dir: str | Path, train_bytes: int = TOKENIZER_TRAIN_BYTES) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json (chat template included) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tj = out / "tokenizer.json"
    tj.write_text(_train_tokenizer_json(train_bytes), encoding="utf-8")
    tc = out / "tokenizer_config.json"
    tc.write_text(json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return [tj, tc]
