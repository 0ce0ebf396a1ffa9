"""Router-KD's training settings, checked, and the two schedules they define: learning rate and batch rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glmgguf.choices import KD_SCHEDULES as SCHEDULES
from glmgguf.kd.errors import KdError

MIN_LR_FRACTION = 0.1


@dataclass
class TrainOptions:
    steps: int = 200
    lr: float = 5e-5
    batch_size: int = 4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float = 1.0
    train_bias: bool = False
    mtp: bool = True
    mtp_weight: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    device_map: str | None = None
    gradient_checkpointing: bool = True
    save_every: int = 50
    eval_every: int = 0  # with an eval cache: evaluate every N steps (and at the start and end)
    fsdp: bool = False  # under torchrun: FSDP2 over the ranks, data parallel (glmgguf.kd.fsdp)
    cpu_offload: bool = False  # with fsdp: parameter shards in host memory
    stop_after_step: int | None = None  # testing aid: stop (as if interrupted) after this step's checkpoint

    def run_key(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        keep = ("lr", "batch_size", "weight_decay", "warmup_steps", "schedule", "grad_clip", "train_bias", "mtp",
                "mtp_weight", "seed", "dtype")
        d = {k: getattr(self, k) for k in keep}
        if self.schedule == "cosine":
            d["steps"] = self.steps
        if self.fsdp:  # DCP checkpoints: resumable with --fsdp only (on any number of ranks)
            d["fsdp"] = True
        return d



def check_options(opts: TrainOptions) -> None:
    if opts.schedule not in SCHEDULES:
        raise KdError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if opts.steps < 1 or opts.batch_size < 1:
        raise KdError("--steps and --batch-size must be at least 1")
    if not opts.lr > 0 or not math.isfinite(opts.lr):
        raise KdError(f"--lr must be a positive number, not {opts.lr}")


def lr_at(step: int, opts: TrainOptions) -> float:
    """Learning rate of 0-based `step`: linear warmup, then constant or cosine down to 10%."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    if opts.schedule == "constant":
        return opts.lr
    t = (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)
    return opts.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def rows_for_step(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Sequence rows of 0-based `step`: epochs are seeded permutations of the cache, read in order."""
    out: list[int] = []
    pos = step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(batch - len(out), n - off)
        out.extend(perm[off:off + take].tolist())
        pos += take
    return out
