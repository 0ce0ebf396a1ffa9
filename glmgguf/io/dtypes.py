"""safetensors dtype codes: element sizes, numpy views of the raw data, and the torch dtypes (loaded lazily)."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
# numpy dtype of the stored words; BF16 has no numpy type, its 16-bit words are read as uint16
NUMPY_WORDS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
               "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def element_size(code: str) -> int:
    return ITEMSIZE[code]


@cache
def safetensors_to_torch() -> dict[str, torch.dtype]:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@cache
def torch_to_safetensors() -> dict[torch.dtype, str]:
    return {v: k for k, v in safetensors_to_torch().items()}
