"""Run a GLM-5.x checkpoint one decoder layer at a time, straight from its safetensors shards.

A 744B model does not fit in one GPU (or in RAM), but one decoder layer does (GLM-5.2: ~20 GB in BF16). The
streaming runner builds each `GlmMoeDsaDecoderLayer` from that layer's tensors only (`glmgguf.modeling`), pushes
every calibration chunk through it, frees it and moves on; between layers it carries, per chunk, exactly what
`GlmMoeDsaModel.forward` carries: the hidden states and the DSA top-k indices of the last "full" indexer layer (a
"shared" layer reuses them). The rotary position embeddings and the causal mask are rebuilt per chunk the way the
model builds them. After the trunk, the final norm gives the post-norm hidden states that feed the MTP (NextN)
block, which runs last.

Hidden states between layers stay in memory while small and are written as safetensors files to a work directory
when larger than a threshold; then a manifest records every finished layer (with the visitor's per-layer state)
and a restart with the same inputs resumes after the last finished layer (`glmgguf.workdir`: a directory holding
anything but the run's own files is refused, never cleared).

A `LayerVisitor` instruments the layers (REAP observation; a teacher cache for router distillation).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glmgguf.io import CheckpointReader
from glmgguf.layout import GlmLayout, LayerInfo, LayerKind, mtp_embedding_name
from glmgguf.modeling import (
    load_decoder_layer,
    load_vector_module,
    model_config,
    mtp_block_forward,
    positions_and_mask,
)
from glmgguf.streamed_experts import EXPERT_STREAM_BYTES, moe_in_groups
from glmgguf.workdir import RunnerError, RunRecord, WorkDir

ProgressFn = Callable[[int, int], None]  # (block index, tokens) after each chunk passes a block


# ---------------------------------------------------------------------------------------------------------------
# Visitors
# ---------------------------------------------------------------------------------------------------------------

class LayerVisitor:
    """Hooks of a layer-by-layer run; every method is optional."""

    def begin_layer(self, info: LayerInfo, layer: nn.Module) -> None:
        """Called with the freshly loaded layer before any chunk passes through it (instrument it here)."""

    def end_layer(self, info: LayerInfo) -> dict[str, torch.Tensor] | None:
        """Called after the last chunk; the returned tensors are persisted for a resumed run."""
        return None

    def restore_layer(self, info: LayerInfo, state: dict[str, torch.Tensor]) -> None:
        """A resumed run skips a finished layer: here is what `end_layer` returned for it."""

    def final_hidden(self, chunk: int, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """The trunk's post-final-norm hidden states of one chunk (input of the LM head and of the MTP block)."""


# ---------------------------------------------------------------------------------------------------------------
# Activations between layers
# ---------------------------------------------------------------------------------------------------------------

class ActivationStore:
    """Per-chunk tensors at one layer boundary: a dict in memory, or one safetensors file per chunk."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self.mem: dict[int, dict[str, torch.Tensor]] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def put(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.directory is None:  # host memory: the accelerator holds only the layer and the chunk in flight
            self.mem[i] = {k: v.detach().to("cpu") for k, v in tensors.items()}
        else:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      str(self.directory / f"chunk-{i:06d}.safetensors"))

    def get(self, i: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        if self.directory is None:
            return {k: v.to(device) for k, v in self.mem[i].items()}
        return load_file(str(self.directory / f"chunk-{i:06d}.safetensors"), device=str(device))

    def has(self, n: int) -> bool:
        if self.directory is None:
            return len(self.mem) == n
        return all((self.directory / f"chunk-{i:06d}.safetensors").is_file() for i in range(n))

    def drop(self) -> None:
        self.mem.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The streaming run
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RunOptions:
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    work_dir: Path | None = None  # where activations spill and the manifest lives
    spill_bytes: int = 4 * 1024**3  # activations larger than this go to work_dir (and the run becomes resumable)
    mtp: bool = True  # also run the MTP block(s)
    stop_after_layer: int | None = None  # testing aid: stop (as if interrupted) after finishing this layer
    # routed experts read one at a time from the shards (None: when a layer's experts exceed expert_bytes)
    stream_experts: bool | None = None
    expert_bytes: int = EXPERT_STREAM_BYTES
    moe_group_bytes: int = 1024**3  # streamed experts are read once per group of chunks of this many input bytes


@dataclass
class RunReport:
    layers_run: list[int]
    layers_skipped: list[int]
    spilled: bool
    activation_bytes: int


def _run_key(reader: CheckpointReader, chunks: Sequence[torch.Tensor], options: RunOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(reader.config, sort_keys=True).encode())
    for name in sorted(reader.tensors):
        i = reader.tensors[name]
        h.update(f"{name}:{i.shard.name}:{i.offset}:{i.nbytes}:{i.shard.stat().st_mtime_ns}".encode())
    for c in chunks:
        h.update(c.to(torch.int64).numpy().tobytes())
    h.update(f"{options.dtype}:{options.mtp}".encode())
    return h.hexdigest()[:24]


@dataclass
class _Pass:
    """One `StreamingRunner.run` in progress: its chunks and visitor, the resume record of a spilled run, and the
    finished layers (`done`: all of them, resumed ones included; `ran`: those this run computed)."""

    chunks: Sequence[torch.Tensor]
    visitor: LayerVisitor
    progress: ProgressFn | None
    device: torch.device
    rotary: nn.Module
    record: RunRecord | None
    stop_after_layer: int | None
    done: list[int] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)

    def store(self, tag: str) -> ActivationStore:
        """An activation store: a directory of the work directory when spilling, else host memory."""
        return ActivationStore(self.record.work.path / tag if self.record is not None else None)

    def advance(self, block: int, n_tokens: int) -> None:
        if self.progress:
            self.progress(block, n_tokens)

    def finish(self, info: LayerInfo, acts: ActivationStore | None, topk: ActivationStore | None) -> None:
        """The visitor's end of a layer; a spilled run records it (and an interruption test may stop here)."""
        state = self.visitor.end_layer(info)
        self.ran.append(info.index)
        if self.record is not None:
            self.done.append(info.index)
            self.record.finish_layer(info.index, state, self.done, acts, topk)
        if self.stop_after_layer is not None and info.index == self.stop_after_layer:
            raise RunInterrupted(f"stopped after layer {info.index}")


class RunInterrupted(RuntimeError):
    """Raised by `stop_after_layer` (simulates an interruption)."""


class StreamingRunner:
    """Push token chunks through a checkpoint one decoder layer at a time (see the module docstring)."""

    def __init__(self, model_dir: str | os.PathLike, options: RunOptions | None = None):
        self.reader = CheckpointReader(model_dir)
        self.layout = GlmLayout.from_config(self.reader.config)
        self.options = options or RunOptions()
        self.config = model_config(self.reader.config)
        if self.layout.n_mtp > 1 and self.options.mtp:
            raise NotImplementedError("more than one MTP block is not supported (GLM-5.x has one)")

    def activation_bytes(self, chunks: Sequence[torch.Tensor]) -> int:
        """Bytes carried between two layers: hidden states plus the last full layer's DSA top-k (int32)."""
        el = torch.empty((), dtype=self.options.dtype).element_size()
        tokens = sum(c.numel() for c in chunks)
        topk = max(min(self.layout.index_topk, c.shape[1]) for c in chunks) if chunks else 0
        return tokens * (self.layout.hidden_size * el + topk * 4)

    @torch.no_grad()
    def run(self, chunks: Sequence[torch.Tensor], visitor: LayerVisitor,
            progress: ProgressFn | None = None) -> RunReport:
        """Run every chunk ([B, S] token ids) through the trunk and (optionally) the MTP block.

        `progress(block_index, n_tokens)` is called after each chunk passes a block.
        """
        act_bytes = self.activation_bytes(chunks)
        p = self._begin(chunks, visitor, progress, act_bytes)
        cur, topk = self._resume(p)
        skipped = list(p.done)
        if cur is None:
            cur = self._embed(p)
        for info in self.layout.layers:
            if not info.is_mtp and info.index not in p.done:
                cur, topk = self._trunk_layer(p, info, cur, topk)
        self._final(p, cur)
        return RunReport(p.ran, skipped, p.record is not None, act_bytes)

    def streams_experts(self, info: LayerInfo) -> bool:
        """Whether this block's routed experts are read one at a time (`RunOptions.stream_experts`)."""
        if info.kind is not LayerKind.MOE:
            return False
        if self.options.stream_experts is not None:
            return self.options.stream_experts
        el = torch.empty((), dtype=self.options.dtype).element_size()
        per_expert = 3 * self.layout.moe_intermediate_size * self.layout.hidden_size * el
        return info.n_experts * per_expert > self.options.expert_bytes

    def _through_block(self, p: _Pass, block: nn.Module, streamed: bool, run_chunk: Callable[[int], torch.Tensor],
                       indices: list[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(chunk index, block output) of each chunk; with streamed experts, the MoE runs per group of chunks."""
        indices = list(range(len(p.chunks))) if indices is None else indices
        if not streamed:
            for i in indices:
                yield i, run_chunk(i)
            return
        el = torch.empty((), dtype=self.options.dtype).element_size()
        max_tokens = max(1, self.options.moe_group_bytes // (self.layout.hidden_size * el))
        sizes = [p.chunks[i].numel() for i in indices]
        for j, h in moe_in_groups(block, sizes, lambda j: run_chunk(indices[j]), max_tokens):
            yield indices[j], h

    # -- the steps of a run -----------------------------------------------------------------------------------
    def _begin(self, chunks: Sequence[torch.Tensor], visitor: LayerVisitor, progress: ProgressFn | None,
               act_bytes: int) -> _Pass:
        """Decide where activations live; a spilled run opens (or starts) its resume record."""
        from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

        opts = self.options
        spill = act_bytes > opts.spill_bytes
        if spill and opts.work_dir is None:
            raise RunnerError("activations exceed the spill threshold but no work directory was given")
        record = RunRecord(WorkDir(opts.work_dir), _run_key(self.reader, chunks, opts)) if spill else None
        dev = torch.device(opts.device)
        rotary = GlmMoeDsaRotaryEmbedding(self.config).to(dev)
        return _Pass(chunks, visitor, progress, dev, rotary, record, opts.stop_after_layer,
                     record.done if record is not None else [])

    def _resume(self, p: _Pass) -> tuple[ActivationStore | None, ActivationStore | None]:
        """The stores a resumed run continues from (None: start at the embeddings); finished layers' visitor
        state is handed back."""
        cur = topk = None
        m = p.record.data if p.record is not None else {}
        if m.get("acts"):
            cur = p.store(m["acts"])
            topk = p.store(m["topk"]) if m.get("topk") else None
            if not cur.has(len(p.chunks)) or (topk is not None and not topk.has(len(p.chunks))):
                cur, topk, p.done = None, None, []
        for idx in p.done:
            p.visitor.restore_layer(self.layout.layers[idx], p.record.layer_state(idx))
        return cur, topk

    def _embedding_rows(self, p: _Pass, name: str, chunks: Sequence[torch.Tensor]) -> Callable[[torch.Tensor],
                                                                                              torch.Tensor]:
        """The embedding lookup of the tokens in `chunks`, with only their rows of table `name` read (GLM-5.2's
        table is 1.9 GB; a calibration set uses a small part of the vocabulary)."""
        ids = torch.unique(torch.cat([c.reshape(-1) for c in chunks])) if chunks else torch.empty(0, dtype=torch.long)
        rows = self.reader.take_rows(name, ids.tolist()).to(device=p.device, dtype=self.options.dtype)
        ids = ids.to(p.device)
        return lambda tokens: nn.functional.embedding(torch.searchsorted(ids, tokens.to(p.device)), rows)

    def _embed(self, p: _Pass) -> ActivationStore:
        """The token embeddings of every chunk: the input of layer 0."""
        embed = self._embedding_rows(p, "model.embed_tokens.weight", p.chunks)
        cur = p.store("acts-embed")
        for i, c in enumerate(p.chunks):
            cur.put(i, {"hidden": embed(c)})
        return cur

    def _trunk_layer(self, p: _Pass, info: LayerInfo, cur: ActivationStore, topk: ActivationStore | None
                     ) -> tuple[ActivationStore, ActivationStore | None]:
        """Load one trunk layer, push every chunk through it, record it, drop the stores it consumed."""
        streamed = self.streams_experts(info)
        layer = load_decoder_layer(self.reader, self.layout, self.config, info.index, self.options.dtype, p.device,
                                   experts_on_disk=streamed)
        p.visitor.begin_layer(info, layer)
        nxt = p.store(f"acts-{info.index}")
        new_topk = p.store(f"topk-{info.index}") if info.indexer == "full" else None

        def run_chunk(i: int) -> torch.Tensor:
            h = cur.get(i, p.device)["hidden"]
            prev_topk = None if new_topk is not None or topk is None else topk.get(i, p.device)["topk"]
            pos_emb, pos, mask = positions_and_mask(self.config, h, p.rotary)
            h, chunk_topk = layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos,
                                  prev_topk_indices=prev_topk, use_cache=False)
            if new_topk is not None:
                new_topk.put(i, {"topk": chunk_topk})
            p.advance(info.index, p.chunks[i].numel())
            return h

        for i, h in self._through_block(p, layer, streamed, run_chunk):
            nxt.put(i, {"hidden": h})
        layer = None  # freed before the next layer loads (run_chunk holds the name, not the module)
        p.finish(info, nxt, new_topk)  # the record names the new stores before the old ones go
        cur.drop()
        if new_topk is not None:
            if topk is not None:
                topk.drop()
            topk = new_topk
        release_memory()
        return nxt, topk

    def _final(self, p: _Pass, cur: ActivationStore) -> None:
        """The final norm of every chunk (`visitor.final_hidden`) and, unless finished, the MTP block."""
        opts = self.options
        pending = [x for x in self.layout.layers if x.is_mtp and x.index not in p.done] if opts.mtp else []
        norm = load_vector_module(self.reader, "model.norm.weight", self.config.rms_norm_eps, opts.dtype, p.device)
        for i, c in enumerate(p.chunks):
            p.visitor.final_hidden(i, c.to(p.device), norm(cur.get(i, p.device)["hidden"]))
        if not pending:
            return
        info = pending[0]
        streamed = self.streams_experts(info)
        module, embed = self._open_mtp(p, info, streamed)

        def run_chunk(i: int) -> torch.Tensor:
            ids = p.chunks[i].to(p.device)
            hn = norm(cur.get(i, p.device)["hidden"])
            out = mtp_block_forward(module, hn[:, :-1], embed(ids[:, 1:]), self.config, p.rotary)
            p.advance(info.index, ids[:, 1:].numel())
            return out

        with_next = [i for i, c in enumerate(p.chunks) if c.shape[1] > 1]
        for _ in self._through_block(p, module, streamed, run_chunk, with_next):
            pass
        module = embed = None  # freed (run_chunk holds the names, not the tensors)
        p.finish(info, None, None)

    def _open_mtp(self, p: _Pass, info: LayerInfo, streamed: bool
                  ) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """The MTP block (without its head) and the embedding lookup of its next-token input."""
        module = load_decoder_layer(self.reader, self.layout, self.config, info.index, self.options.dtype,
                                    p.device, load_head=False, experts_on_disk=streamed)
        embed = self._embedding_rows(p, mtp_embedding_name(self.reader, info.index), [c[:, 1:] for c in p.chunks])
        p.visitor.begin_layer(info, module)
        return module, embed


def release_memory() -> None:
    """Return a finished layer's memory: collect cycles, then ask glibc to give freed heap pages back."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # another libc
            pass


def chunk_sequences(seqs: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Group [N, S] token rows into [B, S] chunks of at most `batch_size` rows."""
    rows = seqs if isinstance(seqs, torch.Tensor) else torch.stack(list(seqs))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)] if len(rows) else []
