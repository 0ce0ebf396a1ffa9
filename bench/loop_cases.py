"""A labelled loop-detection set: crafted loop families and natural text of many kinds, as GLM token ids.

Everything is built at run time from this machine's Python install (nothing copied into the repository) and is
deterministic for one install: the same Python version and installed packages give the same cases.

Natural kinds (512-token chunks, at most `PER_FILE` chunks from one document, documents in path-hash order, a
document seen before skipped): `code` (standard-library modules), `tests` (the stdlib's own test suite: unrolled
asserts, tables of cases), `data` (data literals: codec tables, html entities, pretty-printed dicts and lists of real
values; then the installed packages' YAML files), `docs` (stdlib docstrings, the pydoc topic texts, then the
installed packages' docstrings), `prose` (license, README and METADATA texts of installed packages, their markdown
and reST files, then their text files that are at least half letters), `json`, `tables` (markdown and CSV) and
`lists` (bullet and numbered lists), the last three first rendered from the stdlib's own definitions (name, kind,
line, arguments, first docstring line; not from the installed packages, whose same-named methods and overloads,
listed without their class, repeat lines verbatim), then the installed packages' JSON files, their CSV files, and
the bullet and numbered items of their markdown, reST and text files.

Loop families (a natural prefix of 32-400 tokens, then the loop up to max(3 iterations, 512 tokens) past its start,
the detection deadline; periods up to 512 tokens): `exact` (a natural block of 1-512 tokens repeated), `counter`
(a block with a counter such as "Attempt 17: " that changes every iteration), `noisy` (a block of 20-512 tokens with
one token at a random place replaced every iteration), `paragraph` (a 200-512-token prose paragraph repeated),
`nested` (blocks in nested or alternating patterns such as ABAC or A B A' B'), `think` (`<think>` re-opened after
`</think>`, or `</think>` twice), `code` (a stretch of stdlib code repeated, an identifier or number changing per
iteration) and `prose` (docstring sentences repeated, one word swapped per iteration).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.metadata
import io
import itertools
import json
import math
import pprint
import random
import re
import sysconfig
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from glmgguf.eval.loops import Loop, LoopConfig, LoopDetector
from glmgguf.testbed.tokenizer import stdlib_corpus, stdlib_root

CHUNK = 512
PER_FILE = 16
MAX_PERIOD = 512
NATURAL_KINDS = ("code", "tests", "data", "docs", "prose", "json", "tables", "lists")
LOOP_FAMILIES = ("exact", "counter", "noisy", "paragraph", "nested", "think", "code", "prose")


@dataclass(frozen=True)
class Case:
    """One labelled token stream: `tokens` [n]; a loop starts at index `start` (None: natural text), with
    `period` tokens per iteration; `text` is set where the detector needs the text too (think restarts)."""

    group: str  # loop family or natural kind
    tokens: list[int]
    start: int | None = None
    period: int = 0
    text: list[str] | None = None

    @property
    def deadline(self) -> int:
        """Tokens fed by which the loop must be found: max(3 iterations, 512 tokens) past its start."""
        return len(self.tokens) if self.start is None else self.start + max(3 * self.period, CHUNK)


def _key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


# ---------------------------------------------------------------------------------------------------------------
# Natural documents per kind
# ---------------------------------------------------------------------------------------------------------------


def _files(pattern: str, under: str = "") -> list[Path]:
    root = stdlib_root()
    return sorted((root / under).glob(pattern), key=lambda p: _key(p.relative_to(root).as_posix()))


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _site_files(pattern: str) -> list[Path]:
    """Files of the installed packages (site-packages) matching `pattern`, in path-hash order."""
    root = Path(sysconfig.get_paths()["purelib"])
    return sorted(root.rglob(pattern), key=lambda p: _key(p.relative_to(root).as_posix()))


def _definitions() -> Iterator[tuple[str, list[dict]]]:
    """(module, its functions and classes as records) for the stdlib modules, in the corpus order."""
    for text in stdlib_corpus("train") + stdlib_corpus("heldout"):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        recs = []
        for name, node in _qualified_definitions(tree):
            doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
            args = [a.arg for a in node.args.args] if not isinstance(node, ast.ClassDef) else []
            recs.append({"name": name, "kind": type(node).__name__.removesuffix("Def").lower(),
                         "line": node.lineno, "args": args, "doc": doc})
        if recs:
            yield (ast.get_docstring(tree) or "module").split("\n")[0][:60], recs


def _qualified_definitions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of the functions and classes under `node`, in source order: a method is named with its
    class (`Tree.insert`), as an API listing names it."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield prefix + child.name, child
            yield from _qualified_definitions(child, f"{prefix}{child.name}.")
        else:
            yield from _qualified_definitions(child, prefix)


def _module_docstrings(text: str) -> str:
    """The docstrings of a module's source, joined by blank lines ("" when it does not parse)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return ""
    docs = [ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    return "\n\n".join(d for d in docs if d)


def _docstrings() -> Iterator[str]:
    """Stdlib docstrings, the pydoc topic texts, then the installed packages' docstrings."""
    yield from map(_module_docstrings, stdlib_corpus("train") + stdlib_corpus("heldout"))
    topics = ast.literal_eval(re.search(r"topics = (\{.*\})", _read(stdlib_root() / "pydoc_data" / "topics.py"),
                                        re.S).group(1))
    yield from (topics[k] for k in sorted(topics, key=_key))
    yield from (_module_docstrings(_read(p)) for p in _site_files("*.py"))


def _package_texts() -> Iterator[str]:
    """The installed packages' metadata, licence and README texts, this project's own left out (its metadata is this
    README as of the install, and a stale egg-info beside the sources lists the working copy's)."""
    dists = [d for d in importlib.metadata.distributions() if (d.metadata["Name"] or "").lower() != "glmgguf"]
    dists.sort(key=lambda d: _key(d.metadata["Name"] or ""))
    for dist in dists:
        for f in sorted(dist.files or [], key=str):
            name = f.name.upper()
            if name == "METADATA" or name.startswith(("LICENSE", "LICENCE", "COPYING", "README", "NOTICE")):
                try:
                    yield Path(f.locate()).read_bytes().decode("utf-8", errors="replace")
                except OSError:
                    continue
    yield from (_read(p) for p in _site_files("*.md") + _site_files("*.rst"))


def _data_literals() -> Iterator[str]:
    for path in _files("*.py", "encodings") + [stdlib_root() / "html" / "entities.py"]:
        yield _read(path)
    for base in range(0x20, 0x3000, 0x100):
        names = {hex(c): unicodedata.name(chr(c), "") for c in range(base, base + 0x100)}
        yield f"NAMES_{base:04X} = " + pprint.pformat(names, width=100) + "\n"
        yield f"CATEGORIES_{base:04X} = " + pprint.pformat(
            [(c, unicodedata.category(chr(c)), unicodedata.bidirectional(chr(c))) for c in range(base, base + 0x100)],
            compact=True) + "\n"


def _json_docs() -> Iterator[str]:
    for module, recs in _definitions():
        yield json.dumps({"module": module, "definitions": recs}, indent=2 if len(recs) % 2 else None)


def _tables() -> Iterator[str]:
    for i, (module, recs) in enumerate(_definitions()):
        if i % 2:
            out = io.StringIO()
            w = csv.writer(out)
            w.writerow(["name", "kind", "line", "args", "doc"])
            w.writerows([r["name"], r["kind"], r["line"], " ".join(r["args"]), r["doc"]] for r in recs)
            yield out.getvalue()
        else:
            yield f"## {module}\n\n| name | kind | line | arguments | summary |\n|---|---|---|---|---|\n" + "".join(
                f"| `{r['name']}` | {r['kind']} | {r['line']} | {', '.join(r['args'])} | {r['doc']} |\n" for r in recs)


def _lists() -> Iterator[str]:
    for i, (module, recs) in enumerate(_definitions()):
        if i % 2:
            yield f"{module}\n\n" + "".join(f"- `{r['name']}({', '.join(r['args'])})`: {r['doc']}\n" for r in recs)
        else:
            yield f"Steps in {module}:\n\n" + "".join(f"{j + 1}. {r['kind'].capitalize()} {r['name']} at line "
                                                      f"{r['line']}.\n" for j, r in enumerate(recs))
    yield from map(_list_items, _site_texts("*.md", "*.rst", "*.txt"))


LIST_ITEM = re.compile(r"^ *(?:[-*+]|\d+[.)]) +\S.*(?:\n(?: {2,}\S.*)?)*", re.M)


def _list_items(text: str) -> str:
    """The bullet and numbered items of a document (with their indented continuation lines), in order."""
    return "".join(m.group(0).rstrip() + "\n" for m in LIST_ITEM.finditer(text))


def _site_texts(*patterns: str, letters: float = 0.0) -> Iterator[str]:
    """The installed packages' files matching `patterns` (in that order, each in path-hash order), those with at
    least `letters` of their characters letters (a numeric table in a .txt file is not prose)."""
    for pattern in patterns:
        for path in _site_files(pattern):
            text = _read(path)
            if text and sum(c.isalpha() for c in text) >= letters * len(text):
                yield text


SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "code": lambda: iter(stdlib_corpus("train") + stdlib_corpus("heldout")),
    "tests": lambda: (_read(p) for p in _files("test*.py", "test") + _files("*/test*.py", "test")),
    "data": lambda: itertools.chain(_data_literals(), _site_texts("*.yaml")),
    "docs": _docstrings,
    "prose": lambda: itertools.chain(_package_texts(), _site_texts("*.txt", letters=0.5)),
    "json": lambda: itertools.chain(_json_docs(), _site_texts("*.json")),
    "tables": lambda: itertools.chain(_tables(), _site_texts("*.csv")),
    "lists": _lists,
}


def natural_chunks(tok: Tokenizer, kind: str, n: int) -> list[Case]:
    """Up to `n` 512-token chunks of one natural kind (at most PER_FILE from one document; a document seen before is
    skipped)."""
    out: list[Case] = []
    docs, seen = SOURCES[kind](), set()
    while len(out) < n:
        batch = [d for _, d in zip(range(64), docs, strict=False)]
        if not batch:
            break
        fresh = [d for d in batch if d.strip() and _key(d) not in seen]
        seen.update(map(_key, fresh))
        for enc in tok.encode_batch(list(dict.fromkeys(fresh)), add_special_tokens=False):
            ids = enc.ids
            out += [Case(kind, ids[i:i + CHUNK]) for i in range(0, len(ids) - CHUNK + 1, CHUNK)][:PER_FILE]
    return out[:n]


# ---------------------------------------------------------------------------------------------------------------
# Crafted loops
# ---------------------------------------------------------------------------------------------------------------


class Pool:
    """Natural token streams to cut prefixes and blocks from (code, docs and prose chunks)."""

    def __init__(self, tok: Tokenizer, chunks: int = 60) -> None:
        self.tok = tok
        self.code = [c.tokens for c in natural_chunks(tok, "code", chunks)]
        self.prose = [c.tokens for c in natural_chunks(tok, "docs", chunks // 2) + natural_chunks(tok, "prose",
                                                                                                 chunks // 2)]
        self.vocab = sorted({t for c in self.code + self.prose for t in c})

    def slice(self, rng: random.Random, n: int, prose: bool | None = None) -> list[int]:
        """`n` consecutive natural tokens (n <= 512), from code or prose (either when None)."""
        kind = rng.random() < 0.5 if prose is None else prose
        src = rng.choice(self.prose if kind else self.code)
        i = rng.randrange(0, len(src) - n + 1)
        return src[i:i + n]

    def text(self, rng: random.Random, n: int, prose: bool | None = None) -> str:
        return self.tok.decode(self.slice(rng, n, prose))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _case(family: str, pool: Pool, rng: random.Random, loop: list[int], iterations: int) -> Case:
    """A natural prefix, then `loop` (`iterations` copies) cut at the detection deadline."""
    prefix = pool.slice(rng, rng.randint(32, 400))
    case = Case(family, prefix + loop, len(prefix), round(len(loop) / iterations))
    return Case(family, case.tokens[:case.deadline], case.start, case.period)


def _tokens_case(family: str, pool: Pool, rng: random.Random, iterations: list[list[int]]) -> Case:
    """A case from the loop's iterations as token lists."""
    return _case(family, pool, rng, [t for it in iterations for t in it], len(iterations))


def _text_case(family: str, pool: Pool, rng: random.Random, iterations: list[str]) -> Case:
    """A case from the loop's iterations as text (tokenized together, as a model writes them)."""
    return _case(family, pool, rng, pool.encode("".join(iterations)), len(iterations))


def _repeat_to_deadline(block_len: int) -> int:
    """Iterations needed to reach the deadline, max(3 iterations, 512 tokens), with one to spare."""
    return max(3, math.ceil(CHUNK / max(block_len, 1))) + 1


def _exact(pool: Pool, rng: random.Random) -> Case:
    block = pool.slice(rng, _log_uniform(rng, 1, MAX_PERIOD))
    return _tokens_case("exact", pool, rng, [block] * _repeat_to_deadline(len(block)))


COUNTERS = ("Attempt {k}: ", "Step {k}. ", "Retry #{k}\n", "[{k}] ", "Iteration {k}:\n", "# try {k}\n",
            "({k}) ", "Let me try again ({k}). ")


def _counter(pool: Pool, rng: random.Random) -> Case:
    fmt, k0 = rng.choice(COUNTERS), rng.randint(1, 120)
    block = pool.text(rng, _log_uniform(rng, 20, MAX_PERIOD - 8))
    n = _repeat_to_deadline(len(pool.encode(block)))
    return _text_case("counter", pool, rng, [fmt.format(k=k0 + i) + block for i in range(n)])


def _noisy(pool: Pool, rng: random.Random) -> Case:
    block = pool.slice(rng, _log_uniform(rng, 20, MAX_PERIOD))
    its = []
    for _ in range(_repeat_to_deadline(len(block))):
        it = list(block)
        it[rng.randrange(len(it))] = rng.choice(pool.vocab)
        its.append(it)
    return _tokens_case("noisy", pool, rng, its)


def _paragraph(pool: Pool, rng: random.Random) -> Case:
    para = pool.text(rng, rng.randint(200, MAX_PERIOD - 2), prose=True).strip() + "\n\n"
    return _text_case("paragraph", pool, rng, [para] * _repeat_to_deadline(len(pool.encode(para))))


PATTERNS = ("ABAC", "AAB", "ABABC", "ABCB", "AB'")


def _nested(pool: Pool, rng: random.Random) -> Case:
    pattern = rng.choice(PATTERNS)
    size = MAX_PERIOD // len(pattern)
    blocks = {c: pool.slice(rng, rng.randint(4, size)) for c in "ABC"}
    outer = [t for c in pattern.replace("'", "") for t in blocks[c]]
    its = []
    for _ in range(_repeat_to_deadline(len(outer))):
        it = list(outer)
        if pattern.endswith("'"):  # alternating A B with one token of each changing per iteration
            it[rng.randrange(len(blocks["A"]))] = rng.choice(pool.vocab)
            it[len(blocks["A"]) + rng.randrange(len(blocks["B"]))] = rng.choice(pool.vocab)
        its.append(it)
    return _tokens_case("nested", pool, rng, its)


def _think(pool: Pool, rng: random.Random) -> Case:
    """`<think>` re-opened after `</think>` (or closed twice); the loop starts at the offending tag."""
    thought, answer = pool.text(rng, rng.randint(10, 300), prose=True), pool.text(rng, rng.randint(0, 200))
    head = pool.encode("<think>" + thought + "</think>" + answer)
    tail = pool.encode(rng.choice(("<think>", "</think>")) + pool.text(rng, rng.randint(1, 200), prose=True))
    tokens = head + tail
    return Case("think", tokens, len(head), 1, [pool.tok.decode([t]) for t in tokens])


def _code(pool: Pool, rng: random.Random) -> Case:
    block = pool.text(rng, _log_uniform(rng, 20, MAX_PERIOD - 16), prose=False)
    names = sorted(set(re.findall(r"\b[a-z_][a-z0-9_]{2,}\b", block))) or ["value"]
    name, k0 = rng.choice(names), rng.randint(0, 50)
    n = _repeat_to_deadline(len(pool.encode(block)))
    if rng.random() < 0.5 and re.search(rf"\b{name}\b", block):  # an identifier numbered per iteration
        its = [re.sub(rf"\b{name}\b", f"{name}{k0 + i}", block) for i in range(n)]
    else:  # a numbered line added in front of each copy
        its = [f"{name} = {k0 + i}\n" + block for i in range(n)]
    return _text_case("code", pool, rng, its)


SWAPS = ("the", "a", "this", "that", "its", "each", "one", "some")


def _prose(pool: Pool, rng: random.Random) -> Case:
    """Sentences repeated with one word swapped per copy, until the copies reach the deadline (a swap can shorten a
    copy); a slice of fewer than 8 words (a URL, a table rule) is drawn again: swapping its only word would change
    the whole block."""
    words: list[str] = []
    while len(words) < 8:
        words = pool.text(rng, _log_uniform(rng, 20, MAX_PERIOD - 16), prose=True).split(" ")
    size = len(pool.encode(" ".join(words) + " "))
    its: list[str] = []
    while len(its) < 4 or len(pool.encode("".join(its))) < max(3 * size, CHUNK) + size:
        w = list(words)
        w[rng.randrange(len(w))] = rng.choice(SWAPS)
        its.append(" ".join(w) + " ")
    return _text_case("prose", pool, rng, its)


MAKERS: dict[str, Callable[[Pool, random.Random], Case]] = {
    "exact": _exact, "counter": _counter, "noisy": _noisy, "paragraph": _paragraph, "nested": _nested,
    "think": _think, "code": _code, "prose": _prose,
}


def loop_cases(pool: Pool, family: str, n: int, seed: int = 0) -> list[Case]:
    """`n` crafted loops of one family (deterministic for a seed)."""
    rng = random.Random(f"{seed}:{family}")
    return [MAKERS[family](pool, rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def token_pieces(tok: Tokenizer) -> list[str]:
    """The text of every token id decoded alone, as a server streams it with the token."""
    return [tok.decode([i]) for i in range(tok.get_vocab_size())]


def run_case(case: Case, pieces: list[str] | None = None, config: LoopConfig | None = None) -> Loop | None:
    """Feed the case's tokens (with their text from `pieces`, id -> text, when given) to a detector up to its
    deadline; the loop it reports, if any."""
    det = LoopDetector(config)
    for i, t in enumerate(case.tokens[:case.deadline]):
        det.feed(t, None if pieces is None else pieces[t])
        if case.text is not None:
            det.feed_text(case.text[i])
        if det.loop is not None:
            return det.loop
    return None


def score(cases: list[Case], pieces: list[str] | None = None, config: LoopConfig | None = None,
          found: list[tuple[int, Case, Loop]] | None = None) -> dict[str, dict]:
    """Per group: cases, hits (a loop found: after the start and by the deadline for loops, anywhere for natural
    text), early (loops found inside the natural prefix), the rate and the detection kinds. `found` collects (index
    in its group, case, loop) for every loop reported."""
    out: dict[str, dict] = {}
    for case in cases:
        loop = run_case(case, pieces, config)
        s = out.setdefault(case.group, {"cases": 0, "hits": 0, "early": 0, "kinds": {}})
        s["cases"] += 1
        if loop is None:
            continue
        if found is not None:
            found.append((s["cases"] - 1, case, loop))
        early = case.start is not None and loop.at_token <= case.start
        s["early"] += early
        s["hits"] += not early
        s["kinds"][loop.kind] = s["kinds"].get(loop.kind, 0) + 1
    for s in out.values():
        s["rate"] = s["hits"] / s["cases"]
    return out
