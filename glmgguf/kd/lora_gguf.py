"""A PEFT LoRA adapter directory (`glmgguf kd lora --out`) as a llama.cpp LoRA adapter GGUF (`--lora`).

llama.cpp's adapter format: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted
base tensor `<gguf name>.lora_a` (ggml ne [in, rank]: PEFT's lora_A [rank, in] as is) and `.lora_b` (ne [rank, out]:
PEFT's lora_B [out, rank]); the runtime adds `scale * alpha / rank * B (A x)`, PEFT's `lora_alpha / r` scaling.

Only tensors that the pinned llama.cpp's glm-dsa graph multiplies through its LoRA-aware matmul are accepted: the
attention output, the dense MLPs, the shared experts and the MoE routers. The MLA projections q_a/q_b/kv_a (plain
matmuls there: an adapter would load and be silently ignored) and kv_b (stored split per head into attn_k_b /
attn_v_b) are refused, as are DoRA, per-module rank/alpha patterns and full modules other than the router gates;
those go through `kd lora --merge` and `glmgguf convert`. Co-trained router gates (PEFT `modules_to_save`, full
[E, H] weights) are written exactly as a rank-E pair: lora_a = trained - base weight, lora_b = (E / alpha) * I, so
that llama.cpp's alpha / E scaling gives back the difference; their correction bias must be unchanged. The
HF-to-GGUF names are the converter's (`glmgguf.layout.parse_hf_name`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from glmgguf.io import CheckpointReader
from glmgguf.io.atomic import check_output
from glmgguf.kd.errors import KdError
from glmgguf.layout import GGUF_ARCH, Transform, parse_hf_name

# base tensors that the pinned llama.cpp's glm-dsa graph multiplies with build_lora_mm (LoRA applied)
LORA_APPLIED = ("attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_shexp", "ffn_up_shexp",
                "ffn_down_shexp", "ffn_gate_inp")
GATE = re.compile(r"^(model\.layers\.\d+\.mlp\.gate)\.(weight|e_score_correction_bias)$")
PEFT_PREFIX = "base_model.model."
MERGE_HINT = "train without it or use `kd lora --merge` and `glmgguf convert` on the merged checkpoint"


@dataclass
class LoraGgufReport:
    out: Path
    n_modules: int
    rank: int
    alpha: float


def _config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise KdError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise KdError(f"{adapter_dir}: adapter type {cfg.get('peft_type')}, not LORA")
    full = [m for m in cfg.get("modules_to_save") or [] if not re.fullmatch(r"model\.layers\.\d+\.mlp\.gate", m)]
    if full:
        raise KdError(f"{adapter_dir} saves full modules other than the router gates ({', '.join(full[:2])}), "
                      f"which a LoRA adapter GGUF cannot carry; {MERGE_HINT}")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise KdError(f"{adapter_dir}: {key} is not supported by llama.cpp's LoRA adapters; {MERGE_HINT}")
    if cfg.get("bias", "none") != "none":
        raise KdError(f"{adapter_dir}: trained biases (bias={cfg['bias']}) are not supported; {MERGE_HINT}")
    return cfg


def _gguf_name(module: str) -> str:
    """The base GGUF tensor an adapted HF linear lives in; a clear error where llama.cpp applies no LoRA to it."""
    parsed = parse_hf_name(f"{module}.weight")
    if parsed is None or parsed.layer is None or parsed.expert is not None:
        raise KdError(f"{module}: not a GLM-5.x linear a LoRA adapter GGUF can address")
    name = parsed.rule.gguf.replace("{L}", str(parsed.layer))
    kind = name.split(".")[2]
    if parsed.rule.transform is not Transform.COPY:
        raise KdError(f"{module}: the base GGUF stores it split per head ({name}, ...) and the pinned llama.cpp "
                      f"applies no LoRA there; {MERGE_HINT}")
    if kind not in LORA_APPLIED:
        raise KdError(f"{module} ({name}): the pinned llama.cpp's glm-dsa graph applies no LoRA to it; "
                      f"adapt only o_proj, shared experts or dense MLPs (--target shared,dense), or {MERGE_HINT}")
    return name


def _gate_pair(module: str, saved: dict[str, torch.Tensor], reader: CheckpointReader,
               alpha: float) -> dict[str, np.ndarray]:
    """A co-trained router gate as an exact rank-E pair: A = trained - base weight, B = (E / alpha) * I."""
    name = _gguf_name(module)
    weight = f"{module}.weight"
    if "weight" not in saved or weight not in reader:
        raise KdError(f"{module}: the adapter or the base checkpoint lacks {weight} (another base?)")
    base_w = reader.get(weight).float()
    if tuple(saved["weight"].shape) != tuple(base_w.shape):
        raise KdError(f"{module}: trained gate {tuple(saved['weight'].shape)} does not fit the base's "
                      f"{tuple(base_w.shape)} (another base?)")
    bias = f"{module}.e_score_correction_bias"
    if bias in saved and not torch.equal(saved[bias].float(), reader.get(bias).float()):
        raise KdError(f"{module}: its correction bias changed, which a LoRA adapter GGUF cannot carry; "
                      f"{MERGE_HINT}")
    n = base_w.shape[0]
    a = saved["weight"].float() - base_w
    b = torch.eye(n) * (n / alpha)
    return {f"{name}.lora_a": a.contiguous().numpy(), f"{name}.lora_b": b.numpy()}


def adapter_tensors(adapter_dir: str | os.PathLike, base: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """GGUF adapter tensors (`<base name>.lora_a` / `.lora_b`, float32) and the adapter config, checked against
    the base checkpoint's shapes."""
    adapter_dir = Path(adapter_dir)
    cfg = _config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise KdError(f"{adapter_dir} has no adapter_model.safetensors")
    state = load_file(weights)
    reader = CheckpointReader(base)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    gates: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise KdError(f"{adapter_dir}: unexpected tensor {key}")
        name = key[len(PEFT_PREFIX):]
        if (m := GATE.match(name)) and m.group(1) in (cfg.get("modules_to_save") or []):
            gates.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        module, dot, part = name.rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight"):
            raise KdError(f"{adapter_dir}: {key} is not a LoRA A/B weight; {MERGE_HINT}")
        pairs.setdefault(module, {})[part[0]] = t
    out: dict[str, np.ndarray] = {}
    rank = int(cfg["r"])
    for module in sorted(gates):
        out.update(_gate_pair(module, gates[module], reader, float(cfg["lora_alpha"])))
    for module in sorted(pairs):
        ab = pairs[module]
        name = _gguf_name(module)
        if set(ab) != {"A", "B"}:
            raise KdError(f"{adapter_dir}: {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"].float(), ab["B"].float()
        hf = f"{module}.weight"
        if hf not in reader:
            raise KdError(f"{module}: the base checkpoint {base} has no {hf} (another base?)")
        shape = reader.info(hf).shape
        if a.shape != (rank, shape[1]) or b.shape != (shape[0], rank):
            raise KdError(f"{module}: adapter A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base's "
                          f"{tuple(shape)} at rank {rank} (another base?)")
        out[f"{name}.lora_a"] = a.contiguous().numpy()
        out[f"{name}.lora_b"] = b.contiguous().numpy()
    if not out:
        raise KdError(f"{adapter_dir} holds no LoRA weights")
    return out, cfg


def write_lora_gguf(adapter_dir: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                    force: bool = False) -> LoraGgufReport:
    """Write the adapter of `adapter_dir` (trained on the checkpoint `base`) as a llama.cpp LoRA GGUF."""
    tensors, cfg = adapter_tensors(adapter_dir, base)
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r
    out = Path(out)
    check_output(out, force, [adapter_dir, base])
    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(partial, GGUF_ARCH)
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_string(gguf.Keys.General.NAME, f"{Path(base).name} LoRA")
        for name, t in tensors.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(partial, out)
    except BaseException:
        w.close()
        partial.unlink(missing_ok=True)
        raise
    return LoraGgufReport(out, len(tensors) // 2, rank, alpha)
