"""`glmgguf inspect`: what a GGUF holds per tensor role (types, counts, bytes, bits per weight), its recipe and
provenance keys; `diff` lists tensors whose type differs and KV differences between two files."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as Q

from glmgguf.gguf.keys import READER_PREFIX, SPLIT_PREFIX, Keys, Provenance, QuantizeImatrix
from glmgguf.gguf.reader import read_gguf
from glmgguf.gguf.writer import split_paths
from glmgguf.layout import Role, parse_gguf_name

PROVENANCE_KEYS = (Keys.General.NAME, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION)
PROVENANCE_PREFIXES = (Provenance.PREFIX, QuantizeImatrix.PREFIX, SPLIT_PREFIX)
OTHER_ROLE = "other"
ROLE_ORDER = [r.value for r in Role] + [OTHER_ROLE]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: str
    layer: int | None
    qtype: Q
    shape: tuple[int, ...]  # numpy order
    n_elements: int
    n_bytes: int


@dataclass
class RoleStats:
    role: str
    types: Counter = field(default_factory=Counter)  # qtype -> tensors
    n_tensors: int = 0
    n_elements: int = 0
    n_bytes: int = 0

    @property
    def bpw(self) -> float:
        return 8 * self.n_bytes / self.n_elements if self.n_elements else 0.0

    def add(self, t: TensorInfo) -> None:
        self.types[t.qtype] += 1
        self.n_tensors += 1
        self.n_elements += t.n_elements
        self.n_bytes += t.n_bytes


@dataclass
class GgufSummary:
    paths: list[Path]
    tensors: dict[str, TensorInfo]
    kv: dict[str, object]  # KV values of the first part (split.* of every part merged as written)

    def by_role(self) -> list[RoleStats]:
        stats: dict[str, RoleStats] = {}
        for t in self.tensors.values():
            stats.setdefault(t.role, RoleStats(t.role)).add(t)
        return [stats[r] for r in ROLE_ORDER if r in stats]

    def total(self) -> RoleStats:
        total = RoleStats("total")
        for t in self.tensors.values():
            total.add(t)
        return total

    @property
    def provenance(self) -> dict[str, object]:
        return {k: v for k, v in self.kv.items() if k in PROVENANCE_KEYS or k.startswith(PROVENANCE_PREFIXES)}

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def _field_value(f: gguf.ReaderField) -> object:
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - exotic (nested) arrays: show the raw parts
        return [p.tolist() for p in f.parts]


def read_summary(path: str | os.PathLike) -> GgufSummary:
    """Tensor infos and KV of a GGUF (every part of a split one); tensor data is not read."""
    paths = split_paths(path)
    tensors: dict[str, TensorInfo] = {}
    kv: dict[str, object] = {}
    for i, p in enumerate(paths):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found")
        r = read_gguf(p)
        for key, f in r.fields.items():
            if key.startswith(READER_PREFIX):
                continue
            if i == 0:
                kv[key] = _field_value(f)
        for rt in r.tensors:
            parsed = parse_gguf_name(rt.name)
            tensors[rt.name] = TensorInfo(
                name=rt.name, role=parsed.rule.role.value if parsed else OTHER_ROLE,
                layer=parsed.layer if parsed else None, qtype=Q(rt.tensor_type),
                shape=tuple(int(x) for x in reversed(rt.shape)), n_elements=int(rt.n_elements),
                n_bytes=int(rt.n_bytes))
    return GgufSummary(paths, tensors, kv)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def _types(c: Counter) -> str:
    return " ".join(f"{q.name}x{n}" for q, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0].name)))


def _short(v: object, limit: int = 100) -> str:
    if isinstance(v, list) and len(v) > 8:
        s = f"[{len(v)} items: {', '.join(map(repr, v[:3]))}, ...]"
    else:
        s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def format_summary(s: GgufSummary) -> str:
    rows = [("role", "tensors", "types", "params", "MiB", "bpw")]
    for st in [*s.by_role(), s.total()]:
        rows.append((st.role, str(st.n_tensors), _types(st.types), f"{st.n_elements:,}", _mib(st.n_bytes),
                     f"{st.bpw:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{', '.join(map(str, s.paths))}: {s.file_bytes / 2**20:,.2f} MiB on disk, "
             f"architecture {s.kv.get(Keys.General.ARCHITECTURE)!r}"]
    for j, r in enumerate(rows):
        cells = zip(r, widths, strict=True)
        lines.append("  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if j == 0 or j == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    prov = s.provenance
    if prov:
        lines.append("")
        lines.append("provenance:")
        for k in sorted(prov):
            v = prov[k]
            if k == Keys.General.FILE_TYPE and isinstance(v, int):
                try:
                    v = f"{v} ({gguf.LlamaFileType(v).name})"
                except ValueError:
                    pass
            lines.append(f"  {k} = {_short(v)}")
    return "\n".join(lines)


@dataclass
class GgufDiff:
    type_changes: list[tuple[str, Q, Q]]
    only_a: list[str]
    only_b: list[str]
    shape_changes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    kv_changes: list[tuple[str, object, object]]  # value None-marker: key absent
    bytes_a: int
    bytes_b: int


_ABSENT = "<absent>"


def diff_summaries(a: GgufSummary, b: GgufSummary) -> GgufDiff:
    ta, tb = a.tensors, b.tensors
    common = [n for n in ta if n in tb]
    kv_changes = []
    for k in sorted(a.kv.keys() | b.kv.keys()):
        if k.startswith(SPLIT_PREFIX):
            continue
        va, vb = a.kv.get(k, _ABSENT), b.kv.get(k, _ABSENT)
        if va != vb:
            kv_changes.append((k, va, vb))
    return GgufDiff(
        type_changes=[(n, ta[n].qtype, tb[n].qtype) for n in common if ta[n].qtype is not tb[n].qtype],
        only_a=[n for n in ta if n not in tb],
        only_b=[n for n in tb if n not in ta],
        shape_changes=[(n, ta[n].shape, tb[n].shape) for n in common if ta[n].shape != tb[n].shape],
        kv_changes=kv_changes,
        bytes_a=a.total().n_bytes, bytes_b=b.total().n_bytes,
    )


def format_diff(d: GgufDiff, a: str, b: str) -> str:
    lines = [f"--- {a}", f"+++ {b}",
             f"tensor data: {_mib(d.bytes_a)} MiB -> {_mib(d.bytes_b)} MiB"]
    if d.type_changes:
        lines.append(f"{len(d.type_changes)} tensors change type:")
        lines += [f"  {n}: {qa.name} -> {qb.name}" for n, qa, qb in d.type_changes]
    for n, sa, sb in d.shape_changes:
        lines.append(f"  {n}: shape {list(sa)} -> {list(sb)}")
    if d.only_a:
        lines.append(f"only in {a}: " + ", ".join(d.only_a))
    if d.only_b:
        lines.append(f"only in {b}: " + ", ".join(d.only_b))
    if d.kv_changes:
        lines.append(f"{len(d.kv_changes)} KV differences:")
        lines += [f"  {k}: {_short(va, 60)} -> {_short(vb, 60)}" for k, va, vb in d.kv_changes]
    if not (d.type_changes or d.shape_changes or d.only_a or d.only_b or d.kv_changes):
        lines.append("same tensors, types and KV metadata")
    return "\n".join(lines)
