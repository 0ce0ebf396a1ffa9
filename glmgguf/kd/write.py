"""Write the distilled student: the input checkpoint streamed through, with only the router tensors replaced.

Every tensor is read once from the student's shards and written once with `ShardedWriter`, in the input's order,
names, shapes and stored dtypes (a block-FP8 weight as its codes and scales; trained gates are cast back to their
stored dtype, e.g. BF16); config.json and every other file are copied byte for byte. A replaced block-FP8 weight
(a LoRA merge into the release's FP8 projections) is written in BF16 instead: re-quantizing it would round the
merged change with the weight, so its scale is dropped and its module is added to
`quantization_config.modules_to_not_convert`, the one change config.json gets. Before the output directory is
moved into place it is read back: each tensor that KD does not train must be byte-identical to the input's, each
replaced tensor must hold exactly the trained values (the input's bytes are hashed as they stream through the
writer, so the input is read once and the output once). The input is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from glmgguf.io import CheckpointReader, ShardedWriter, atomic_dir
from glmgguf.io.reader import TensorInfo, read_header
from glmgguf.io.writer import tensor_bytes
from glmgguf.kd.errors import WriteVerifyError
from glmgguf.reap.prune import STATS_NAME


def raw_bytes(info: TensorInfo) -> bytes:
    with open(info.shard, "rb") as f:
        f.seek(info.offset)
        return f.read(info.nbytes)


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """Names of tensors whose stored bytes (or dtype / shape, or presence) differ between two checkpoints."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    out = sorted(set(ra.names()) ^ set(rb.names()))
    for name in ra.names():
        if name not in rb:
            continue
        ia, ib = ra.info(name), rb.info(name)
        if ia.dtype != ib.dtype or ia.shape != ib.shape or raw_bytes(ia) != raw_bytes(ib):
            out.append(name)
    return sorted(out)


@dataclass
class WriteReport:
    out: Path
    n_tensors: int
    identical: int  # tensors verified byte-identical to the input
    replaced: list[str]  # tensors replaced with trained values
    changed: list[str]  # replaced tensors whose bytes really differ from the input's
    max_abs_change: dict[str, float]


def _max_shard_bytes(reader: CheckpointReader) -> int:
    sizes = [os.path.getsize(p) for p in {i.shard for i in reader.tensors.values()}]
    return max(sizes) if sizes else 5 * 1024**3


def write_student(student: str | os.PathLike, out: str | os.PathLike, replacements: dict[str, torch.Tensor], *,
                  extra_files: dict[str, bytes] | None = None, metadata: dict[str, str] | None = None,
                  force: bool = False, progress: Callable[[int, int], None] | None = None) -> WriteReport:
    """Copy `student` to `out` with `replacements` (HF name -> tensor) in place of those tensors; verified."""
    src, out = Path(student), Path(out)
    if src.resolve() == out.resolve():
        raise WriteVerifyError("the output directory must differ from the student's (the input is never modified)")
    reader = CheckpointReader(src)
    unknown = sorted(set(replacements) - set(reader.names()))
    if unknown:
        raise WriteVerifyError(f"{unknown[0]} is not a tensor of {src}")
    unquantized = sorted(n for n in replacements if n in reader.scales)  # block-FP8 weights written BF16
    stored: dict[str, torch.Tensor] = {}
    for name, t in replacements.items():
        info = reader.info(name)
        if tuple(t.shape) != info.shape:
            raise WriteVerifyError(f"{name}: trained shape {list(t.shape)} differs from the stored {list(info.shape)}")
        if not torch.isfinite(t).all():
            raise WriteVerifyError(f"{name}: trained values are not finite")
        dtype = torch.bfloat16 if name in unquantized else info.torch_dtype
        stored[name] = t.detach().to("cpu").to(dtype).contiguous()
    names = reader.names()
    first_shard = min({i.shard for i in reader.tensors.values()})
    meta = dict(read_header(first_shard)[1])
    meta.pop("format", None)
    meta.update(metadata or {})
    parts = {n: reader.stored_parts(n) for n in names}  # a block-FP8 weight: its codes, then its scale
    written_as = {n: [(n, tuple(stored[n].shape), stored[n].dtype)] if n in unquantized else
                  [(part, info.shape, info.torch_dtype) for part, info in parts[n]] for n in names}
    config = _config_bytes(src, unquantized)
    with atomic_dir(out, force=force, inputs=[src]) as tmp:
        plan = [p for n in names for p in written_as[n]]
        read_hash: dict[str, bytes] = {}  # sha256 of each input tensor's bytes, taken as it streams through
        with ShardedWriter(tmp, plan, max_shard_bytes=_max_shard_bytes(reader), metadata=meta) as writer:
            for i, name in enumerate(names):
                if name in unquantized:
                    writer.add(name, stored[name])
                for part, info in parts[name] if name not in unquantized else ():
                    t = reader.read_stored(info)
                    read_hash[part] = hashlib.sha256(tensor_bytes(t)).digest()
                    writer.add(part, stored[name] if part in stored else t)
                    del t
                if progress:
                    progress(i + 1, 2 * len(names))
        (tmp / "config.json").write_bytes(config)
        for f in reader.extra_files():
            shutil.copy2(f, tmp / f.name)
        if (src / STATS_NAME).is_file():  # the pruned model's calibration statistics (NVFP4 input scales)
            shutil.copy2(src / STATS_NAME, tmp / STATS_NAME)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        # read everything back before the directory appears
        check = CheckpointReader(tmp)
        if check.names() != names:
            raise WriteVerifyError("written checkpoint lists other tensors than the input")
        identical, changed, max_change = 0, [], {}
        for i, name in enumerate(names):
            written = dict(check.stored_parts(name))
            if sorted(written) != sorted(p for p, _, _ in written_as[name]):
                raise WriteVerifyError(f"{name}: written as {sorted(written)}, expected {written_as[name]}")
            for part, shape, dtype in written_as[name]:
                b = written[part]
                if (b.torch_dtype, b.shape) != (dtype, shape):
                    raise WriteVerifyError(f"{part}: written as {b.dtype}{list(b.shape)}, expected "
                                           f"{dtype}{list(shape)}")
                got = hashlib.sha256(raw_bytes(b)).digest()
                if part in stored:
                    if got != hashlib.sha256(tensor_bytes(stored[part])).digest():
                        raise WriteVerifyError(f"{part}: written bytes differ from the trained values")
                    if got != read_hash.get(part):
                        changed.append(part)
                        max_change[part] = float((check.get(part).float() - reader.get(part).float()).abs().max())
                elif got != read_hash[part]:
                    raise WriteVerifyError(f"{part} changed although KD must leave it byte-identical")
                else:
                    identical += 1
            if progress:
                progress(len(names) + i + 1, 2 * len(names))
        if (tmp / "config.json").read_bytes() != config:
            raise WriteVerifyError("config.json was not written as intended")
    return WriteReport(out, len(plan), identical, sorted(stored), changed, max_change)


def _config_bytes(src: Path, unquantized: list[str]) -> bytes:
    """The student's config.json: its bytes, or with the modules of `unquantized` weights (now BF16) added to
    `quantization_config.modules_to_not_convert`."""
    data = (src / "config.json").read_bytes()
    if not unquantized:
        return data
    cfg = json.loads(data)
    skip = cfg["quantization_config"].setdefault("modules_to_not_convert", [])
    skip += [m for m in (n.removesuffix(".weight") for n in unquantized) if m not in skip]
    return (json.dumps(cfg, indent=2) + "\n").encode()


def checkpoint_digest(model_dir: str | os.PathLike, names: list[str]) -> str:
    """sha256 over config.json and the stored bytes of `names` (identifies a student for resuming)."""
    reader = CheckpointReader(model_dir)
    h = hashlib.sha256(json.dumps(reader.config, sort_keys=True).encode())
    for n in names:
        h.update(n.encode() + raw_bytes(reader.info(n)))
    return h.hexdigest()[:16]
