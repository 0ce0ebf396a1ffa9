"""Router-KD on many devices: the student sharded with FSDP2, checkpoints with torch.distributed.checkpoint.

Under `torchrun ... -m glmgguf kd train ... --fsdp` every rank holds 1/N of every parameter (`fully_shard`):
each router gate is its own FSDP unit with a float32 mixed-precision policy (master weights, gradients and their
reduction in float32), each trunk decoder layer and the MTP block's attention and MoE are units in the model's
dtype, and one root module (embeddings, final norm, LM head, the MTP block's small projections) runs the forward.
A unit's parameters are gathered for its forward (and again for its backward) and freed after, so a rank holds
its shard plus about one layer; `cpu_offload` keeps the shards in host memory. The global batch is split evenly
across ranks (data parallel); FSDP averages the gate gradients, which gives the gradient of the mean over the
global batch, as one process computes it.

The student is never whole in a rank's memory (`load_sharded_student`): it is built on the meta device, sharded,
materialized empty and each rank then reads from the checkpoint only the rows of its own shards (for the fused
routed experts, dim 0 of `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]: its share of the experts), one
tensor at a time; the buffers (router correction biases, rotary frequencies) are read or recomputed whole.

Checkpoints are DCP directories (each rank writes its shard of the gates and of AdamW's state; `state.json`
beside them), so a run resumes on any number of ranks.

`materialize` shards any student built on the meta device by the modules holding its trainable parameters (each
its own float32 unit): LoRA-KD's adapters and gate copies (`glmgguf.kd.lora`) as well as Router-KD's gates.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from glmgguf.dist import Dist
from glmgguf.io import CheckpointReader
from glmgguf.kd.checkpoints import publish_checkpoint
from glmgguf.kd.errors import KdError
from glmgguf.kd.student import Student
from glmgguf.modeling import copy_experts, storage_dtype

log = logging.getLogger(__name__)
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


def shard_student(student: Student, trainable: list[nn.Module], dist: Dist, dtype: torch.dtype,
                  cpu_offload: bool) -> ShardedStudent:
    """Wrap `student` with FSDP2 over all ranks, each module of `trainable` (its parameters float32 trainable, or
    trained in float32) its own float32 unit; returns the root."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(dist.device).type, (dist.world,))
    offload: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    frozen = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for module in trainable:
        fully_shard(module, mesh=mesh, mp_policy=float32, offload_policy=offload)
    units: list[nn.Module] = list(student.model.model.layers)
    if student.mtp is not None:  # its decoder forward is called directly: shard its called submodules
        units += [student.mtp.self_attn, student.mtp.mlp]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=frozen, offload_policy=offload)
    root = ShardedStudent(student)
    fully_shard(root, mesh=mesh, mp_policy=frozen, offload_policy=offload)
    student.in_device = student.out_device = torch.device(dist.device)
    if student.mtp is not None:
        if student.mtp_embed is not None:
            student.mtp_embed = student.mtp_embed.to(dist.device)
        student.rotary = student.rotary.to(dist.device)
    return root


def trainable_modules(student: Student) -> list[nn.Module]:
    """The modules that hold trainable parameters of their own (the FSDP units trained in float32)."""
    return [m for m in student.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def load_sharded_student(model_dir: str | os.PathLike, dtype: torch.dtype, mtp: bool, train_bias: bool, dist: Dist,
                         cpu_offload: bool) -> tuple[Student, ShardedStudent, dict[str, nn.Parameter]]:
    """The student sharded over the ranks without ever being whole on one: built on the meta device, routers
    freed, `materialize`d. Returns (student, FSDP root, HF name -> trainable sharded parameter)."""
    from glmgguf.kd.routers import free_routers

    student = Student(model_dir, dtype=dtype, mtp=mtp, meta=True)
    names = list(free_routers(student, train_bias))
    root = materialize(student, dtype, dist, cpu_offload)
    return student, root, router_parameters(student, names)


def materialize(student: Student, dtype: torch.dtype, dist: Dist, cpu_offload: bool,
                values: dict[str, torch.Tensor] | None = None,
                rename: Callable[[str], str] | None = None) -> ShardedStudent:
    """Shard a student built on the meta device (its trainable parameters chosen: `trainable_modules`), allocate
    this rank's shards (`to_empty`) and fill them: a parameter in `values` (trunk name -> whole tensor) from
    there, every other from the checkpoint (tensor `rename(name)`; see `fill_shards`). Returns the FSDP root."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

    if cpu_offload and torch.device(dist.device).type == "cpu":  # FSDP's offload pins memory for an accelerator
        log.warning("--cpu-offload: the ranks compute on the CPU, where the shards already are; ignored")
        cpu_offload = False
    root = shard_student(student, trainable_modules(student), dist, dtype, cpu_offload)
    root.to_empty(device="cpu" if cpu_offload else dist.device)
    student.model.model.rotary_emb = GlmMoeDsaRotaryEmbedding(student.config).to(dist.device)
    fill_shards(student, dtype, values or {}, rename or (lambda name: name))
    return root


def _parts(student: Student) -> list[tuple[str, nn.Module]]:
    """(HF name prefix, module) of the trunk and the MTP block."""
    parts: list[tuple[str, nn.Module]] = [("", student.model)]
    if student.mtp is not None:
        parts.append((f"model.layers.{student.mtp_index}.", student.mtp))
    return parts


@torch.no_grad()
def fill_shards(student: Student, dtype: torch.dtype, values: dict[str, torch.Tensor],
                rename: Callable[[str], str]) -> None:
    """Read this rank's rows of every sharded parameter and every buffer (whole) from the checkpoint (a trunk
    parameter in `values` from there; the checkpoint holds a trunk tensor `name` as `rename(name)`); the trunk's
    rotary frequencies are computed, not stored. A value is rounded to its storage dtype (`dtype`; float32 for the
    correction bias) first, as a whole load rounds it before the routers are freed to float32."""
    for prefix, module in _parts(student):
        own = values if prefix == "" else {}
        for key, p in module.named_parameters():
            if key in own:
                rows = shard_rows(p)
                _local(p).copy_(own[key][rows.start:rows.stop])
            else:
                _fill_parameter(student.reader, prefix + rename(key), p, dtype)
        for key, b in module.named_buffers():
            name = prefix + rename(key)
            if name in student.reader:
                b.copy_(student.reader.get(name).to(storage_dtype(name, dtype)))
            elif not name.startswith("model.rotary_emb."):
                raise KdError(f"no value for buffer {name}: the checkpoint lacks it")


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _fill_parameter(reader: CheckpointReader, name: str, p: torch.Tensor, dtype: torch.dtype) -> None:
    """Copy rows `shard_rows(p)` of checkpoint tensor `name` into `p`'s local shard (fused experts: those experts;
    an MTP indexer tensor the checkpoint lacks is zero, as `glmgguf.modeling.load_decoder_layer` makes it)."""
    local = _local(p)
    rows = shard_rows(p)
    prefix = name.rsplit("mlp.experts.", 1)[0]
    if name.endswith("mlp.experts.gate_up_proj"):
        copy_experts(reader, prefix, rows.start, local, None)
    elif name.endswith("mlp.experts.down_proj"):
        copy_experts(reader, prefix, rows.start, None, local)
    elif name in reader:
        local.copy_(reader.get_rows(name, rows.start, rows.stop).to(storage_dtype(name, dtype)))
    elif ".indexer." in name:
        local.zero_()
    else:
        raise KdError(f"checkpoint lacks {name}")


def shard_rows(p: torch.Tensor) -> range:
    """The rows of dim 0 that this rank's shard of `p` holds (all rows of a plain tensor). FSDP2 shards dim 0 as
    `torch.chunk` does: chunks of ceil(n / world) rows, so the last ranks' may be shorter or empty."""
    n = p.shape[0]
    if not isinstance(p, DTensor):
        return range(n)
    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise KdError(f"expected a dim-0 FSDP shard, got placements {p.placements}")
    per = -(-n // p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * per, n)
    rows = range(start, min(start + per, n))
    if p.to_local().shape[0] != len(rows):
        raise KdError(f"a local shard of {p.to_local().shape[0]} rows, expected {len(rows)} of {n}")
    return rows


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
        publish_checkpoint(work, tmp, d)
    dist.barrier()


def load_sharded(ckpt: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, root: nn.Module) -> None:
    """Load a DCP checkpoint into this rank's shards (resharded when it was written by another number of ranks)."""
    sd = {"trainable": dict(params), "optim": get_optimizer_state_dict(root, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_optimizer_state_dict(root, opt, sd["optim"])


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (ckpt / DCP_MARKER).is_file()
