"""REAP observation: route calibration tokens as the model does and record, per expert, what REAP needs.

Each MoE block's forward is replaced, for the duration of the run, by one that computes the same output
(routed experts + shared expert) and records statistics on the way: the routing is `routing.route` (GLM's real
sigmoid / correction-bias / group / normalize / scale routing), and each expert runs on the tokens routed to it
only (k/E of the work of running every expert on every token), which is all REAP, EAN and frequency need.

Two modes give the same statistics:
- in-memory: the transformers model (placed with accelerate's `device_map`, e.g. "auto" over several GPUs),
  plus the MTP block built beside it;
- streaming: `glmgguf.runner.StreamingRunner`, one decoder layer resident at a time.
"""

from __future__ import annotations

import contextlib
import os
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from glmgguf.layout import GlmLayout, LayerInfo, LayerKind, mtp_embedding_name
from glmgguf.modeling import load_decoder_layer, model_config, mtp_block_forward
from glmgguf.reap.errors import ReapError
from glmgguf.reap.routing import RouterSpec, route
from glmgguf.reap.stats import FIELDS, ReapStats, empty_layer, model_fingerprint
from glmgguf.runner import LayerVisitor, ProgressFn, RunOptions, StreamingRunner

if TYPE_CHECKING:
    from glmgguf.io import CheckpointReader

class LayerAccumulator:
    """Running statistics of one MoE layer (on the layer's device until `result`)."""

    def __init__(self, n_experts: int, device: torch.device):
        self.t = empty_layer(n_experts, device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, experts: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, in_amax: torch.Tensor,
            mid_amax: torch.Tensor) -> None:
        """One routed (token, expert) pair per element: expert id, g_j, ||f_j||, max|x|, max|act*up|."""
        t = self.t
        w, n = weights.double(), norms.double()
        t["count"].index_add_(0, experts, torch.ones_like(experts))
        t["weight_sum"].index_add_(0, experts, w)
        t["reap_sum"].index_add_(0, experts, w * n)
        t["ean_sum"].index_add_(0, experts, n)
        t["max_norm"].scatter_reduce_(0, experts, norms.float(), "amax")
        t["input_amax"].scatter_reduce_(0, experts, in_amax.float(), "amax")
        t["down_input_amax"].scatter_reduce_(0, experts, mid_amax.float(), "amax")

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.t.items()}


def observed_moe_forward(moe: nn.Module, hidden_states: torch.Tensor, spec: RouterSpec,
                         acc: LayerAccumulator) -> torch.Tensor:
    """`GlmMoeDsaMoE.forward`, recording statistics into `acc`; routed experts run on their own tokens only."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    weights, idx = route(x, moe.gate.weight, moe.gate.e_score_correction_bias, spec)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    tokens = order // k
    slots = order % k
    counts = torch.bincount(flat, minlength=spec.n_experts).tolist()
    experts_mod = moe.experts
    act = experts_mod.act_fn
    out = torch.zeros_like(x)
    n_pairs = flat.numel()
    norms = torch.empty(n_pairs, dtype=torch.float32, device=x.device)
    in_amax = torch.empty_like(norms)
    mid_amax = torch.empty_like(norms)
    g_sorted = weights[tokens, slots]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        tok = tokens[sl]
        xe = x[tok]
        gate, up = F.linear(xe, experts_mod.gate_up_proj[e]).chunk(2, dim=-1)
        mid = act(gate) * up
        fe = F.linear(mid, experts_mod.down_proj[e])
        norms[sl] = fe.float().norm(dim=-1)
        in_amax[sl] = xe.abs().amax(dim=-1).float()
        mid_amax[sl] = mid.abs().amax(dim=-1).float()
        out.index_add_(0, tok, (fe * g_sorted[sl, None]).to(out.dtype))
        start += c
    acc.tokens += x.shape[0]
    acc.add(sorted_experts, g_sorted, norms, in_amax, mid_amax)
    return out.view(shape) + moe.shared_experts(hidden_states)


@contextlib.contextmanager
def instrument_moe(moe: nn.Module, spec: RouterSpec, acc: LayerAccumulator) -> Iterator[None]:
    """Swap `moe`'s forward for the observing one (the accelerate wrapper, if any, stays in front)."""
    for p in moe.parameters():
        if p.device.type == "meta":
            raise RuntimeError("observing needs the MoE weights resident (offloaded layers: use --streaming)")
    attr = "_old_forward" if hasattr(moe, "_hf_hook") else "forward"
    had = attr in moe.__dict__
    old = moe.__dict__.get(attr)
    setattr(moe, attr, types.MethodType(lambda self, h: observed_moe_forward(self, h, spec, acc), moe))
    try:
        yield
    finally:
        if had:
            setattr(moe, attr, old)
        else:
            delattr(moe, attr)


class ExpertObserver(LayerVisitor):
    """Collects `ReapStats` over the MoE layers of a run (a `LayerVisitor` for the streaming runner)."""

    def __init__(self, layout: GlmLayout):
        self.layout = layout
        self.cfg = layout.config
        self.stats = ReapStats(model_fingerprint(layout))
        self._open: dict[int, tuple[LayerAccumulator, contextlib.ExitStack]] = {}

    def spec(self, info: LayerInfo) -> RouterSpec:
        return RouterSpec.from_config(self.cfg, info.n_experts)

    def begin_layer(self, info: LayerInfo, layer: nn.Module) -> None:
        if info.kind is not LayerKind.MOE:
            return
        acc = LayerAccumulator(info.n_experts, layer.mlp.gate.weight.device)
        stack = contextlib.ExitStack()
        stack.enter_context(instrument_moe(layer.mlp, self.spec(info), acc))
        self._open[info.index] = (acc, stack)

    def end_layer(self, info: LayerInfo) -> dict[str, torch.Tensor] | None:
        if info.index not in self._open:
            return None
        acc, stack = self._open.pop(info.index)
        stack.close()
        self.stats.layers[info.index] = acc.result()
        self.stats.tokens[info.index] = acc.tokens
        return {**self.stats.layers[info.index], "tokens": torch.tensor([acc.tokens])}

    def restore_layer(self, info: LayerInfo, state: dict[str, torch.Tensor]) -> None:
        if info.kind is LayerKind.MOE and state:
            self.stats.tokens[info.index] = int(state["tokens"][0])
            self.stats.layers[info.index] = {k: state[k] for k in FIELDS}


# ---------------------------------------------------------------------------------------------------------------
# The two modes
# ---------------------------------------------------------------------------------------------------------------

def observe_streaming(model_dir: str | os.PathLike, chunks: Sequence[torch.Tensor], *,
                      dtype: torch.dtype = torch.bfloat16, device: str = "cpu", work_dir: Path | None = None,
                      spill_bytes: int = 4 * 1024**3, mtp: bool = True, progress: ProgressFn | None = None,
                      stop_after_layer: int | None = None, stream_experts: bool | None = None,
                      moe_group_bytes: int | None = None) -> ReapStats:
    """Observe with one decoder layer resident at a time (resumable when activations spill to `work_dir`); with
    `stream_experts` (default: for layers whose experts exceed 2 GiB) one routed expert at a time."""
    opts = RunOptions(dtype=dtype, device=device, work_dir=work_dir, spill_bytes=spill_bytes, mtp=mtp,
                      stop_after_layer=stop_after_layer, stream_experts=stream_experts)
    if moe_group_bytes is not None:
        opts.moe_group_bytes = moe_group_bytes
    runner = StreamingRunner(model_dir, opts)
    observer = ExpertObserver(runner.layout)
    report = runner.run(chunks, observer, progress)
    observer.stats.meta.update(mode="streaming", layers_resumed=report.layers_skipped, spilled=report.spilled)
    return observer.stats


def load_in_memory_model(model_dir: str | os.PathLike, dtype: torch.dtype, device_map: str | dict | None,
                         reader: CheckpointReader | None = None):
    """The transformers model (trunk) with its load report silenced (it lists the MTP block as unexpected);
    `reader` is the caller's reader of `model_dir`, when it has one.

    A block-FP8 checkpoint is assembled from the toolkit's reader (`glmgguf.modeling.load_trunk_model`): its
    dequantization is upstream's exact one (transformers' derives the block from the scale grid, which is wrong for
    weights whose rows are not a multiple of 128, and refuses GLM-5.2's 576-row `kv_a_proj_with_mqa`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from glmgguf.io import CheckpointReader
    from glmgguf.modeling import load_trunk_model

    reader = reader or CheckpointReader(model_dir)
    if reader.fp8 is not None:
        return load_trunk_model(reader, dtype, device_map)
    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        kw = {"device_map": device_map} if device_map not in (None, "cpu") else {}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa", **kw)
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


@torch.no_grad()
def observe_in_memory(model_dir: str | os.PathLike, chunks: Sequence[torch.Tensor], *,
                      dtype: torch.dtype = torch.bfloat16, device_map: str | dict | None = None, mtp: bool = True,
                      progress: ProgressFn | None = None) -> ReapStats:
    """Observe with the whole transformers model loaded (device_map "auto" spreads it over the GPUs)."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

    from glmgguf.io import CheckpointReader

    reader = CheckpointReader(model_dir)
    layout = GlmLayout.from_config(reader.config)
    if layout.uniform_experts is None:
        raise ReapError("transformers cannot build a model with per-layer expert counts: observe it with --streaming")
    model = load_in_memory_model(model_dir, dtype, device_map, reader)
    observer = ExpertObserver(layout)
    in_dev = model.model.embed_tokens.weight.device
    out_dev = model.model.norm.weight.device
    mtp_infos = [x for x in layout.layers if x.is_mtp] if mtp else []
    if len(mtp_infos) > 1:
        raise NotImplementedError("more than one MTP block is not supported (GLM-5.x has one)")
    for info in layout.layers:
        if not info.is_mtp:
            observer.begin_layer(info, model.model.layers[info.index])
    mtp_mod = emb = None
    config = model_config(reader.config)
    rotary = GlmMoeDsaRotaryEmbedding(config).to(out_dev)
    if mtp_infos:
        info = mtp_infos[0]
        mtp_mod = load_decoder_layer(reader, layout, config, info.index, dtype, out_dev, load_head=False)
        name = mtp_embedding_name(reader, info.index)
        emb = model.model.embed_tokens.weight if name == "model.embed_tokens.weight" else reader.get(name)
        emb = emb.to(device=out_dev, dtype=dtype)
        observer.begin_layer(info, mtp_mod)
    n_blocks = layout.n_layers
    for c in chunks:
        hn = model.model(input_ids=c.to(in_dev)).last_hidden_state.to(out_dev)
        if progress:
            progress(n_blocks - 1, c.numel())
        if mtp_mod is not None and c.shape[1] > 1:
            ids = c.to(out_dev)
            mtp_block_forward(mtp_mod, hn[:, :-1], F.embedding(ids[:, 1:], emb), config, rotary)
    for info in layout.layers:
        observer.end_layer(info)
    observer.stats.meta.update(mode="in-memory")
    return observer.stats


def observe(model_dir: str | os.PathLike, chunks: Sequence[torch.Tensor], *, streaming: bool,
            dtype: torch.dtype = torch.bfloat16, device: str = "cpu", device_map: str | dict | None = None,
            work_dir: Path | None = None, spill_bytes: int = 4 * 1024**3, mtp: bool = True,
            progress: ProgressFn | None = None, meta: dict | None = None) -> ReapStats:
    """Observe `chunks` ([B, S] token ids) in either mode; returns statistics with the run's settings as meta."""
    t0 = time.perf_counter()
    if streaming and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if streaming:
        stats = observe_streaming(model_dir, chunks, dtype=dtype, device=device, work_dir=work_dir,
                                  spill_bytes=spill_bytes, mtp=mtp, progress=progress)
    else:
        stats = observe_in_memory(model_dir, chunks, dtype=dtype, device_map=device_map or device, mtp=mtp,
                                  progress=progress)
    n_tok = sum(c.numel() for c in chunks)
    stats.meta.update({
        "model": str(Path(model_dir).resolve().name),
        "dtype": str(dtype).removeprefix("torch."),
        "sequences": sum(c.shape[0] for c in chunks),
        "seq_len": int(chunks[0].shape[1]) if chunks else 0,
        "tokens": n_tok,
        "seconds": round(time.perf_counter() - t0, 3),
        **(meta or {}),
    })
    return stats
