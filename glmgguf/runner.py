"""Run a GLM-5.x checkpoint one decoder layer at a time, straight from its safetensors shards.

A 744B model does not fit in one GPU (or in RAM), but one decoder layer does (GLM-5.2: ~20 GB in BF16). The
streaming runner builds each `GlmMoeDsaDecoderLayer` from that layer's tensors only (per-expert tensors fused into
transformers' in-memory layout), pushes every calibration chunk through it, frees it and moves on; between layers
it carries, per chunk, exactly what `GlmMoeDsaModel.forward` carries: the hidden states and the DSA top-k indices
of the last "full" indexer layer (a "shared" layer reuses them). The rotary position embeddings and the causal
mask are rebuilt per chunk the way the model builds them. After the trunk, the final norm gives the post-norm
hidden states that feed the MTP (NextN) block, which runs last.

Hidden states between layers stay in memory while small and are written as safetensors files to a work directory
when larger than a threshold; then a manifest records every finished layer (with the visitor's per-layer state)
and a restart with the same inputs resumes after the last finished layer.

A `LayerVisitor` instruments the layers (REAP observation; a teacher cache for router distillation).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glmgguf.errors import GlmggufError
from glmgguf.io import CheckpointReader
from glmgguf.layout import GlmLayout, LayerInfo, LayerKind, mtp_embedding_name

MANIFEST = "manifest.json"
FP32_SUFFIXES = ("e_score_correction_bias",)  # transformers keeps these in float32 (_keep_in_fp32_modules_strict)


# ---------------------------------------------------------------------------------------------------------------
# Building layers from the shards
# ---------------------------------------------------------------------------------------------------------------

def model_config(cfg: dict, attn_implementation: str = "sdpa"):
    """The transformers `GlmMoeDsaConfig` of a config.json dict (attention implementation set explicitly)."""
    from transformers import GlmMoeDsaConfig

    config = GlmMoeDsaConfig.from_dict(copy.deepcopy(cfg))
    config._attn_implementation = attn_implementation
    return config


def layer_config(config, info: LayerInfo):
    """`config` with this layer's own routed-expert count (per-layer counts after a non-uniform prune)."""
    if info.kind is not LayerKind.MOE or info.n_experts == config.n_routed_experts:
        return config
    cfg = copy.deepcopy(config)
    cfg.n_routed_experts = info.n_experts
    return cfg


def _storage_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith(FP32_SUFFIXES) else dtype


def fused_expert_weights(reader: CheckpointReader, prefix: str, n_experts: int, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert tensors fused as transformers holds them: gate_up_proj [E, 2I, H] (gate rows, then up rows,
    the order `chunk(2)` reads them in the forward) and down_proj [E, H, I]. One expert tensor is read at a time."""
    g0 = reader.info(f"{prefix}mlp.experts.0.gate_proj.weight").shape
    d0 = reader.info(f"{prefix}mlp.experts.0.down_proj.weight").shape
    inter = g0[0]
    gate_up = torch.empty((n_experts, 2 * inter, g0[1]), dtype=dtype, device=device)
    down = torch.empty((n_experts, *d0), dtype=dtype, device=device)
    for e in range(n_experts):
        base = f"{prefix}mlp.experts.{e}."
        gate_up[e, :inter].copy_(reader.get(base + "gate_proj.weight"))
        gate_up[e, inter:].copy_(reader.get(base + "up_proj.weight"))
        down[e].copy_(reader.get(base + "down_proj.weight"))
    return gate_up, down


def load_decoder_layer(reader: CheckpointReader, layout: GlmLayout, config, index: int,
                       dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                       load_head: bool = True) -> nn.Module:
    """Build decoder block `index` (trunk layer, or the MTP block for index >= n_layers) from its tensors only.

    The module is created on the meta device and its parameters are assigned from the checkpoint, so memory holds
    this one layer. MTP blocks are built with the testbed's `build_mtp_layer` (GLM's on-disk parameter names);
    indexer tensors an MTP block lacks on disk are zero (its indexer selects every token anyway). A stored
    `shared_head.head` copy is loaded when `load_head`; without one the block's logits come from the trunk's
    `lm_head` (`head_logits(x, lm_head)`), as in the released checkpoints.
    """
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer

    from glmgguf.testbed.build import build_mtp_layer

    info = layout.layers[index]
    cfg = layer_config(config, info)
    prefix = f"model.layers.{index}."
    own_head = load_head and f"{prefix}shared_head.head.weight" in reader
    with torch.device("meta"):
        module = build_mtp_layer(cfg, own_head) if info.is_mtp else GlmMoeDsaDecoderLayer(cfg, index)
    state: dict[str, torch.Tensor] = {}
    if info.kind is LayerKind.MOE:
        state["mlp.experts.gate_up_proj"], state["mlp.experts.down_proj"] = fused_expert_weights(
            reader, prefix, info.n_experts, dtype, device)
    for key, meta in module.state_dict().items():
        if key in state:
            continue
        name = prefix + key
        if name in reader:
            t = reader.get(name)
        elif info.is_mtp and ".indexer." in key:
            t = torch.zeros(meta.shape)
        else:
            raise KeyError(f"checkpoint lacks {name}")
        state[key] = t.to(device=device, dtype=_storage_dtype(key, dtype))
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def load_trunk_model(reader: CheckpointReader, dtype: torch.dtype, device: str | dict | None = None) -> nn.Module:
    """The transformers `GlmMoeDsaForCausalLM` (trunk only) assembled from the reader's tensors, layer by layer.

    For checkpoints transformers cannot load itself (the block-FP8 release, read dequantized). One device only:
    spreading a model over several GPUs needs accelerate's loading (dequantize first: `reap prune --dequantize`).
    """
    from transformers import GlmMoeDsaForCausalLM
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

    if isinstance(device, dict) or device == "auto":
        raise RunnerError("a block-FP8 checkpoint loads onto one device in memory; use --streaming, or write a "
                          "BF16 copy first (`glmgguf reap prune ... --dequantize bf16`)")
    dev = torch.device(device or "cpu")
    layout = GlmLayout.from_config(reader.config)
    config = model_config(reader.config)
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(config)
    for i in range(layout.n_layers):
        model.model.layers[i] = load_decoder_layer(reader, layout, config, i, dtype, dev)
    for module, name in ((model.model.embed_tokens, "model.embed_tokens.weight"),
                         (model.model.norm, "model.norm.weight"), (model.lm_head, "lm_head.weight")):
        module.weight = nn.Parameter(reader.get(name).to(device=dev, dtype=dtype), requires_grad=False)
    model.model.rotary_emb = GlmMoeDsaRotaryEmbedding(config).to(dev)
    return model.eval()


def load_vector_module(reader: CheckpointReader, name: str, eps: float, dtype: torch.dtype, device) -> nn.Module:
    """An RMSNorm whose weight is the checkpoint tensor `name`."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRMSNorm

    w = reader.get(name)
    norm = GlmMoeDsaRMSNorm(w.shape[0], eps)
    norm.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    return norm


def positions_and_mask(config, hidden: torch.Tensor, rotary: nn.Module):
    """Rotary (cos, sin), position ids and the causal mask for a [B, S, H] chunk, as GlmMoeDsaModel builds them."""
    from transformers.masking_utils import create_causal_mask

    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                              position_ids=pos, allow_is_causal_skip=False)
    return rotary(hidden, position_ids=pos), pos, mask


def mtp_block_forward(mtp: nn.Module, hidden_post_norm: torch.Tensor, next_embeds: torch.Tensor, config,
                      rotary: nn.Module) -> torch.Tensor:
    """The MTP block's decoder output (before shared_head) for positions t with inputs h_t and emb(token t+1).

    The same computation as the testbed's `GlmMtpLayer.mtp_forward` without the LM head:
    x = eh_proj([enorm(e), hnorm(h)]), then the decoder block with dense attention and the MoE FFN.
    """
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer

    x = mtp.eh_proj(torch.cat([mtp.enorm(next_embeds), mtp.hnorm(hidden_post_norm)], dim=-1))
    pos_emb, pos, mask = positions_and_mask(config, x, rotary)
    out, _ = GlmMoeDsaDecoderLayer.forward(mtp, x, attention_mask=mask, position_embeddings=pos_emb,
                                           position_ids=pos)
    return out


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


@dataclass
class RunReport:
    layers_run: list[int]
    layers_skipped: list[int]
    spilled: bool
    activation_bytes: int


class RunnerError(GlmggufError, ValueError):
    """A run that cannot start (work directory, spill settings)."""


def clear_work_dir(wd: Path) -> None:
    """Remove a work directory of this runner; refuse to delete a non-empty directory it did not create."""
    if not wd.exists():
        return
    if any(wd.iterdir()) and not (wd / MANIFEST).is_file():
        raise RunnerError(f"work directory {wd} is not empty and holds no {MANIFEST}: refusing to clear it")
    shutil.rmtree(wd)


class RunInterrupted(RuntimeError):
    """Raised by `stop_after_layer` (simulates an interruption)."""


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


class StreamingRunner:
    """Push token chunks through a checkpoint one decoder layer at a time (see the module docstring)."""

    def __init__(self, model_dir: str | os.PathLike, options: RunOptions | None = None):
        self.reader = CheckpointReader(model_dir)
        self.layout = GlmLayout.from_config(self.reader.config)
        self.options = options or RunOptions()
        self.config = model_config(self.reader.config)
        if self.layout.n_mtp > 1 and self.options.mtp:
            raise NotImplementedError("more than one MTP block is not supported (GLM-5.x has one)")

    # -- manifest ---------------------------------------------------------------------------------------------
    def _manifest(self) -> dict | None:
        wd = self.options.work_dir
        if wd is None or not (wd / MANIFEST).is_file():
            return None
        try:
            return json.loads((wd / MANIFEST).read_text())
        except json.JSONDecodeError:
            return None

    def _write_manifest(self, m: dict) -> None:
        wd = self.options.work_dir
        assert wd is not None
        tmp = wd / (MANIFEST + ".partial")
        tmp.write_text(json.dumps(m, indent=1))
        os.replace(tmp, wd / MANIFEST)

    def activation_bytes(self, chunks: Sequence[torch.Tensor]) -> int:
        """Bytes carried between two layers: hidden states plus the last full layer's DSA top-k (int32)."""
        el = torch.empty((), dtype=self.options.dtype).element_size()
        tokens = sum(c.numel() for c in chunks)
        topk = max(min(self.layout.index_topk, c.shape[1]) for c in chunks) if chunks else 0
        return tokens * (self.layout.hidden_size * el + topk * 4)

    # -- the run ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, chunks: Sequence[torch.Tensor], visitor: LayerVisitor,
            progress: Callable[[int, int], None] | None = None) -> RunReport:
        """Run every chunk ([B, S] token ids) through the trunk and (optionally) the MTP block.

        `progress(block_index, n_tokens)` is called after each chunk passes a block.
        """
        from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

        opts, lay, reader = self.options, self.layout, self.reader
        dev = torch.device(opts.device)
        n = len(chunks)
        act_bytes = self.activation_bytes(chunks)
        spill = opts.work_dir is not None and act_bytes > opts.spill_bytes
        if act_bytes > opts.spill_bytes and opts.work_dir is None:
            raise RunnerError("activations exceed the spill threshold but no work directory was given")
        key = _run_key(reader, chunks, opts) if spill else None
        wd = opts.work_dir

        def store(tag: str) -> ActivationStore:
            return ActivationStore(wd / tag if spill else None)

        manifest = self._manifest() if spill else None
        if spill and (manifest is None or manifest.get("key") != key):
            clear_work_dir(wd)
            wd.mkdir(parents=True)
            manifest = {"key": key, "done": [], "acts": None, "topk": None}
            self._write_manifest(manifest)
        done: list[int] = list(manifest["done"]) if manifest else []
        rotary = GlmMoeDsaRotaryEmbedding(self.config).to(dev)

        # `cur`: hidden states after the last finished layer; `topk`: the DSA top-k of the last full layer
        cur: ActivationStore | None = None
        topk_store: ActivationStore | None = None
        if manifest and manifest.get("acts"):
            cur = store(manifest["acts"])
            topk_store = store(manifest["topk"]) if manifest.get("topk") else None
            if not cur.has(n) or (topk_store is not None and not topk_store.has(n)):
                cur, topk_store, done = None, None, []
        for idx in done:
            st = wd / f"state-{idx}.safetensors"
            visitor.restore_layer(lay.layers[idx], load_file(str(st)) if st.is_file() else {})
        skipped = list(done)
        run: list[int] = []

        def finish(info: LayerInfo, acts: ActivationStore | None, topk: ActivationStore | None) -> None:
            state = visitor.end_layer(info)
            run.append(info.index)
            if spill:
                if state:
                    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                              str(wd / f"state-{info.index}.safetensors"))
                done.append(info.index)
                manifest["done"] = done
                if acts is not None:
                    manifest["acts"] = acts.directory.name
                if topk is not None:
                    manifest["topk"] = topk.directory.name
                self._write_manifest(manifest)
            if opts.stop_after_layer is not None and info.index == opts.stop_after_layer:
                raise RunInterrupted(f"stopped after layer {info.index}")

        trunk = [layer for layer in lay.layers if not layer.is_mtp]
        if cur is None:
            emb = reader.get("model.embed_tokens.weight").to(device=dev, dtype=opts.dtype)
            cur = store("acts-embed")
            for i, c in enumerate(chunks):
                cur.put(i, {"hidden": nn.functional.embedding(c.to(dev), emb)})
            del emb
        for info in trunk:
            if info.index in done:
                continue
            layer = load_decoder_layer(reader, lay, self.config, info.index, opts.dtype, dev)
            visitor.begin_layer(info, layer)
            nxt = store(f"acts-{info.index}")
            full = info.indexer == "full"
            new_topk = store(f"topk-{info.index}") if full else None
            for i in range(n):
                h = cur.get(i, dev)["hidden"]
                prev_topk = None if full or topk_store is None else topk_store.get(i, dev)["topk"]
                pos_emb, pos, mask = positions_and_mask(self.config, h, rotary)
                h, topk = layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos,
                                prev_topk_indices=prev_topk, use_cache=False)
                nxt.put(i, {"hidden": h})
                if new_topk is not None:
                    new_topk.put(i, {"topk": topk})
                if progress:
                    progress(info.index, chunks[i].numel())
            del layer
            prev, cur = cur, nxt
            prev_topk_store = None
            if new_topk is not None:
                prev_topk_store, topk_store = topk_store, new_topk
            finish(info, nxt, new_topk)
            prev.drop()
            if prev_topk_store is not None:
                prev_topk_store.drop()
            release_memory()

        mtp_layers = [layer for layer in lay.layers if layer.is_mtp] if opts.mtp else []
        pending_mtp = [m for m in mtp_layers if m.index not in done]
        norm = load_vector_module(reader, "model.norm.weight", self.config.rms_norm_eps, opts.dtype, dev)
        mtp = None
        if pending_mtp:
            info = pending_mtp[0]
            mtp = load_decoder_layer(reader, lay, self.config, info.index, opts.dtype, dev, load_head=False)
            emb = reader.get(mtp_embedding_name(reader, info.index)).to(device=dev, dtype=opts.dtype)
            visitor.begin_layer(info, mtp)
        for i in range(n):
            hn = norm(cur.get(i, dev)["hidden"])
            c = chunks[i].to(dev)
            visitor.final_hidden(i, c, hn)
            if mtp is not None and c.shape[1] > 1:
                mtp_block_forward(mtp, hn[:, :-1], nn.functional.embedding(c[:, 1:], emb), self.config, rotary)
                if progress:
                    progress(info.index, c[:, 1:].numel())
        if mtp is not None:
            del mtp, emb
            finish(pending_mtp[0], None, None)
        return RunReport(run, skipped, spill, act_bytes)


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
