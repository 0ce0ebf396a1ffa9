"""The choices of every enumerated option: one source for the command line (`click.Choice`) and the plan."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from glmgguf.gguf.plan import OUTTYPES, IndexerMode, MtpMode

if TYPE_CHECKING:
    import torch

DTYPES = {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}  # option value -> torch dtype name
REAP_METRICS = ("reap", "frequency", "ean", "random")  # saliency that ranks experts for pruning
REAP_PER_LAYER = ("uniform", "global")  # the same keep count in every layer, or per-layer counts
KD_SCHEDULES = ("constant", "cosine")  # learning rate after warmup
NVFP4_FORMATS = ("modelopt", "compressed-tensors")  # `glmgguf.nvfp4.formats` has one object per name
GPTQ_FORMATS = ("compressed-tensors", "gptq")  # `glmgguf.gptq.formats` has one object per name
# LoRA-KD adapter targets: all MLA projections, only o_proj, shared experts, dense MLPs, routed experts (refused)
LORA_TARGETS = ("attn", "attn_out", "shared", "dense", "experts")
LORA_GGUF_TARGETS = ("attn_out", "shared", "dense")  # those llama.cpp applies a LoRA adapter GGUF to
LORA_SERVE = ("merged", "adapter")  # a LoRA-KD result served merged into the checkpoint or as an adapter GGUF
GGUF_OUTTYPES = tuple(sorted(OUTTYPES))
GGUF_MTP = tuple(m.value for m in MtpMode)
GGUF_INDEXER = tuple(m.value for m in IndexerMode)
DEVICE = re.compile(r"cpu|cuda(:\d+)?")  # where a stage computes
DEVICE_MAP = re.compile(r"cpu|cuda(:\d+)?|auto|balanced|balanced_low_0|sequential")  # also accelerate's placements
DEVICE_EXAMPLES = {DEVICE.pattern: "cpu, cuda or cuda:N", DEVICE_MAP.pattern: "cpu, cuda, cuda:N or auto"}


def device_problem(value: str, pattern: re.Pattern) -> str | None:
    """Why `value` is not a device `pattern` accepts (None when it is)."""
    if pattern.fullmatch(value):
        return None
    return f"{value!r} is not a device: use {DEVICE_EXAMPLES[pattern.pattern]}"


def usable_device(device: str | torch.device, error: type[Exception]) -> torch.device:
    """`device` as the torch device to compute on: the CPU or an available CUDA device; otherwise `error`."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda: CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise error(f"unsupported device {device!r} (cpu or cuda)")
    return dev
