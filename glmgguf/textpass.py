"""One pass of packed text through a checkpoint: the flow `reap observe` and `kd teacher` share.

Both check their output and their work directory before any work, pack the text with the model's tokenizer,
run the model over it (in memory, or streaming one decoder layer at a time, resumable through the work
directory), show the progress, and once the output is written remove what the run left in its work directory.
A work directory holding anything but a run's own files is refused and never cleared (`glmgguf.workdir.WorkDir`).

Under torchrun (`glmgguf.dist`) every rank packs the same text, checks that all ranks see the same model files
and tokens, takes its contiguous share of the batches and streams through its own work directory under the given
one (`rank-RRRRR-of-WWWWW`, resumable per rank); only rank 0 shows progress.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from glmgguf.choices import DTYPES
from glmgguf.dist import Dist, checkpoint_identity
from glmgguf.runner import ProgressFn, chunk_sequences
from glmgguf.workdir import WorkDir

if TYPE_CHECKING:
    import torch

    from glmgguf.reap.data import Calibration


def default_work_dir(out: Path) -> Path:
    """Where a streaming pass writing `out` spills its activations unless told otherwise: OUT.work."""
    return out.with_name(out.name + ".work")


def _tokens_digest(sequences: torch.Tensor) -> str:
    """sha256 of packed token ids [N, S] with their shape."""
    import torch

    s = sequences.to(torch.int64).contiguous()
    return hashlib.sha256(str(list(s.shape)).encode() + s.numpy().tobytes()).hexdigest()


@dataclass
class TextPass:
    """A pass of packed text through `model` whose result is written to `out` (see the module docstring)."""

    model: Path
    out: Path
    text: Calibration
    chunks: list[torch.Tensor]
    streaming: bool
    device: str
    dtype: torch.dtype
    work_dir: Path  # this rank's (under torchrun, a directory of the given one)
    spill_bytes: int
    dist: Dist | None = None

    @classmethod
    def prepare(cls, model: Path, out: Path, *, force: bool, data: Sequence[Path], seq_len: int,
                max_tokens: int | None, num_samples: int | None, seed: int, text_field: str, batch_size: int,
                streaming: bool, device: str, dtype: str, work_dir: Path | None, spill_threshold: int,
                dist: Dist | None = None) -> TextPass:
        """Check the output and the work directory, then pack the text (the command-line options' values);
        under torchrun `chunks` are this rank's share and `device` its device."""
        import torch

        from glmgguf.io.atomic import check_output
        from glmgguf.reap.data import load_calibration, load_tokenizer

        check_output(out, force, inputs=[model])
        wd = work_dir or default_work_dir(out)
        if dist is not None:
            wd, device = dist.work_dir(wd), dist.device
        if streaming:
            WorkDir(wd).check()
        text = load_calibration(data, load_tokenizer(model), seq_len, max_tokens=max_tokens,
                                num_samples=num_samples, seed=seed, text_field=text_field)
        chunks = chunk_sequences(text.sequences, batch_size)
        if dist is not None:
            dist.same("model files", checkpoint_identity(model))
            dist.same("text (packed tokens)", _tokens_digest(text.sequences))
            chunks = [chunks[i] for i in dist.share(len(chunks), "batches of text (--batch-size)")]
        return cls(model, out, text, chunks, streaming, device, getattr(torch, DTYPES[dtype]), wd,
                   spill_threshold, dist)

    def describe(self, what: str) -> str:
        """`what: N x S tokens from D of T documents; streaming on DEVICE`."""
        n, seq_len = self.text.sequences.shape
        ranks = f" ({self.dist.world} ranks, {self.dist.backend})" if self.dist is not None else ""
        return (f"{what}: {n} x {seq_len} tokens from {self.text.documents_used} of {self.text.documents_total} "
                f"documents; {'streaming' if self.streaming else 'in-memory'} on {self.device}{ranks}")

    @contextmanager
    def progress(self, blocks: int, desc: str) -> Iterator[ProgressFn]:
        """A progress bar over the tokens the run pushes through its `blocks` decoder blocks (one pass of the
        whole model in memory) over this rank's tokens; yields the runner's progress callback (under torchrun
        rank 0 shows its bar)."""
        from tqdm import tqdm

        per_token = blocks if self.streaming else 1
        tokens = sum(c.numel() for c in self.chunks)
        bar = tqdm(total=tokens * per_token, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True,
                   disable=self.dist is not None and not self.dist.main)
        t0 = time.perf_counter()

        def update(block: int, n_tokens: int) -> None:
            bar.update(n_tokens)
            rate = bar.n / per_token / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"block {block + 1}/{blocks}, {rate:.0f} tok/s (whole model)")

        try:
            yield update
        finally:
            bar.close()

    def finish(self) -> None:
        """After the output is written: remove what the run left in its work directory (under torchrun: every
        rank its own, after rank 0 wrote the output; then rank 0 the given directory, when left empty)."""
        if self.dist is not None:
            self.dist.barrier()
        if self.streaming:
            WorkDir(self.work_dir).release()
        if self.dist is not None:
            self.dist.barrier()
            base = self.work_dir.parent
            if self.dist.main and base.is_dir() and not any(base.iterdir()):
                base.rmdir()
