"""Mixed quantization recipes: which GGML type each GGUF tensor gets, as data (`quant_recipes/*.toml`).

A recipe is a description, a default type and an ordered list of rules; the first rule that matches a tensor
decides its type, the default covers the rest. A rule matches on any combination of

- `role`: one role or a list (`glmgguf.layout.Role`: embed, output, norm, attn, indexer, router, router_bias,
  dense_ffn, shared_expert, expert_gate, expert_up, expert_down, mtp),
- `name`: a regular expression searched (unanchored, like llama-quantize's `--tensor-type`) in the GGUF name,
- `layers`: a block selector or a list of them (union): an int, a range `"3-5"`, `"all"`, `"trunk"`, `"mtp"`,
  `"dense"`, `"moe"` (MoE blocks, MTP included), `"first:N"` / `"last:N"` (trunk blocks),
  `"first_moe:N"` / `"last_moe:N"` (MoE trunk blocks). Tensors outside blocks (token_embd, output,
  output_norm) never match a layer selector.

Two things override a recipe, as in llama.cpp: tensors the upstream converter always keeps in F32 (norms, 1-D
tensors, the router `ffn_gate_inp`, `indexer.proj`; `PlannedTensor.always_f32`) stay F32, and a type whose block
does not divide the row falls back along llama-quantize's chain (`qtypes.FALLBACK`, `tensor_type_fallback` in the
pinned `src/llama-quant.cpp`): IQ1_S/IQ1_M/IQ2_*/IQ3_*/IQ4_XS -> IQ4_NL; Q2_K/Q3_K/TQ1_0/TQ2_0 -> Q4_0;
Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and F16 when the fallback's block does not divide the row either
(a 32-block type with no entry goes straight to F16). A recipe may override entries with a `[fallback]` table.

File format::

    description = "one line"
    default = "Q8_0"

    [[rule]]
    role = ["expert_gate", "expert_up"]
    layers = "first_moe:1"
    type = "Q5_K"

Use: `recipe = load_recipe("q4_protected")` (a shipped name or a path), then
`recipe.resolve(tensors, layers)` -> `Resolution` (per-tensor `Choice`, warnings), or `recipe.chooser(layers)`
for `convert` (a `TypeChooser`); `glmgguf.gguf.quantize_args` gives the equivalent llama-quantize command line.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gguf import GGMLQuantizationType as Q

from glmgguf.errors import GlmggufError
from glmgguf.gguf.keys import Provenance
from glmgguf.gguf.plan import PlannedTensor
from glmgguf.gguf.qtypes import FALLBACK, WRITABLE_TYPES, block_size
from glmgguf.layout import LayerInfo, LayerKind, Role
from glmgguf.resources import package_path

RECIPE_DIR = package_path("quant_recipes")  # top-level quant_recipes/ in a checkout links here

_RULE_KEYS = {"role", "name", "layers", "type", "note"}
_TOP_KEYS = {"description", "default", "rule", "fallback"}
_SELECTOR = re.compile(r"^(?:(?P<word>all|trunk|mtp|dense|moe)|(?P<kind>first|last|first_moe|last_moe):(?P<n>\d+)"
                       r"|(?P<a>\d+)(?:-(?P<b>\d+))?)$")


class RecipeError(GlmggufError, ValueError):
    """A recipe file is invalid, or cannot be applied to this model."""


class TypeChooser(Protocol):
    """What `convert` asks of a type policy (`--outtype` or a recipe): each planned tensor's type, the KV pairs
    that record the policy in the file, and warnings about it once every tensor has been asked."""

    def __call__(self, t: PlannedTensor) -> Q: ...

    def provenance(self) -> dict[str, str]: ...

    def warnings(self) -> list[str]: ...


def parse_type(name: str, where: str = "") -> Q:
    """A recipe type name (case-insensitive, e.g. 'q4_k') -> GGMLQuantizationType."""
    try:
        qtype = Q[str(name).upper()]
    except KeyError:
        qtype = None
    if qtype not in WRITABLE_TYPES:
        raise RecipeError(f"{where}unknown type {name!r}; use one of {', '.join(t.name for t in WRITABLE_TYPES)}")
    return qtype


def fallback_type(qtype: Q, row: int, table: dict[Q, Q] = FALLBACK) -> Q:
    """The type a row of `row` elements gets when `qtype` is asked for (llama-quantize's fallback chain)."""
    if row % block_size(qtype) == 0:
        return qtype
    if qtype in table:
        alt = table[qtype]
    elif block_size(qtype) <= 32:
        alt = qtype
    else:
        raise RecipeError(f"no fallback is defined for {qtype.name} (row of {row} elements)")
    return alt if row % block_size(alt) == 0 else Q.F16


@dataclass(frozen=True)
class LayerSelector:
    """A union of block selectors (see the module doc)."""

    items: tuple[str | int, ...]

    def blocks(self, layers: Sequence[LayerInfo]) -> frozenset[int]:
        trunk = [x for x in layers if not x.is_mtp]
        moe_trunk = [x for x in trunk if x.kind is LayerKind.MOE]
        out: set[int] = set()
        for item in self.items:
            if isinstance(item, int):
                out.add(item)
                continue
            m = _SELECTOR.match(item)
            assert m is not None  # checked when parsed
            if m["a"] is not None:
                out.update(range(int(m["a"]), int(m["b"] or m["a"]) + 1))
            elif word := m["word"]:
                out.update(x.index for x in layers if {
                    "all": True, "trunk": not x.is_mtp, "mtp": x.is_mtp, "dense": x.kind is LayerKind.DENSE,
                    "moe": x.kind is LayerKind.MOE,
                }[word])
            else:
                n = int(m["n"])
                pool = moe_trunk if m["kind"].endswith("_moe") else trunk
                picked = pool[:n] if m["kind"].startswith("first") else pool[len(pool) - n:] if n else []
                out.update(x.index for x in picked)
        return frozenset(out)

    @classmethod
    def parse(cls, value: object, where: str) -> LayerSelector:
        items = value if isinstance(value, list) else [value]
        parsed: list[str | int] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise RecipeError(f"{where}layers: {item!r} is not a block number or selector")
            if isinstance(item, str):
                item = item.strip().lower()
                if not _SELECTOR.match(item):
                    raise RecipeError(f"{where}layers: unknown selector {item!r} (use a number, 'A-B', all, "
                                      "trunk, mtp, dense, moe, first:N, last:N, first_moe:N, last_moe:N)")
            elif item < 0:
                raise RecipeError(f"{where}layers: negative block {item}")
            parsed.append(item)
        return cls(tuple(parsed))

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)


@dataclass(frozen=True)
class Rule:
    """One recipe rule: matchers (all given ones must match) and the type they select."""

    index: int
    qtype: Q
    roles: frozenset[Role] | None = None
    name: re.Pattern[str] | None = None
    layers: LayerSelector | None = None
    note: str = ""

    def matches(self, t: PlannedTensor, blocks: frozenset[int] | None) -> bool:
        if self.roles is not None and t.role not in self.roles:
            return False
        if self.name is not None and not self.name.search(t.name):
            return False
        if self.layers is not None and (t.layer is None or blocks is None or t.layer.index not in blocks):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.roles is not None:
            parts.append("role=" + "|".join(sorted(r.value for r in self.roles)))
        if self.name is not None:
            parts.append(f"name=/{self.name.pattern}/")
        if self.layers is not None:
            parts.append(f"layers={self.layers}")
        return f"rule {self.index + 1} ({' '.join(parts) or 'any tensor'} -> {self.qtype.name})"


@dataclass(frozen=True)
class Choice:
    """The type one tensor gets, and why."""

    name: str
    requested: Q  # what the recipe asked for
    qtype: Q  # what is written (after the F32 override and the fallback chain)
    rule: int | None  # index of the deciding rule; None = the recipe's default
    reason: str = ""  # "" | "always F32" | "fallback: ..."


@dataclass
class Resolution:
    """A recipe applied to one model's tensors."""

    recipe: Recipe
    choices: dict[str, Choice]
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Q:
        return self.choices[name].qtype

    @property
    def fallbacks(self) -> list[Choice]:
        return [c for c in self.choices.values() if c.reason.startswith("fallback")]


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe file."""

    name: str
    description: str
    default: Q
    rules: tuple[Rule, ...]
    text: str = field(repr=False)
    path: Path | None = None
    fallback: dict[Q, Q] = field(default_factory=lambda: dict(FALLBACK), repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @classmethod
    def parse(cls, text: str, name: str, path: Path | None = None) -> Recipe:
        where_file = f"{path or name}: "
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{where_file}invalid TOML ({e})") from None
        extra = set(data) - _TOP_KEYS
        if extra:
            raise RecipeError(f"{where_file}unknown key(s) {', '.join(sorted(extra))} "
                              f"(allowed: {', '.join(sorted(_TOP_KEYS))})")
        description = data.get("description", "")
        if not isinstance(description, str) or not description.strip():
            raise RecipeError(f"{where_file}needs a one-line 'description'")
        if "default" not in data:
            raise RecipeError(f"{where_file}needs a 'default' type")
        default = parse_type(data["default"], f"{where_file}default: ")
        fallback = dict(FALLBACK)
        fb = data.get("fallback", {})
        if not isinstance(fb, dict):
            raise RecipeError(f"{where_file}[fallback] must be a table of TYPE = \"TYPE\"")
        for src, dst in fb.items():
            fallback[parse_type(src, f"{where_file}fallback: ")] = parse_type(dst, f"{where_file}fallback: ")
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            raise RecipeError(f"{where_file}rules are written as [[rule]] tables")
        rules = tuple(cls._parse_rule(i, r, where_file) for i, r in enumerate(raw_rules))
        return cls(name=name, description=" ".join(description.split()), default=default, rules=rules,
                   text=text, path=path, fallback=fallback)

    @staticmethod
    def _parse_rule(i: int, raw: object, where_file: str) -> Rule:
        where = f"{where_file}rule {i + 1}: "
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}must be a table")
        extra = set(raw) - _RULE_KEYS
        if extra:
            raise RecipeError(f"{where}unknown key(s) {', '.join(sorted(extra))} "
                              f"(allowed: {', '.join(sorted(_RULE_KEYS))})")
        if "type" not in raw:
            raise RecipeError(f"{where}needs a 'type'")
        qtype = parse_type(raw["type"], where)
        roles = None
        if "role" in raw:
            names = raw["role"] if isinstance(raw["role"], list) else [raw["role"]]
            try:
                roles = frozenset(Role(str(n).lower()) for n in names)
            except ValueError:
                bad = [n for n in names if str(n).lower() not in {r.value for r in Role}]
                raise RecipeError(f"{where}unknown role {bad[0]!r}; use one of "
                                  f"{', '.join(r.value for r in Role)}") from None
        name = None
        if "name" in raw:
            try:
                name = re.compile(str(raw["name"]))
            except re.error as e:
                raise RecipeError(f"{where}bad name regex {raw['name']!r} ({e})") from None
        layers = LayerSelector.parse(raw["layers"], where) if "layers" in raw else None
        return Rule(index=i, qtype=qtype, roles=roles, name=name, layers=layers, note=str(raw.get("note", "")))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
        return cls.parse(text, path.stem, path)

    # ---- applying a recipe -------------------------------------------------------------------------------

    def _rule_blocks(self, layers: Sequence[LayerInfo]) -> list[frozenset[int] | None]:
        return [r.layers.blocks(layers) if r.layers is not None else None for r in self.rules]

    def _choose(self, t: PlannedTensor, blocks: list[frozenset[int] | None]) -> Choice:
        rule = next((r for r in self.rules if r.matches(t, blocks[r.index])), None)
        requested = rule.qtype if rule is not None else self.default
        index = rule.index if rule is not None else None
        if t.always_f32:
            return Choice(t.name, requested, Q.F32, index, "" if requested is Q.F32 else "always F32")
        try:
            final = fallback_type(requested, t.row_size, self.fallback)
        except RecipeError as e:
            raise RecipeError(f"{self.name}: {t.name}: {e}") from None
        reason = ""
        if final is not requested:
            reason = (f"fallback: row of {t.row_size} is not a multiple of {block_size(requested)} "
                      f"({requested.name} -> {final.name})")
        return Choice(t.name, requested, final, index, reason)

    def resolve(self, tensors: Sequence[PlannedTensor], layers: Sequence[LayerInfo]) -> Resolution:
        """The type of every tensor, plus warnings (rules that match nothing)."""
        blocks = self._rule_blocks(layers)
        return self._resolution({t.name: self._choose(t, blocks) for t in tensors})

    def _resolution(self, choices: dict[str, Choice]) -> Resolution:
        used = {c.rule for c in choices.values()}
        warnings = [f"recipe {self.name}: {r.describe()} matches no tensor of this model"
                    for r in self.rules if r.index not in used]
        return Resolution(self, choices, warnings)

    def provenance(self) -> dict[str, str]:
        """The KV pairs that name this recipe in a file it made."""
        return {Provenance.RECIPE: self.name, Provenance.RECIPE_SHA256: self.sha256}

    def chooser(self, layers: Sequence[LayerInfo]) -> RecipeChooser:
        """A per-tensor type chooser for `convert` (records which rules were used)."""
        return RecipeChooser(self, self._rule_blocks(layers))


class RecipeChooser:
    """A recipe as convert's `TypeChooser`; `warnings()` lists the recipe's rules that matched nothing."""

    def __init__(self, recipe: Recipe, blocks: list[frozenset[int] | None]):
        self.recipe = recipe
        self.blocks = blocks
        self.choices: dict[str, Choice] = {}

    def __call__(self, t: PlannedTensor) -> Q:
        choice = self.recipe._choose(t, self.blocks)
        self.choices[t.name] = choice
        return choice.qtype

    def resolution(self) -> Resolution:
        return self.recipe._resolution(dict(self.choices))

    def provenance(self) -> dict[str, str]:
        return self.recipe.provenance()

    def warnings(self) -> list[str]:
        return self.resolution().warnings


# ---- finding recipes ---------------------------------------------------------------------------------------


def builtin_recipes() -> dict[str, Path]:
    """Shipped recipes by name."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name, or a recipe file by path."""
    shipped = builtin_recipes()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        return Recipe.load(shipped[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        return Recipe.load(path)
    raise RecipeError(f"unknown recipe {str(name_or_path)!r}; shipped recipes: {', '.join(shipped)} "
                      "(or give a path to a .toml file)")
