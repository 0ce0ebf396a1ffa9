"""GPTQ calibration as the algorithm needs it on a MoE: sequential, one decoder block at a time.

Every block's input comes from the blocks before it AS QUANTIZED. Per block, with the hidden states of every
calibration chunk in memory (one layer's activations):
  1. attention: one pass with the MLP left out (`CapturedMoe`) accumulates the Hessian of every quantized
     attention / indexer projection from its real input; GPTQ quantizes them; a second pass with the quantized
     attention gives the residual and the MLP's input.
  2. MLP, per expert: the dense MLP, the shared expert and each routed expert (weights read from the checkpoint
     one expert at a time) get gate/up's Hessian from their tokens only (a routed expert: the tokens the router
     sends to it), are quantized (gate and up stacked: one Hessian, one factorization), and down's Hessian comes
     from the activations of the QUANTIZED gate/up. An expert with fewer than `min_tokens` tokens is rounded to
     nearest (its Hessian would describe a handful of tokens); so is a weight whose Hessian Cholesky rejects.
     The quantized expert's output (router-weighted) is summed into the block's output, so the next block sees
     the quantized model.
The MTP block runs last on the quantized trunk's final hidden states (its `eh_proj` stays BF16).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from glmgguf.gptq import quant as gq
from glmgguf.io import CheckpointReader
from glmgguf.layout import GlmLayout, LayerInfo, LayerKind, mtp_embedding_name
from glmgguf.modeling import load_decoder_layer, load_vector_module, model_config, positions_and_mask
from glmgguf.runner import release_memory
from glmgguf.streamed_experts import CapturedMoe

log = logging.getLogger(__name__)

PROJS = ("gate_proj", "up_proj", "down_proj")
QUANT_DTYPE = torch.bfloat16  # the weights are quantized from (and their scales stored in) BF16


@dataclass(frozen=True)
class GptqSettings:
    damp: float = gq.DAMPENING_FRAC
    block_size: int = gq.BLOCK_SIZE
    actorder: bool = True
    min_tokens: int = 64  # a routed expert with fewer calibration tokens is rounded to nearest
    rtn: bool = False  # round every weight to nearest (the baseline; same format and scales)


@dataclass
class GptqReport:
    """What the run did per quantized module (counts in `summary`)."""

    gptq: list[str] = field(default_factory=list)
    rtn: list[str] = field(default_factory=list)  # rounded to nearest on purpose (`GptqSettings.rtn`)
    rtn_few_tokens: list[str] = field(default_factory=list)  # routed experts below min_tokens (modules)
    rtn_no_input: list[str] = field(default_factory=list)  # modules calibration never ran (e.g. unused indexer)
    rtn_cholesky: list[str] = field(default_factory=list)  # Hessian not positive definite even dampened
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens routed to each expert
    loss: float = 0.0  # sum of GPTQ's proxy losses

    def summary(self) -> dict:
        return {"gptq": len(self.gptq), "rtn": len(self.rtn), "rtn_few_tokens": len(self.rtn_few_tokens),
                "rtn_no_input": len(self.rtn_no_input), "rtn_cholesky": len(self.rtn_cholesky)}


Sink = Callable[[str, gq.Int4Weight], None]  # (module name, quantized weight)


class BlockQuantizer:
    """Quantizes the targets of one run (see the module docstring); `sink` receives each quantized weight."""

    def __init__(self, reader: CheckpointReader, targets: set[str], settings: GptqSettings, sink: Sink,
                 device: torch.device, dtype: torch.dtype):
        self.reader, self.targets, self.settings, self.sink = reader, targets, settings, sink
        self.device, self.dtype = device, dtype
        self.report = GptqReport()

    # -- weights sharing one input -----------------------------------------------------------------------------
    def quantize(self, modules: list[str], weights: list[torch.Tensor], hess: gq.Hessian | None,
                 few: bool = False) -> list[torch.Tensor]:
        """Quantize weights that read the same input (one Hessian) as one stacked weight, their rows being
        independent given H (gate and up: one factorization); hand each to the sink; returns them dequantized."""
        w = torch.cat([x.to(device=self.device, dtype=QUANT_DTYPE) for x in weights])
        s, r = self.settings, self.report
        if s.rtn:
            q, kind = gq.round_to_nearest(w), r.rtn
        elif hess is None or hess.rows == 0 or few:
            q, kind = gq.round_to_nearest(w), (r.rtn_few_tokens if few else r.rtn_no_input)
        else:
            q, failed, loss = gq.gptq_one(w, hess.value(), block_size=s.block_size, damp=s.damp, actorder=s.actorder)
            kind = r.rtn_cholesky if failed else r.gptq
            r.loss += loss
        out, start = [], 0
        for module, x in zip(modules, weights, strict=True):
            part = gq.Int4Weight(q.codes[start:start + x.shape[0]], q.scale[start:start + x.shape[0]])
            start += x.shape[0]
            kind.append(module)
            self.sink(module, part)
            out.append(part.dequantize(self.dtype))
        return out

    def hessian(self, x: torch.Tensor, few: bool) -> gq.Hessian | None:
        """The Hessian of inputs x [T, K], unless nothing will use it (rounding to nearest)."""
        if few or self.settings.rtn:
            return None
        hess = gq.Hessian(x.shape[-1], self.device)
        hess.add(x)
        return hess

    # -- attention -------------------------------------------------------------------------------------------------
    def attention(self, prefix: str, block: nn.Module, run: Callable[[], None]) -> None:
        """Calibrate (one `run()` of every chunk) and quantize the targeted linears under `block.self_attn`;
        linears that read the same tensor (q_a and kv_a; q_b and the indexer's wq_b) share one Hessian and
        are quantized stacked."""
        linears = {f"{prefix}self_attn.{n}": m for n, m in block.self_attn.named_modules()
                   if isinstance(m, nn.Linear) and f"{prefix}self_attn.{n}" in self.targets}
        shared = _SharedInputs(self.device)
        hooks = [block.self_attn.register_forward_pre_hook(lambda *_: shared.new_call())]
        hooks += [m.register_forward_hook(lambda _m, args, _out, name=name: shared.add(name, args[0]))
                  for name, m in linears.items()]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        groups = shared.groups() + [([n], None) for n in sorted(linears) if n not in shared.hessian]
        for names, hess in groups:
            deq = self.quantize(names, [linears[n].weight.data for n in names], hess)
            for n, w in zip(names, deq, strict=True):
                linears[n].weight.data = w

    # -- MLPs ------------------------------------------------------------------------------------------------------
    def mlp(self, prefix: str, weights: dict[str, torch.Tensor], act: Callable, x: torch.Tensor,
            few: bool = False) -> torch.Tensor:
        """A gate/up/down MLP `prefix` on its tokens x [T, H]: quantized when targeted; returns its output."""
        dev = {p: w.to(device=self.device, dtype=self.dtype) for p, w in weights.items()}
        pair = [p for p in ("gate_proj", "up_proj") if f"{prefix}{p}" in self.targets]
        if pair:
            hess = self.hessian(x, few)
            for p, w in zip(pair, self.quantize([prefix + p for p in pair], [weights[p] for p in pair], hess, few),
                            strict=True):
                dev[p] = w
        a = act(F.linear(x, dev["gate_proj"])) * F.linear(x, dev["up_proj"])
        if f"{prefix}down_proj" in self.targets:
            hess = self.hessian(a, few)
            dev["down_proj"] = self.quantize([f"{prefix}down_proj"], [weights["down_proj"]], hess, few)[0]
        return F.linear(a, dev["down_proj"])

    def moe(self, prefix: str, info: LayerInfo, moe: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Shared expert, then every routed expert on its own tokens (weights read one expert at a time, the next
        one on a background thread)."""
        shared = moe.shared_experts
        out = self.mlp(f"{prefix}mlp.shared_experts.", {p: getattr(shared, p).weight.data for p in PROJS},
                       shared.act_fn, x)
        _, topk_weights, topk_idx = moe.gate(x)
        k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=info.n_experts).tolist()
        self.report.expert_tokens[info.index] = counts

        def load(e: int) -> dict[str, torch.Tensor]:
            return {p: self.reader.get(f"{prefix}mlp.experts.{e}.{p}.weight") for p in PROJS}

        start = 0
        with ThreadPoolExecutor(1, thread_name_prefix="gptq-read") as pool:  # the next expert reads meanwhile
            ahead = pool.submit(load, 0)
            for e, c in enumerate(counts):
                weights = ahead.result()
                if e + 1 < len(counts):
                    ahead = pool.submit(load, e + 1)
                pairs = order[start:start + c]
                start += c
                tokens, slots = pairs // k, pairs % k
                y = self.mlp(f"{prefix}mlp.experts.{e}.", weights, moe.experts.act_fn, x[tokens],
                             few=c < self.settings.min_tokens)
                out.index_add_(0, tokens, (y * topk_weights[tokens, slots, None]).to(out.dtype))
        return out

    # -- a decoder block -------------------------------------------------------------------------------------------
    def block(self, info: LayerInfo, block: nn.Module, inputs: Sequence[torch.Tensor],
              call: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Quantize one block whose chunk i runs as `call(i, hidden)` -> (output, DSA top-k); returns the
        quantized block's outputs and top-k per chunk (CPU)."""
        prefix = f"model.layers.{info.index}."
        mlp = block.mlp
        capture = CapturedMoe()
        block.mlp = capture
        try:
            def attention_pass() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
                for i, h in enumerate(inputs):
                    yield call(i, h.to(self.device))

            self.attention(prefix, block, lambda: [None for _ in attention_pass()])
            capture.inputs.clear()
            residual, topk = zip(*[(h.cpu(), t) for h, t in attention_pass()], strict=True) if inputs else ((), ())
            x = torch.cat([c.reshape(-1, c.shape[-1]) for c in capture.inputs])
            capture.inputs.clear()
        finally:
            block.mlp = mlp
        if info.kind is LayerKind.MOE:
            y = self.moe(prefix, info, mlp, x)
        else:
            y = self.mlp(f"{prefix}mlp.", {p: getattr(mlp, p).weight.data for p in PROJS}, mlp.act_fn, x)
        outs, start = [], 0
        for r in residual:
            n = r.numel() // r.shape[-1]
            outs.append(r + y[start:start + n].cpu().view_as(r))
            start += n
        return outs, [t.cpu() if t is not None else None for t in topk]


class _SharedInputs:
    """Hessians of modules keyed by the tensor they read: modules fed the same tensor in a call share one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.hessian: dict[str, gq.Hessian] = {}  # module -> its group's Hessian (fixed by the first call)
        self.seen: dict[tuple, gq.Hessian] = {}  # this call: input identity -> Hessian
        self.added: set[int] = set()  # this call: Hessians the input was added to

    def new_call(self) -> None:
        self.seen.clear()
        self.added.clear()

    def add(self, module: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x._version)
        h = self.hessian.get(module)
        if h is None:
            h = self.hessian[module] = self.seen.get(key) or gq.Hessian(x.shape[-1], self.device)
        self.seen[key] = h
        if id(h) not in self.added:
            h.add(x)
            self.added.add(id(h))

    def groups(self) -> list[tuple[list[str], gq.Hessian]]:
        """(modules, their Hessian) per group, modules and groups in name order."""
        by_id: dict[int, list[str]] = {}
        for m in sorted(self.hessian):
            by_id.setdefault(id(self.hessian[m]), []).append(m)
        return [(names, self.hessian[names[0]]) for names in by_id.values()]


def _embedding(reader: CheckpointReader, name: str, chunks: Sequence[torch.Tensor], device: torch.device,
               dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The lookup of table `name` reading only the rows of the tokens in `chunks`."""
    ids = torch.unique(torch.cat([c.reshape(-1) for c in chunks]))
    rows = reader.take_rows(name, ids.tolist()).to(device=device, dtype=dtype)
    ids = ids.to(device)
    return lambda tokens: F.embedding(torch.searchsorted(ids, tokens.to(device).contiguous()), rows)


def run_sequential(reader: CheckpointReader, chunks: Sequence[torch.Tensor], targets: set[str],
                   settings: GptqSettings, sink: Sink, device: torch.device, dtype: torch.dtype) -> GptqReport:
    """Quantize every targeted module of the checkpoint block by block over token chunks [B, S]."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

    layout = GlmLayout.from_config(reader.config)
    config = model_config(reader.config)
    rotary = GlmMoeDsaRotaryEmbedding(config).to(device)
    q = BlockQuantizer(reader, targets, settings, sink, device, dtype)
    embed = _embedding(reader, "model.embed_tokens.weight", chunks, device, dtype)
    hidden = [embed(c).cpu() for c in chunks]
    topk: list[torch.Tensor | None] = [None] * len(chunks)
    blocks = layout.layers
    for info in blocks:
        layer = load_decoder_layer(reader, layout, config, info.index, dtype, device, load_head=False,
                                   experts_on_disk=True)
        if info.is_mtp:
            _mtp_block(q, reader, config, rotary, info, layer, chunks, hidden)
        else:
            shared = info.indexer != "full"
            carried = topk

            def call(i: int, h: torch.Tensor, layer=layer, shared=shared, carried=carried):
                pos_emb, pos, mask = positions_and_mask(config, h, rotary)
                prev = carried[i].to(device) if shared and carried[i] is not None else None
                return layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos,
                             prev_topk_indices=prev, use_cache=False)

            hidden, new_topk = q.block(info, layer, hidden, call)
            topk = new_topk if not shared else topk
        del layer
        release_memory()
    _warn(q.report)
    return q.report


def _warn(r: GptqReport) -> None:
    for what, mods in (("the dampened Hessian is not positive definite (raise the dampening)", r.rtn_cholesky),
                       ("calibration never reached them", r.rtn_no_input)):
        if mods:
            log.warning("%d module(s) rounded to nearest because %s: %s%s", len(mods), what, ", ".join(mods[:5]),
                        ", ..." if len(mods) > 5 else "")


def _mtp_block(q: BlockQuantizer, reader: CheckpointReader, config, rotary: nn.Module, info: LayerInfo,
               module: nn.Module, chunks: Sequence[torch.Tensor], trunk: list[torch.Tensor]) -> None:
    """The MTP block on the quantized trunk's final hidden states: x = eh_proj([enorm(e_t+1), hnorm(h_t)])."""
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaDecoderLayer

    dev, dtype = q.device, q.dtype
    norm = load_vector_module(reader, "model.norm.weight", config.rms_norm_eps, dtype, dev)
    embed = _embedding(reader, mtp_embedding_name(reader, info.index), [c[:, 1:] for c in chunks], dev, dtype)
    with_next = [i for i, c in enumerate(chunks) if c.shape[1] > 1]
    inputs = []
    for i in with_next:
        hn = norm(trunk[i].to(dev))[:, :-1]
        e = embed(chunks[i][:, 1:])
        inputs.append(module.eh_proj(torch.cat([module.enorm(e), module.hnorm(hn)], dim=-1)).cpu())

    def call(_i: int, x: torch.Tensor):
        pos_emb, pos, mask = positions_and_mask(config, x, rotary)
        return GlmMoeDsaDecoderLayer.forward(module, x, attention_mask=mask, position_embeddings=pos_emb,
                                             position_ids=pos)

    q.block(info, module, inputs, call)
