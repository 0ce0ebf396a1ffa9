"""Identities of what a teacher cache belongs to: the tokenizer files, the text, the teacher's tensors, and
whether a student checkpoint is that teacher or pruned from it.

The teacher fingerprint samples bytes of every tensor (expert tensors per expert, so a pruned student's experts
can be matched through its keep-map; router tensors are left out, as pruning slices them and KD changes them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from glmgguf.io import CheckpointReader
from glmgguf.io.reader import TensorInfo
from glmgguf.kd.errors import CacheError, StudentMismatchError
from glmgguf.layout import GlmLayout, LayerKind, Role, parse_hf_name

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
DIGEST_BYTES = 4096  # bytes read from each end of a tensor for its fingerprint (GLM-5.2: ~0.5 GB in all)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_hash(model_dir: str | os.PathLike) -> str:
    """sha256 over the tokenizer files present in a checkpoint directory (names and bytes)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            found = True
            h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    if not found:
        raise CacheError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    return h.hexdigest()


def token_hash(sequences: torch.Tensor) -> str:
    """sha256 of packed token ids [N, S] (as int32 little-endian, with the shape)."""
    s = sequences.to(torch.int32).contiguous()
    return sha256_hex(json.dumps(list(s.shape)).encode() + s.numpy().tobytes())


def file_hashes(paths: Sequence[str | os.PathLike]) -> list[dict]:
    out = []
    for p in paths:
        data = Path(p).read_bytes()
        out.append({"name": Path(p).name, "sha256": sha256_hex(data), "bytes": len(data)})
    return out


def _raw_sample(info: TensorInfo) -> bytes:
    """The first and last DIGEST_BYTES of a tensor's data (all of it when small)."""
    with open(info.shard, "rb") as f:
        if info.nbytes <= 2 * DIGEST_BYTES:
            f.seek(info.offset)
            return f.read(info.nbytes)
        f.seek(info.offset)
        head = f.read(DIGEST_BYTES)
        f.seek(info.offset + info.nbytes - DIGEST_BYTES)
        return head + f.read(DIGEST_BYTES)


def tensor_digest(reader: CheckpointReader, name: str) -> str:
    """A short fingerprint of one stored tensor: dtype, shape and sampled bytes."""
    info = reader.info(name)
    h = hashlib.sha256(f"{info.dtype}{list(info.shape)}".encode())
    h.update(_raw_sample(info))
    return h.hexdigest()[:16]


def _is_router(rule_role: Role) -> bool:
    return rule_role in (Role.ROUTER, Role.ROUTER_BIAS)


def teacher_fingerprint(reader: CheckpointReader, layout: GlmLayout) -> dict:
    """What a student must share with its teacher: non-expert, non-router tensors (digest per tensor) and every
    routed expert (one digest over its gate/up/down tensors), with the layout facts KD relies on."""
    shared: dict[str, str] = {}
    experts: dict[int, dict[int, hashlib._Hash]] = {}
    for name in reader.names():
        p = parse_hf_name(name)
        if p is not None and p.expert is not None and p.layer is not None:
            experts.setdefault(p.layer, {}).setdefault(p.expert, hashlib.sha256())
            continue
        if p is not None and _is_router(p.rule.role):
            continue
        shared[name] = tensor_digest(reader, name)
    expert_digests: dict[str, list[str]] = {}
    for info in layout.moe_layers:
        ds = []
        for e in range(info.n_experts):
            h = hashlib.sha256()
            for w in ("gate_proj", "up_proj", "down_proj"):
                h.update(tensor_digest(reader, f"model.layers.{info.index}.mlp.experts.{e}.{w}.weight").encode())
            ds.append(h.hexdigest()[:16])
        expert_digests[str(info.index)] = ds
    return {
        "vocab_size": layout.vocab_size,
        "hidden_size": layout.hidden_size,
        "n_layers": layout.n_layers,
        "n_mtp": layout.n_mtp,
        "moe_layers": [x.index for x in layout.moe_layers],
        "experts": {str(x.index): x.n_experts for x in layout.moe_layers},
        "expert_digests": expert_digests,
        "shared_digests": shared,
    }


def _student_keep_map(student_dir: Path, layout: GlmLayout, teacher: dict) -> dict[int, list[int]]:
    from glmgguf.reap.prune import KEEP_MAP_NAME

    t_experts = {int(k): v for k, v in teacher["experts"].items()}
    path = student_dir / KEEP_MAP_NAME
    if not path.is_file():
        for x in layout.moe_layers:
            if x.n_experts != t_experts.get(x.index):
                raise StudentMismatchError(
                    f"{student_dir}: layer {x.index} has {x.n_experts} experts, the teacher "
                    f"{t_experts.get(x.index)}, and there is no {KEEP_MAP_NAME}: not pruned from this teacher")
        return {x.index: list(range(x.n_experts)) for x in layout.moe_layers}
    try:
        data = json.loads(path.read_text())
        keep = {int(k): [int(e) for e in v] for k, v in data["keep_map"].items()}
        source = {int(k): int(v) for k, v in data.get("source_experts", {}).items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StudentMismatchError(f"{path}: unreadable keep-map ({e})") from None
    for L, n_src in source.items():
        if t_experts.get(L) != n_src:
            raise StudentMismatchError(f"{path}: layer {L} was pruned from {n_src} experts, the teacher has "
                                       f"{t_experts.get(L)}: not pruned from this teacher")
    for x in layout.moe_layers:
        ids = keep.get(x.index)
        if ids is None:
            raise StudentMismatchError(f"{path} has no entry for MoE layer {x.index}")
        if len(ids) != x.n_experts:
            raise StudentMismatchError(f"{path}: layer {x.index} keeps {len(ids)} experts, the student has "
                                       f"{x.n_experts}")
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= t_experts[x.index]:
            raise StudentMismatchError(f"{path}: layer {x.index} names experts outside the teacher's "
                                       f"0..{t_experts[x.index] - 1} or twice")
    return keep


def check_student_against(teacher: dict, reader: CheckpointReader, layout: GlmLayout,
                          student_dir: Path) -> dict[int, list[int]]:
    """Compare a student checkpoint with a teacher fingerprint (see `TeacherCache.check_student`)."""
    if layout.vocab_size != teacher["vocab_size"]:
        raise StudentMismatchError(f"{student_dir}: vocab_size {layout.vocab_size} differs from the teacher's "
                                   f"{teacher['vocab_size']}")
    for key, have in (("hidden_size", layout.hidden_size), ("n_layers", layout.n_layers)):
        if have != teacher[key]:
            raise StudentMismatchError(f"{student_dir}: {key} {have} differs from the teacher's {teacher[key]}")
    moe = [x.index for x in layout.moe_layers]
    t_moe = [L for L in teacher["moe_layers"] if L < layout.n_layers + layout.n_mtp]
    if moe != t_moe:
        raise StudentMismatchError(f"{student_dir}: MoE layers {moe} differ from the teacher's {t_moe}")
    t_experts = {int(k): v for k, v in teacher["experts"].items()}
    for x in layout.moe_layers:
        if x.n_experts > t_experts[x.index]:
            raise StudentMismatchError(f"{student_dir}: layer {x.index} has {x.n_experts} experts, more than the "
                                       f"teacher's {t_experts[x.index]}")
    keep = _student_keep_map(student_dir, layout, teacher)
    shared = teacher["shared_digests"]
    for name in reader.names():
        p = parse_hf_name(name)
        if p is not None and (p.expert is not None or _is_router(p.rule.role)):
            continue
        if p is not None and p.layer is not None and p.layer >= layout.n_layers + layout.n_mtp:
            continue
        if name not in shared:
            raise StudentMismatchError(f"{student_dir}: tensor {name} does not exist in the teacher")
        if tensor_digest(reader, name) != shared[name]:
            raise StudentMismatchError(f"{student_dir}: {name} differs from the teacher's: not pruned from this "
                                       "teacher (only experts and routers may differ)")
    own = {n for n in shared if (p := parse_hf_name(n)) is None or p.layer is None
           or p.layer < layout.n_layers + layout.n_mtp}
    missing = sorted(own - set(reader.names()))
    if missing:
        raise StudentMismatchError(f"{student_dir}: lacks the teacher's tensor {missing[0]}")
    digests = teacher["expert_digests"]
    for x in layout.moe_layers:
        for j, e in enumerate(keep[x.index]):
            h = hashlib.sha256()
            for w in ("gate_proj", "up_proj", "down_proj"):
                h.update(tensor_digest(reader, f"model.layers.{x.index}.mlp.experts.{j}.{w}.weight").encode())
            if h.hexdigest()[:16] != digests[str(x.index)][e]:
                raise StudentMismatchError(f"{student_dir}: layer {x.index} expert {j} is not the teacher's expert "
                                           f"{e} that the keep-map names: not pruned from this teacher")
    if any(x.kind is LayerKind.MOE and x.index not in keep for x in layout.layers):
        raise StudentMismatchError(f"{student_dir}: keep-map misses a MoE layer")
    return keep
