"""Disk and memory estimates of each stage, from the model's config alone (for `pipeline --dry-run`).

Sizes are exact where the format fixes them (checkpoint and GGUF tensor bytes, the teacher cache, NVFP4) and
approximate where they depend on runtime details (peak memory: the largest resident piece plus working space).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from glmgguf.checkpoint import GlmCheckpoint
from glmgguf.io.fp8 import Fp8Scheme, quant_method, scheme_from_config
from glmgguf.layout import GlmLayout, parse_hf_name, released_as_fp8
from glmgguf.pipeline.plan import Plan, ReapSection
from glmgguf.streamed_experts import EXPERT_STREAM_BYTES

DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


@dataclass
class Estimate:
    disk: int  # bytes the stage leaves on disk
    memory: int  # peak resident bytes (RAM, or RAM + GPU memory for in-memory GPU runs)
    note: str = ""


class _HeaderNames:
    """Stands in for a checkpoint reader: the tensor names a checkpoint of this config has."""

    def __init__(self, names: set[str]):
        self._names = names

    def names(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names


def pruned_layout(layout: GlmLayout, keep: int | None, ratio: float | None) -> GlmLayout:
    """The layout after uniform pruning to `keep` experts (or by `ratio`)."""
    cfg = copy.deepcopy(layout.config)
    n = int(cfg["n_routed_experts"])
    cfg["n_routed_experts"] = keep if keep is not None else n - int(round(n * (ratio or 0.0)))
    cfg.pop("num_routed_experts_per_layer", None)
    return GlmLayout.from_config(cfg)


def is_block_fp8(layout: GlmLayout) -> bool:
    """Whether the config declares the block-FP8 storage of the GLM-5.x FP8 release."""
    return quant_method(layout.config) == "fp8"


def _stored_bytes(name: str, shape: tuple[int, ...], dtype_bytes: int, scheme: Fp8Scheme | None) -> int:
    parsed = parse_hf_name(name)
    if scheme is not None and parsed is not None and released_as_fp8(parsed.rule):  # codes + a float32 per block
        return math.prod(shape) + math.prod(scheme.scale_shape(shape)) * 4
    return math.prod(shape) * dtype_bytes


def tensor_bytes(layout: GlmLayout, dtype_bytes: int = 2, fp8: bool = False) -> tuple[int, int, int]:
    """(all, routed experts, largest single tensor) bytes of the checkpoint at `dtype_bytes` per weight (with
    `fp8`: the block-FP8 release's weights at one byte plus their scales)."""
    scheme = scheme_from_config(layout.config) if fp8 else None  # the config's own weight_block_size
    total = experts = largest = 0
    for name, shape in layout.expected_hf_tensors(mtp_indexer=True).items():
        n = _stored_bytes(name, shape, dtype_bytes, scheme)
        total += n
        largest = max(largest, n)
        if ".mlp.experts." in name:
            experts += n
    return total, experts, largest


def layer_bytes(layout: GlmLayout, dtype_bytes: int = 2) -> int:
    """Bytes a streaming pass keeps resident for its largest decoder layer: the whole layer, or, where the
    layer's routed experts exceed `EXPERT_STREAM_BYTES` (read one at a time), the layer without them plus one."""
    rest: dict[str, int] = {}
    experts: dict[str, int] = {}
    one_expert: dict[str, int] = {}
    for name, shape in layout.expected_hf_tensors(mtp_indexer=True).items():
        if not name.startswith("model.layers."):
            continue
        key, n = name.split(".")[2], math.prod(shape) * dtype_bytes
        if ".mlp.experts." in name:
            experts[key] = experts.get(key, 0) + n
            if ".mlp.experts.0." in name:
                one_expert[key] = one_expert.get(key, 0) + n
        else:
            rest[key] = rest.get(key, 0) + n
    resident = [rest[k] + (one_expert.get(k, 0) if experts.get(k, 0) > EXPERT_STREAM_BYTES else experts.get(k, 0))
                for k in rest]
    return max(resident, default=0)


def experts_streamed(layout: GlmLayout, dtype_bytes: int = 2) -> bool:
    """Whether a streaming pass reads this model's routed experts one at a time (a layer's exceed the limit)."""
    per_expert = 3 * layout.moe_intermediate_size * layout.hidden_size * dtype_bytes
    return any(x.n_experts * per_expert > EXPERT_STREAM_BYTES for x in layout.moe_layers)


def gguf_bytes(layout: GlmLayout, recipe, mtp: str = "keep") -> int:
    """Tensor bytes of the GGUF that `recipe` makes of a checkpoint with this layout (`mtp` as `convert --mtp`)."""
    from glmgguf.gguf.plan import MtpMode, plan_tensors
    from glmgguf.gguf.qtypes import nbytes

    ckpt = GlmCheckpoint(_HeaderNames(set(layout.expected_hf_tensors(mtp_indexer=True))), layout, True)  # type: ignore[arg-type]
    choose = recipe.chooser(layout.layers)
    total = 0
    for t in plan_tensors(ckpt, MtpMode(mtp)):
        total += nbytes(choose(t), t.n_elements)
    return total


def estimate_stages(plan: Plan, layout: GlmLayout, recipes: dict) -> dict[str, Estimate]:
    """Per stage name: what it writes and its peak memory."""
    d = plan.data
    src, _, largest = tensor_bytes(layout)
    final = layout
    out: dict[str, Estimate] = {}
    hidden_act = d.batch_size * d.seq_len * layout.hidden_size * 4 * 8  # a chunk's activations, generously
    if plan.observes:
        r = plan.reap or ReapSection()
        width = DTYPE_BYTES[r.dtype]  # the compute dtype the weights are held in
        tokens = (d.calibration_samples or 0) * d.seq_len
        spill = tokens * layout.hidden_size * width if r.streaming else 0
        mem = (layer_bytes(layout, width) + hidden_act + min(spill, 4 * 10**9) if r.streaming
               else tensor_bytes(layout, width)[0] + hidden_act)
        streamed = ", its experts one at a time" if experts_streamed(layout, width) else ""
        out["observe"] = Estimate(spill, mem, f"streaming: one layer resident{streamed}" if r.streaming
                                  else "in memory: the whole model (across GPUs with device 'auto')")
    fp8 = is_block_fp8(layout)  # a block-FP8 source: pruned and distilled checkpoints stay block-FP8
    if plan.reap is not None:
        final = pruned_layout(layout, plan.reap.keep, plan.reap.ratio)
        pruned, _, _ = tensor_bytes(final, fp8=fp8)
        out["prune"] = Estimate(pruned, 2 * largest, "one tensor at a time" + (", block-FP8 kept" if fp8 else ""))
    if plan.kd is not None:
        k = plan.kd
        from glmgguf.kd.teacher import bytes_per_sequence

        per_seq = bytes_per_sequence(d.seq_len, min(k.top_k, layout.vocab_size))
        head = layout.vocab_size * layout.hidden_size * 2  # the LM head a streaming teacher keeps for every chunk
        out["teacher"] = Estimate(per_seq * (d.kd_samples or 0),
                                  (layer_bytes(layout) + head if k.teacher_streaming else src) + hidden_act,
                                  "x number of KD sequences" if not d.kd_samples else "")
        if d.heldout:
            out["teacher-heldout"] = Estimate(per_seq * (d.heldout_samples or 0), out["teacher"].memory)
        student = tensor_bytes(final, DTYPE_BYTES[k.dtype])[0]
        routers = sum(layer.n_experts * layout.hidden_size for layer in final.moe_layers) * 4
        if plan.launch is not None:
            from glmgguf.pipeline.fsdp_estimate import fsdp_kd_parts

            parts = fsdp_kd_parts(final, plan.launch.world, k.batch_size, d.seq_len, DTYPE_BYTES[k.dtype])
            memory = sum(v for name, v in parts.items() if not (k.cpu_offload and name == "shard"))
            note = f"per GPU: FSDP2 over {plan.launch.world} ranks (below)"
        else:
            memory = student + k.batch_size * hidden_act
            note = "the frozen student resident (across GPUs with device_map 'auto')"
        out["kd"] = Estimate(tensor_bytes(final, fp8=fp8)[0] + 3 * routers, memory, note)
    if plan.lora is not None:
        out.update(_lora_estimates(plan, final, fp8, out["kd"].memory))
    for g in plan.gguf:
        size = gguf_bytes(final, recipes[g.name])
        out[f"gguf-{g.name}"] = Estimate(size, 3 * tensor_bytes(final, 4)[2], "one tensor at a time")
    if plan.nvfp4 is not None:
        total, experts, largest_final = tensor_bytes(final)
        params = experts // 2  # BF16 -> 4-bit codes plus one e4m3 scale per 16 weights
        out["nvfp4"] = Estimate(total - experts + int(params * (0.5 + 1 / 16)), 4 * largest_final,
                                "one expert at a time")
    if plan.kld is not None:
        out.update(_kld_estimates(plan, final, out))
    if plan.eval is not None:
        size = out[f"gguf-{plan.eval.gguf}"].disk
        for p in plan.eval.presets:
            out[f"eval-{p}"] = Estimate(0, size, "llama-server maps the GGUF; plus its KV cache")
        out["eval-report"] = Estimate(0, 0)
        if plan.eval.baseline:
            out.update(_baseline_estimates(plan, layout, recipes[plan.eval.gguf]))
        if plan.eval.variants:
            out.update(_variant_estimates(plan, final, out, size))
    return out


def _lora_estimates(plan: Plan, final: GlmLayout, fp8: bool, kd_memory: int) -> dict[str, Estimate]:
    """LoRA-KD (float32 adapters with AdamW's two moments) and its merged checkpoint or adapter GGUF."""
    from glmgguf.kd.lora import adapter_parameters

    lo = plan.lora
    assert lo is not None
    adapter = 4 * adapter_parameters(final, tuple(lo.targets), lo.rank, lo.train_gates)
    world = plan.launch.world if plan.launch is not None else 1
    memory = kd_memory + 3 * adapter // world  # with the adapters' gradients and AdamW moments (sharded)
    note = ("per GPU: FSDP2 as Router-KD, plus the adapters" if world > 1
            else "the frozen student resident, as Router-KD")
    if lo.serve == "merged":
        return {"lora": Estimate(tensor_bytes(final, fp8=fp8)[0] + adapter, memory,
                                 note + "; the merged checkpoint written")}
    return {"lora": Estimate(adapter, memory, note), "lora-gguf": Estimate(adapter, 2 * adapter)}


def _variant_estimates(plan: Plan, final: GlmLayout, out: dict[str, Estimate], size: int) -> dict[str, Estimate]:
    """[eval] variants: the pruned (and Router-KD) checkpoints as GGUF, their runs, held-out KLs and the report."""
    e = plan.eval
    assert e is not None
    labels = ["pruned"] + (["router-kd"] if plan.lora is not None else [])
    convert = 3 * tensor_bytes(final, 4)[2]
    res: dict[str, Estimate] = {}
    for label in labels:
        if label == "pruned" or (plan.lora is not None and plan.lora.serve == "merged"):
            res[f"variant-{label}-gguf"] = Estimate(size, convert, "one tensor at a time")
        for p in e.presets:
            res[f"eval-{label}-{p}"] = Estimate(0, size, "llama-server maps the GGUF; plus its KV cache")
    if plan.data.heldout:
        last = "lora" if plan.lora is not None else "router-kd"
        for label in [*labels, last]:
            res[f"heldout-kl-{label}"] = Estimate(0, out["kd"].memory, "the checkpoint resident, as Router-KD")
    res["variants-report"] = Estimate(0, 0)
    return res


def kld_logits_bytes(ctx: int, chunks: int, vocab: int) -> int:
    """llama-perplexity's reference log-probabilities: a header with the tokens, then per scored token (the second
    half of each chunk but its last) the vocabulary's as uint16 plus four uint16 of scale and offset."""
    return 20 + 4 * chunks * ctx + chunks * (ctx - 1 - ctx // 2) * (2 * ((vocab + 1) // 2) + 4) * 2


def _kld_estimates(plan: Plan, final: GlmLayout, out: dict[str, Estimate]) -> dict[str, Estimate]:
    """The unquantized reference GGUF of the final checkpoint and the KLD runs against it."""
    from glmgguf.gguf.recipe import load_recipe

    k = plan.kld
    assert k is not None
    ref = gguf_bytes(final, load_recipe(k.reference), mtp="drop")
    logits = kld_logits_bytes(k.ctx, k.chunks or 1, final.vocab_size)
    note = "llama-perplexity maps the reference, then each output" + ("" if k.chunks else "; x number of chunks")
    largest = max(ref, *(out[f"gguf-{g.name}"].disk for g in plan.gguf if g.mtp != "only"))
    return {"kld-reference": Estimate(ref, 3 * tensor_bytes(final, 4)[2], "one tensor at a time"),
            "kld": Estimate(logits, largest, note)}


def _baseline_estimates(plan: Plan, layout: GlmLayout, recipe) -> dict[str, Estimate]:
    """The unpruned source model converted with the [eval] GGUF's recipe, and its evaluations."""
    e = plan.eval
    assert e is not None
    size = gguf_bytes(layout, recipe)
    out = {"baseline-gguf": Estimate(size, 3 * tensor_bytes(layout, 4)[2], "one tensor at a time")}
    for p in e.presets:
        out[f"eval-baseline-{p}"] = Estimate(0, size, "llama-server maps the GGUF; plus its KV cache")
    return out
