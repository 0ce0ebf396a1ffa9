"""One pass of packed text through a checkpoint: the flow `reap observe` and `kd teacher` share.

Both check their output and their work directory before any work, pack the text with the model's tokenizer,
run the model over it (in memory, or streaming one decoder layer at a time, resumable through the work
directory), show the progress, and once the output is written remove what the run left in its work directory.
A work directory holding anything but a run's own files is refused and never cleared (`glmgguf.workdir.WorkDir`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from glmgguf.choices import DTYPES
from glmgguf.runner import ProgressFn, chunk_sequences
from glmgguf.workdir import WorkDir

if TYPE_CHECKING:
    import torch

    from glmgguf.reap.data import Calibration


def default_work_dir(out: Path) -> Path:
    """Where a streaming pass writing `out` spills its activations unless told otherwise: OUT.work."""
    return out.with_name(out.name + ".work")


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
    work_dir: Path
    spill_bytes: int

    @classmethod
    def prepare(cls, model: Path, out: Path, *, force: bool, data: Sequence[Path], seq_len: int,
                max_tokens: int | None, num_samples: int | None, seed: int, text_field: str, batch_size: int,
                streaming: bool, device: str, dtype: str, work_dir: Path | None, spill_threshold: int) -> TextPass:
        """Check the output and the work directory, then pack the text (the command-line options' values)."""
        import torch

        from glmgguf.io.atomic import check_output
        from glmgguf.reap.data import load_calibration, load_tokenizer

        check_output(out, force, inputs=[model])
        wd = work_dir or default_work_dir(out)
        if streaming:
            WorkDir(wd).check()
        text = load_calibration(data, load_tokenizer(model), seq_len, max_tokens=max_tokens,
                                num_samples=num_samples, seed=seed, text_field=text_field)
        return cls(model, out, text, chunk_sequences(text.sequences, batch_size), streaming, device,
                   getattr(torch, DTYPES[dtype]), wd, spill_threshold)

    def describe(self, what: str) -> str:
        """`what: N x S tokens from D of T documents; streaming on DEVICE`."""
        n, seq_len = self.text.sequences.shape
        return (f"{what}: {n} x {seq_len} tokens from {self.text.documents_used} of {self.text.documents_total} "
                f"documents; {'streaming' if self.streaming else 'in-memory'} on {self.device}")

    @contextmanager
    def progress(self, blocks: int, desc: str) -> Iterator[ProgressFn]:
        """A progress bar over the tokens the run pushes through its `blocks` decoder blocks (one pass of the
        whole model in memory); yields the runner's progress callback."""
        from tqdm import tqdm

        per_token = blocks if self.streaming else 1
        bar = tqdm(total=self.text.n_tokens * per_token, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True)
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
        """After the output is written: remove what the run left in its work directory."""
        if self.streaming:
            WorkDir(self.work_dir).release()
