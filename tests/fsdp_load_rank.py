"""One rank of `test_dist.test_fsdp_shard_load_equals_whole_load` (run under torchrun): shard the student as
`--fsdp` does, either loaded whole first (`whole`) or shard by shard (`shards`), and save this rank's local shards,
buffers, peak RSS (and its growth while loading) and checkpoint bytes read to OUT/MODE-RANK.{pt,json}, with the
trunk and MTP logits of one training-mode forward of a seeded batch.

    torchrun --nproc-per-node 2 tests/fsdp_load_rank.py {whole,shards} STUDENT OUT
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from glmgguf.dist import launch
from glmgguf.kd.fsdp import load_sharded_student, shard_student, trainable_modules
from glmgguf.kd.routers import free_routers
from glmgguf.kd.student import Student


def peak_rss() -> int:
    """This process's peak resident set so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(mode: str, student_dir: str, out: Path) -> None:
    with launch("cpu") as dist:
        assert dist is not None
        before = peak_rss()  # the interpreter, torch and transformers imported
        if mode == "whole":
            student = Student(student_dir, dtype=torch.float32, mtp=True)
            free_routers(student, train_bias=True)
            root = shard_student(student, trainable_modules(student), dist, torch.float32, cpu_offload=False)
        else:
            student, root, _ = load_sharded_student(student_dir, torch.float32, True, True, dist, False)
        report = {"peak_rss": peak_rss(), "load_rss": peak_rss() - before, "bytes_read": student.reader.bytes_read,
                  "mtp_embed_copy": student.mtp_embed is not None}
        state = {k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
                 for k, v in [*root.named_parameters(), *root.named_buffers()]}
        state.update({f"rotary.{k}": v for k, v in student.rotary.named_buffers()})
        student.train(True)
        ids = torch.randint(0, 4000, (1, 48), generator=torch.Generator().manual_seed(dist.rank))
        state["forward.logits"], state["forward.mtp_logits"] = (t.detach() for t in root(ids))
        torch.save(state, out / f"{mode}-{dist.rank}.pt")
        (out / f"{mode}-{dist.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
