"""The teacher cache: the unpruned model's next-token distributions on the KD text, computed once, stored sparse.

Per position of every packed sequence the cache keeps the teacher's top-k log-probs (fp16, descending) with their
token ids (int32) and the log of the probability mass outside them (fp32, from the full distribution), plus the
sequence's input token ids: what `glmgguf.kd.loss.sparse_kl` needs, and all that training reads (the teacher is
never loaded again). Per position that is k * 6 + 8 bytes (k = 64: 392 bytes; GLM-5.2's full distribution would be
600 KB).

Layout of a cache directory:

    manifest.json                         format, teacher fingerprint, tokenizer hash, text hash, seq-len, top-k,
                                          shard list
    teacher-00001-of-0000N.safetensors    rows [start, start + count) of input_ids [n, S] int32,
                                          topk_ids [n, S, k] int32, topk_logprobs [n, S, k] f16,
                                          rest_logprob [n, S] f32; shard metadata carries the cache id

The teacher runs either in memory (transformers; `device_map="auto"` spreads it over the GPUs with accelerate) or
streaming, one decoder layer at a time with `glmgguf.runner.StreamingRunner` (resumable when activations spill);
both give the same cache. The manifest identifies what the cache belongs to, so that a student, a tokenizer or a
text it was not made for is refused: the tokenizer files' hash, the data files' hashes and the packed tokens'
hash, and a fingerprint of the teacher's tensors (sampled bytes of every tensor: expert tensors per expert, so a
pruned student's experts can be matched through its keep-map; router tensors are left out, as pruning slices
them and KD changes them).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmgguf.dist import Dist
from glmgguf.io import CheckpointReader, atomic_dir
from glmgguf.kd.errors import CacheError, StudentMismatchError
from glmgguf.kd.identity import (
    check_student_against,
    file_hashes,
    sha256_hex,
    teacher_fingerprint,
    token_hash,
    tokenizer_hash,
)
from glmgguf.kd.loss import topk_targets
from glmgguf.layout import GlmLayout
from glmgguf.runner import LayerVisitor, ProgressFn, RunOptions, StreamingRunner, chunk_sequences

CACHE_FORMAT = "glmgguf-kd-teacher-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
FIELDS = ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob")

# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def bytes_per_sequence(seq_len: int, top_k: int) -> int:
    return seq_len * (top_k * (4 + 2) + 4 + 4)


class _ShardWriter:
    """Collects per-chunk teacher targets and writes fixed-size shards (rows in input order)."""

    def __init__(self, out: Path, n_rows: int, rows_per_shard: int, cache_id: str):
        self.out = out
        self.per = max(1, rows_per_shard)
        self.n_shards = max(1, math.ceil(n_rows / self.per))
        self.cache_id = cache_id
        self.buf: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
        self.rows_buffered = 0
        self.start = 0
        self.shards: list[dict] = []
        self.rest_mass_sum = 0.0
        self.positions = 0

    def name(self, i: int) -> str:
        return f"teacher-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def add(self, ids: torch.Tensor, logits: torch.Tensor, top_k: int) -> None:
        """One chunk: token ids [B, S] and the teacher's logits [B, S, V]."""
        self.add_targets(ids, *topk_targets(logits, top_k))

    def add_targets(self, ids: torch.Tensor, vals: torch.Tensor, tids: torch.Tensor, rest: torch.Tensor) -> None:
        """One chunk's targets (`topk_targets`): ids [B, S], top-k log-probs and ids [B, S, k], rest [B, S]."""
        self.rest_mass_sum += float(rest.double().exp().sum())
        self.positions += rest.numel()
        for k, t in zip(FIELDS, (ids.to(torch.int32), tids, vals, rest), strict=True):
            self.buf[k].append(t.detach().to("cpu"))
        self.rows_buffered += ids.shape[0]
        while self.rows_buffered >= self.per:
            self._flush(self.per)

    def _flush(self, rows: int) -> None:
        cat = {k: torch.cat(v) for k, v in self.buf.items()}
        part = {k: v[:rows].contiguous() for k, v in cat.items()}
        self.buf = {k: [v[rows:]] for k, v in cat.items()}
        self.rows_buffered -= rows
        name = self.name(len(self.shards))
        save_file(part, str(self.out / name), metadata={"format": CACHE_FORMAT, "cache_id": self.cache_id,
                                                        "start": str(self.start)})
        self.shards.append({"file": name, "start": self.start, "count": rows})
        self.start += rows

    def close(self) -> list[dict]:
        if self.rows_buffered:
            self._flush(self.rows_buffered)
        if len(self.shards) != self.n_shards:
            raise RuntimeError(f"wrote {len(self.shards)} cache shards, planned {self.n_shards}")
        return self.shards


class _RankTargets:
    """A rank other than 0: keeps its chunks' targets (CPU) until rank 0 receives them."""

    def __init__(self) -> None:
        self.targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, ids: torch.Tensor, logits: torch.Tensor, top_k: int) -> None:
        self.targets.append(tuple(t.detach().cpu() for t in topk_targets(logits, top_k)))

    def send(self, dist: Dist) -> None:
        for chunk in self.targets:
            for t in chunk:
                dist.send(t, 0)


def _receive(dist: Dist, chunks: list[torch.Tensor], writer: _ShardWriter, top_k: int) -> None:
    """Rank 0: every other rank's chunk targets, in rank order (= row order), into the shard writer."""
    for src in range(1, dist.world):
        for i in dist.span(len(chunks), src):
            b, s = chunks[i].shape
            like = (torch.empty(b, s, top_k, dtype=torch.float16), torch.empty(b, s, top_k, dtype=torch.int32),
                    torch.empty(b, s, dtype=torch.float32))
            writer.add_targets(chunks[i], *(dist.recv(t, src) for t in like))


@dataclass
class CacheResult:
    path: Path
    manifest: dict
    seconds: float


def default_experts_implementation() -> str:
    """The experts kernel `from_pretrained` chooses on this machine (what the in-memory teacher runs)."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    cfg = GlmMoeDsaConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
                          first_k_dense_replace=0, n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=1,
                          num_key_value_heads=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16,
                          qk_rope_head_dim=16, v_head_dim=16, index_head_dim=64, index_n_heads=1, vocab_size=8)
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(cfg)
    return model.config._experts_implementation or "eager"


def _load_teacher(model_dir, dtype, device_map, reader: CheckpointReader):
    from glmgguf.reap.observe import load_in_memory_model

    return load_in_memory_model(model_dir, dtype, device_map, reader)


class _HeadVisitor(LayerVisitor):
    """Streaming: the LM head on each chunk's final hidden states, the logits into the cache writer; the head
    (GLM-5.2's is 1.9 GB) is freed after the last chunk, before the MTP block loads."""

    def __init__(self, reader: CheckpointReader, writer: _ShardWriter | _RankTargets, top_k: int, n_chunks: int):
        self.reader, self.writer, self.top_k, self.n_chunks = reader, writer, top_k, n_chunks
        self.head: torch.Tensor | None = None

    def final_hidden(self, chunk: int, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.head is None:
            self.head = self.reader.get("lm_head.weight").to(device=hidden.device, dtype=hidden.dtype)
        self.writer.add(ids, torch.nn.functional.linear(hidden, self.head), self.top_k)
        if chunk == self.n_chunks - 1:
            self.head = None


def _run_streaming(model_dir: Path, chunks: list[torch.Tensor], writer: _ShardWriter | _RankTargets, top_k: int,
                   options: RunOptions, progress: ProgressFn | None) -> dict:
    """The teacher one decoder layer at a time; returns the manifest's mode entries."""
    runner = StreamingRunner(model_dir, options)
    # the experts kernel transformers picks for the in-memory model: both modes give the same numbers
    runner.config._experts_implementation = default_experts_implementation()
    report = runner.run(chunks, _HeadVisitor(runner.reader, writer, top_k, len(chunks)), progress)
    return {"mode": "streaming", "device": options.device, "layers_resumed": report.layers_skipped}


@torch.no_grad()
def _run_in_memory(model_dir: Path, chunks: list[torch.Tensor], writer: _ShardWriter | _RankTargets, top_k: int,
                   dtype: torch.dtype, device_map: str | dict | None, reader: CheckpointReader,
                   progress: ProgressFn | None) -> dict:
    """The whole teacher loaded (accelerate's `device_map`); returns the manifest's mode entries."""
    model = _load_teacher(model_dir, dtype, device_map, reader)
    in_dev = model.model.embed_tokens.weight.device
    n_layers = model.config.num_hidden_layers
    for c in chunks:
        writer.add(c, model(input_ids=c.to(in_dev)).logits, top_k)
        if progress:
            progress(n_layers - 1, c.numel())
    return {"mode": "in-memory", "device_map": str(device_map)}


def build_teacher_cache(model_dir: str | os.PathLike, sequences: torch.Tensor, out: str | os.PathLike, *,
                        top_k: int = 64, streaming: bool = False, batch_size: int = 4,
                        dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                        device_map: str | dict | None = None, work_dir: Path | None = None,
                        spill_bytes: int = 4 * 1024**3, shard_bytes: int = 2 * 1024**3, text: dict | None = None,
                        force: bool = False, progress: ProgressFn | None = None,
                        dist: Dist | None = None) -> CacheResult | None:
    """Run the teacher over `sequences` [N, S] and write the cache directory `out` (atomically).

    `text` describes where the tokens came from (data file hashes, packing settings) for the manifest.
    Streaming: one decoder layer on `device` at a time (`work_dir`/`spill_bytes` as in `glmgguf.runner`);
    in memory: `device_map` (None = CPU, "auto" = accelerate over the GPUs). `progress(block, n_tokens)`.
    With `dist` (torchrun) every rank runs its contiguous share of the batches on its own `device` and rank 0
    writes the cache one process would write; the other ranks return None once it is written.
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if sequences.ndim != 2 or sequences.shape[0] == 0:
        raise CacheError("the KD text packs into no sequence")
    if top_k < 1:
        raise CacheError("--top-k must be at least 1")
    reader = CheckpointReader(model_dir)
    layout = GlmLayout.from_config(reader.config)
    top_k = min(top_k, layout.vocab_size)
    if int(sequences.max()) >= layout.vocab_size:
        raise CacheError(f"token id {int(sequences.max())} is outside the teacher's vocabulary ({layout.vocab_size})")
    chunks = chunk_sequences(sequences, batch_size)
    mine = chunks if dist is None else [chunks[i] for i in dist.share(len(chunks), "batches of KD text "
                                                                                     "(--batch-size)")]

    def run(sink: _ShardWriter | _RankTargets) -> dict:
        if streaming:
            return _run_streaming(model_dir, mine, sink, top_k, RunOptions(
                dtype=dtype, device=device, work_dir=work_dir, spill_bytes=spill_bytes, mtp=False), progress)
        return _run_in_memory(model_dir, mine, sink, top_k, dtype, device_map, reader, progress)

    if dist is not None and not dist.main:
        targets = _RankTargets()
        run(targets)
        targets.send(dist)
        dist.barrier()
        return None
    n, seq_len = sequences.shape
    tok_hash = token_hash(sequences)
    tok_file_hash = tokenizer_hash(model_dir)
    fingerprint = teacher_fingerprint(reader, layout)
    cache_id = sha256_hex(json.dumps([tok_hash, tok_file_hash, top_k, fingerprint["shared_digests"]],
                               sort_keys=True).encode())[:16]
    per_shard = max(1, shard_bytes // bytes_per_sequence(seq_len, top_k))
    with atomic_dir(out, force=force, inputs=[model_dir]) as tmp:
        writer = _ShardWriter(tmp, n, per_shard, cache_id)
        mode = run(writer)
        if dist is not None:
            _receive(dist, chunks, writer, top_k)
            mode["ranks"] = dist.world
        shards = writer.close()
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "cache_id": cache_id,
            "teacher": {"name": model_dir.resolve().name, **fingerprint},
            "tokenizer_hash": tok_file_hash,
            "text": {**(text or {}), "token_sha256": tok_hash, "sequences": n, "seq_len": seq_len},
            "seq_len": seq_len,
            "top_k": top_k,
            "positions": n * seq_len,
            "mean_rest_mass": writer.rest_mass_sum / max(writer.positions, 1),
            "dtype": {"topk_logprobs": "float16", "topk_ids": "int32", "rest_logprob": "float32",
                      "compute": str(dtype).removeprefix("torch.")},
            **mode,
            "shards": shards,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if dist is not None:
        dist.barrier()
    return CacheResult(Path(out), manifest, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------------------------------

class TeacherCache:
    """An opened, verified teacher cache: `batch(rows)` reads any rows, `len()` is the number of sequences."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise CacheError(f"{self.path} is not a teacher cache (no {MANIFEST})")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{mf}: invalid JSON ({e})") from None
        m = self.manifest
        if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
            raise CacheError(f"{self.path}: not a version-{CACHE_VERSION} {CACHE_FORMAT} "
                             f"(format {m.get('format')!r}, version {m.get('version')!r})")
        self.seq_len = int(m["seq_len"])
        self.top_k = int(m["top_k"])
        self.cache_id = m["cache_id"]
        self.vocab_size = int(m["teacher"]["vocab_size"])
        self._rows: list[tuple[Path, int, int]] = []  # (shard, start, count)
        expected_start = 0
        for s in m["shards"]:
            p = self.path / s["file"]
            if not p.is_file():
                raise CacheError(f"{self.path}: missing shard {s['file']}")
            if s["start"] != expected_start:
                raise CacheError(f"{self.path}: shard {s['file']} starts at row {s['start']}, expected "
                                 f"{expected_start}")
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("cache_id") != self.cache_id:
                    raise CacheError(f"{p.name} belongs to another teacher cache (cache id "
                                     f"{meta.get('cache_id')}, manifest {self.cache_id})")
                for k in FIELDS:
                    shape = f.get_slice(k).get_shape()
                    want = [s["count"], self.seq_len] + ([self.top_k] if k.startswith("topk") else [])
                    if list(shape) != want:
                        raise CacheError(f"{p.name}: {k} has shape {list(shape)}, the manifest implies {want}")
            self._rows.append((p, s["start"], s["count"]))
            expected_start += s["count"]
        self.n_sequences = expected_start
        if self.n_sequences != int(m["text"]["sequences"]):
            raise CacheError(f"{self.path}: shards hold {self.n_sequences} sequences, the manifest "
                             f"{m['text']['sequences']}")
        if token_hash(self.input_ids()) != m["text"]["token_sha256"]:
            raise CacheError(f"{self.path}: stored tokens do not match the manifest's text hash (mixed shards?)")

    def __len__(self) -> int:
        return self.n_sequences

    @property
    def teacher(self) -> dict:
        return self.manifest["teacher"]

    def input_ids(self) -> torch.Tensor:
        parts = []
        for p, _, _ in self._rows:
            with safe_open(str(p), framework="pt") as f:
                parts.append(f.get_tensor("input_ids"))
        return torch.cat(parts)

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows (sequence indices) as a dict of stacked tensors; `input_ids` as int64."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
        for r in rows:
            r = int(r)
            if not 0 <= r < self.n_sequences:
                raise IndexError(f"row {r} outside the cache's {self.n_sequences} sequences")
            for p, start, count in self._rows:
                if start <= r < start + count:
                    with safe_open(str(p), framework="pt") as f:
                        for k in FIELDS:
                            out[k].append(f.get_slice(k)[r - start:r - start + 1])
                    break
        res = {k: torch.cat(v) for k, v in out.items()}
        res["input_ids"] = res["input_ids"].long()
        return res

    # -- checks ------------------------------------------------------------------------------------------------
    def check_tokenizer(self, model_dir: str | os.PathLike) -> None:
        """The model must tokenize exactly as the teacher did (same tokenizer files) and share its vocabulary."""
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        vocab = int(cfg.get("vocab_size", -1))
        if vocab != self.vocab_size:
            raise StudentMismatchError(f"{model_dir}: vocab_size {vocab} differs from the teacher's "
                                       f"{self.vocab_size} (cache {self.path})")
        if tokenizer_hash(model_dir) != self.manifest["tokenizer_hash"]:
            raise CacheError(f"teacher cache {self.path} was made with another tokenizer than {model_dir}'s "
                             "(tokenizer files differ)")

    def check_text(self, data_paths: Sequence[str | os.PathLike]) -> None:
        """The cache must have been made from exactly these data files (content hashes, in order)."""
        made = [f["sha256"] for f in self.manifest["text"].get("files", [])]
        given = file_hashes(data_paths)
        if not made:
            raise CacheError(f"teacher cache {self.path} does not record its data files; cannot check --data")
        if made != [g["sha256"] for g in given]:
            names = [f["name"] for f in self.manifest["text"]["files"]]
            raise CacheError(f"teacher cache {self.path} was made from other text ({', '.join(names)}), not from "
                             f"{', '.join(g['name'] for g in given)} (content hashes differ)")

    def check_student(self, student_dir: str | os.PathLike) -> dict[int, list[int]]:
        """The student must be this teacher, or pruned from it by `glmgguf reap prune` (keep-map checked against
        the teacher's per-expert fingerprints). Returns the keep-map (MoE layer -> teacher expert ids)."""
        from glmgguf.checkpoint import open_checkpoint

        self.check_tokenizer(student_dir)
        ckpt = open_checkpoint(student_dir)
        return check_student_against(self.teacher, ckpt.reader, ckpt.layout, Path(student_dir))
