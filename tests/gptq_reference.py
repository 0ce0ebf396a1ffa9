"""Run llm-compressor's GPTQModifier (W4A16 preset) on one Linear and save what its compressor writes.

Usage (inside an environment with llmcompressor): python gptq_reference.py IN OUT [IN OUT ...] (safetensors)
IN holds `weight` [N, K] (the Linear's dtype) and `x` [n, K] (calibration rows, fed as n samples of one token).
OUT holds `weight_packed`, `weight_scale` and `weight_shape` as compressed-tensors' pack-quantized format stores
them, plus `weight_gptq` (the fake-quantized weight the modifier leaves in the module) and `rtn_fallback`.
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def main(src: str, dst: str) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from llmcompressor.core import Event, EventType, State
    from llmcompressor.modifiers.gptq import GPTQModifier

    torch.set_num_threads(1)
    t = load_file(src)
    w, x = t["weight"], t["x"]
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
    model.lin.weight.data.copy_(w)
    mod = GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=[])
    state = State(model=model)
    mod.initialize(state)
    mod.update_event(state, Event(type_=EventType.CALIBRATION_START))
    with torch.no_grad():
        model(x.to(w.dtype).unsqueeze(1))
    mod.update_event(state, Event(type_=EventType.SEQUENTIAL_EPOCH_END), modules=[model.lin])
    mod.update_event(state, Event(type_=EventType.CALIBRATION_END))
    fallback = bool(mod._rtn_fallback_module_names)
    lin = model.lin
    sd = {"weight": lin.weight.data.clone(), "weight_scale": lin.weight_scale.data.clone()}
    out = PackedQuantizationCompressor.compress(sd, lin.quantization_scheme)
    save_file({"weight_packed": out["weight_packed"].contiguous(), "weight_scale": out["weight_scale"].contiguous(),
               "weight_shape": out["weight_shape"], "weight_gptq": sd["weight"].contiguous(),
               "rtn_fallback": torch.tensor([fallback])}, dst)
    print(f"actorder={lin.quantization_scheme.weights.actorder} group={lin.quantization_scheme.weights.group_size}")


if __name__ == "__main__":
    for a, b in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
        main(a, b)
