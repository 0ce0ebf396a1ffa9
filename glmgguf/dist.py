"""Data-parallel runs under `torchrun`: the process group, each rank's share of the work, the checks that every
rank runs the same job.

`torchrun --nproc-per-node N -m glmgguf ...` starts N copies of a command with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set. `launch` sees them, joins the process group (gloo on CPU, NCCL on CUDA, one GPU
per LOCAL_RANK) and gives the command a `Dist`; a plain start gets None and runs as one process. Every check here
is collective: all ranks see the same gathered values and fail together with the same one-line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from glmgguf.errors import GlmggufError

log = logging.getLogger(__name__)

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TAIL_BYTES = 65536  # bytes read from the end of every shard for the model's identity


class DistError(GlmggufError, RuntimeError):
    """A distributed launch that cannot run: no rendezvous, ranks that disagree, work that does not divide."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group."""

    rank: int
    world: int
    local_rank: int
    device: str  # where this rank computes: "cpu" or "cuda:{LOCAL_RANK}"
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str) -> range:
        """This rank's contiguous part of `n` items (the first `n % world` ranks take one more)."""
        if n < self.world:
            raise DistError(f"{self.world} ranks but only {n} {what}: launch at most {n} ranks (or make more "
                            f"{what})")
        return self.span(n, self.rank)

    def span(self, n: int, rank: int) -> range:
        """Rank `rank`'s part of `n` items (see `share`)."""
        per, extra = divmod(n, self.world)
        start = rank * per + min(rank, extra)
        return range(start, start + per + (1 if rank < extra else 0))

    def divide(self, n: int, what: str) -> int:
        """`n // world`, refusing a world size that does not divide `n`."""
        if n % self.world:
            raise DistError(f"{what} {n} is not divisible by the world size {self.world}: choose a multiple of "
                            f"{self.world} or another --nproc-per-node")
        return n // self.world

    def same(self, what: str, value: str) -> None:
        """Raise on every rank unless all ranks hold the same `value` (a digest of their inputs)."""
        values: list[str] = [""] * self.world
        dist.all_gather_object(values, value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise DistError(f"ranks see different {what}: rank(s) {', '.join(map(str, odd))} differ from rank 0 "
                            "(every node must hold the same files and run the same command)")

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """`t` reduced over the ranks (`op`: "sum" or "max"), on `t`'s device."""
        x = t.to(self.device).clone()
        dist.all_reduce(x, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return x.to(t.device)

    def send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t.to(self.device).contiguous(), dst)

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        """A tensor of `like`'s shape and dtype from rank `src` (on the CPU)."""
        buf = torch.empty_like(like, device=self.device)
        dist.recv(buf, src)
        return buf.cpu()

    def barrier(self) -> None:
        dist.barrier(device_ids=[self.local_rank]) if self.backend == "nccl" else dist.barrier()

    def work_dir(self, base: Path) -> Path:
        """This rank's own work directory under `base` (resumable per rank)."""
        return base / f"rank-{self.rank:05d}-of-{self.world:05d}"


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in LAUNCH_ENV[:2])


def _rank_device(device: str, local_rank: int) -> str:
    """The device of a rank: cpu stays cpu; cuda, cuda:N or auto (with GPUs) become cuda:LOCAL_RANK."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise DistError(f"--device {device} but this machine has no CUDA device")
    if local_rank >= torch.cuda.device_count():
        raise DistError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): launch at "
                        f"most {torch.cuda.device_count()} processes per node")
    return f"cuda:{local_rank}"


def _join(backend: str, device: str, timeout: timedelta) -> None:
    """init_process_group from the environment, its failures as one-line errors."""
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        if k not in os.environ:
            raise DistError(f"WORLD_SIZE is set but {k} is not: no rendezvous to join (launch with torchrun, or "
                            "set MASTER_ADDR and MASTER_PORT)")
    kw = {"device_id": torch.device(device)} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, timeout=timeout, **kw)
    except (RuntimeError, ValueError) as e:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistError(f"rendezvous at {where} failed: {str(e).splitlines()[0]}") from None


@contextmanager
def launch(device: str, timeout_s: float = 1800) -> Iterator[Dist | None]:
    """Join the process group when launched by torchrun (yields None otherwise); leave it on exit."""
    if not launched():
        yield None
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _rank_device(device, local)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
    _join(backend, dev, timedelta(seconds=timeout_s))
    try:
        d = Dist(rank, world, local, dev, backend)
        yield d
        d.barrier()  # leave together: a gloo rank whose group goes while a peer still works can abort at exit
    finally:
        dist.destroy_process_group()


def checkpoint_identity(model_dir: str | os.PathLike) -> str:
    """A digest of a checkpoint as stored: config, tokenizer files, every shard's name, size, header and last
    `TAIL_BYTES` (two copies of the same files agree; another model, pruning or training differs)."""
    from glmgguf.io import CheckpointReader

    root = Path(model_dir)
    reader = CheckpointReader(root)
    h = hashlib.sha256(json.dumps(reader.config, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (root / name).is_file():
            h.update(hashlib.sha256((root / name).read_bytes()).digest())
    for shard in sorted({i.shard for i in reader.tensors.values()}):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(int.from_bytes(f.read(8), "little")) if size >= 8 else b""
            f.seek(max(0, size - TAIL_BYTES))
            h.update(f"{shard.name}:{size}".encode() + head + f.read())
    return h.hexdigest()
