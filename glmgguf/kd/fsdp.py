"""Router-KD on many devices: the student sharded with FSDP2, checkpoints with torch.distributed.checkpoint.

Under `torchrun ... -m glmgguf kd train ... --fsdp` every rank holds 1/N of every parameter (`fully_shard`):
each router gate is its own FSDP unit with a float32 mixed-precision policy (master weights, gradients and their
reduction in float32), each trunk decoder layer and the MTP block's attention and MoE are units in the model's
dtype, and one root module (embeddings, final norm, LM head, the MTP block's small projections) runs the forward.
A unit's parameters are gathered for its forward (and again for its backward) and freed after, so a rank holds
its shard plus about one layer; `cpu_offload` keeps the shards in host memory. The global batch is split evenly
across ranks (data parallel); FSDP averages the gate gradients, which gives the gradient of the mean over the
global batch, as one process computes it.

Checkpoints are DCP directories (each rank writes its shard of the gates and of AdamW's state; `state.json`
beside them), so a run resumes on any number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from glmgguf.dist import Dist
from glmgguf.kd.checkpoints import LATEST
from glmgguf.kd.student import Student

DCP_MARKER = ".metadata"  # the file DCP writes last into a checkpoint directory


class ShardedStudent(nn.Module):
    """The student's trunk and MTP block under one module, the FSDP root whose forward is `Student.forward`."""

    def __init__(self, student: Student):
        super().__init__()
        self.model = student.model
        self.mtp = student.mtp
        self._student = [student]  # a list: not registered as a submodule

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk logits [B, S, V] and MTP logits [B, S-1, V] (or None), as `Student.forward`."""
        return self._student[0].forward(ids)


def shard_student(student: Student, dist: Dist, dtype: torch.dtype, cpu_offload: bool) -> ShardedStudent:
    """Wrap `student` (routers already freed to float32) with FSDP2 over all ranks; returns the root."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(dist.device).type, (dist.world,))
    offload: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    gates = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    frozen = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for gate in student.gates().values():
        fully_shard(gate, mesh=mesh, mp_policy=gates, offload_policy=offload)
    units: list[nn.Module] = list(student.model.model.layers)
    if student.mtp is not None:  # its decoder forward is called directly: shard its called submodules
        units += [student.mtp.self_attn, student.mtp.mlp]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=frozen, offload_policy=offload)
    root = ShardedStudent(student)
    fully_shard(root, mesh=mesh, mp_policy=frozen, offload_policy=offload)
    student.in_device = student.out_device = torch.device(dist.device)
    if student.mtp is not None:
        student.mtp_embed = student.mtp_embed.to(dist.device)
        student.rotary = student.rotary.to(dist.device)
    return root


def router_parameters(student: Student, names: list[str]) -> dict[str, nn.Parameter]:
    """HF name -> the (sharded) parameter now registered in the router module."""
    gates = student.gates()
    out = {}
    for n in names:
        layer = int(n.split(".")[2])
        out[n] = getattr(gates[layer], n.rsplit(".", 1)[1])
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered on every rank (a collective), or `t` itself; on the CPU."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def save_sharded(work: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                 root: nn.Module, state: dict, dist: Dist) -> None:
    """Every rank writes its shards of step `step` (DCP); rank 0 then adds `state.json`, points LATEST at the
    checkpoint and drops older ones (each move atomic, as `glmgguf.kd.checkpoints.save_checkpoint`)."""
    d = work / f"checkpoint-{step:07d}"
    tmp = work / f"checkpoint-{step:07d}.partial"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"trainable": dict(params), "optim": get_optimizer_state_dict(root, opt)}, checkpoint_id=tmp)
    if dist.main:
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "format": "dcp"}, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        (work / (LATEST + ".partial")).write_text(d.name)
        os.replace(work / (LATEST + ".partial"), work / LATEST)
        for old in work.glob("checkpoint-*"):
            if old.name != d.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(ckpt: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, root: nn.Module) -> None:
    """Load a DCP checkpoint into this rank's shards (resharded when it was written by another number of ranks)."""
    sd = {"trainable": dict(params), "optim": get_optimizer_state_dict(root, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_optimizer_state_dict(root, opt, sd["optim"])


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (ckpt / DCP_MARKER).is_file()
