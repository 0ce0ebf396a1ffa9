"""GGML tensor types as data: the ones the toolkit writes, their block sizes and byte counts, llama-quantize's
fallback chain, the ones that need an importance matrix, and the llama.cpp file type a mix of them is named by.

Sizes come from gguf-py's `GGML_QUANT_SIZES` (type -> elements per block, bytes per block); file types from its
`LlamaFileType`; the rest follows the pinned llama.cpp (`src/llama-quant.cpp`, `ggml/src/ggml.c`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q

if TYPE_CHECKING:
    from glmgguf.gguf.plan import PlannedTensor

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
QUANT_TYPES = (
    Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ1_S, Q.IQ1_M,
    Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0, Q.MXFP4,
    Q.NVFP4,  # routed experts only, ModelOpt-exact with a per-expert `.scale` tensor (glmgguf.nvfp4.gguf)
)
WRITABLE_TYPES = FLOAT_TYPES + QUANT_TYPES  # what a recipe may ask for

# llama-quantize's tensor_type_fallback: the type a row gets when the asked type's block does not divide it
FALLBACK: dict[Q, Q] = {
    **{t: Q.IQ4_NL for t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS)},
    **{t: Q.Q4_0 for t in (Q.Q2_K, Q.Q3_K, Q.TQ1_0, Q.TQ2_0)},
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}

# Types llama-quantize refuses to write without an imatrix (tensor_requires_imatrix, except token_embd/output
# there), plus the ones ggml's own quantizer asserts on (ggml_quantize_requires_imatrix: those everywhere).
LLAMA_IMATRIX_TYPES = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})
GGML_IMATRIX_TYPES = frozenset({Q.IQ2_XXS, Q.IQ2_XS, Q.IQ1_S})
IMATRIX_EXEMPT = ("token_embd.weight", "output.weight")

# (llama-quantize ftype argument, general.file_type) for a file whose main type is the key
FILE_TYPES: dict[Q, tuple[str, LlamaFileType]] = {
    Q.F32: ("F32", LlamaFileType.ALL_F32),
    Q.F16: ("F16", LlamaFileType.MOSTLY_F16),
    Q.BF16: ("BF16", LlamaFileType.MOSTLY_BF16),
    Q.Q4_0: ("Q4_0", LlamaFileType.MOSTLY_Q4_0),
    Q.Q4_1: ("Q4_1", LlamaFileType.MOSTLY_Q4_1),
    Q.Q5_0: ("Q5_0", LlamaFileType.MOSTLY_Q5_0),
    Q.Q5_1: ("Q5_1", LlamaFileType.MOSTLY_Q5_1),
    Q.Q8_0: ("Q8_0", LlamaFileType.MOSTLY_Q8_0),
    Q.Q2_K: ("Q2_K", LlamaFileType.MOSTLY_Q2_K),
    Q.Q3_K: ("Q3_K", LlamaFileType.MOSTLY_Q3_K_M),
    Q.Q4_K: ("Q4_K", LlamaFileType.MOSTLY_Q4_K_M),
    Q.Q5_K: ("Q5_K", LlamaFileType.MOSTLY_Q5_K_M),
    Q.Q6_K: ("Q6_K", LlamaFileType.MOSTLY_Q6_K),
    Q.IQ2_XXS: ("IQ2_XXS", LlamaFileType.MOSTLY_IQ2_XXS),
    Q.IQ2_XS: ("IQ2_XS", LlamaFileType.MOSTLY_IQ2_XS),
    Q.IQ2_S: ("IQ2_M", LlamaFileType.MOSTLY_IQ2_M),
    Q.IQ3_XXS: ("IQ3_XXS", LlamaFileType.MOSTLY_IQ3_XXS),
    Q.IQ3_S: ("IQ3_S", LlamaFileType.MOSTLY_IQ3_S),
    Q.IQ1_S: ("IQ1_S", LlamaFileType.MOSTLY_IQ1_S),
    Q.IQ1_M: ("IQ1_M", LlamaFileType.MOSTLY_IQ1_M),
    Q.IQ4_NL: ("IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL),
    Q.IQ4_XS: ("IQ4_XS", LlamaFileType.MOSTLY_IQ4_XS),
    Q.TQ1_0: ("TQ1_0", LlamaFileType.MOSTLY_TQ1_0),
    Q.TQ2_0: ("TQ2_0", LlamaFileType.MOSTLY_TQ2_0),
    Q.MXFP4: ("MXFP4_MOE", LlamaFileType.MOSTLY_MXFP4_MOE),
    Q.NVFP4: ("NVFP4", LlamaFileType.MOSTLY_NVFP4),
}
GUESSED_FILE_TYPE = ("Q8_0", LlamaFileType.GUESSED)


def block_size(qtype: Q) -> int:
    """Elements per block of `qtype`."""
    return GGML_QUANT_SIZES[qtype][0]


def row_fits(qtype: Q, row: int) -> bool:
    """True when rows of `row` elements can be stored as `qtype` (whole blocks only)."""
    return row % block_size(qtype) == 0


def nbytes(qtype: Q, n_elements: int) -> int:
    """Bytes of `n_elements` stored as `qtype` (whole blocks)."""
    elements, size = GGML_QUANT_SIZES[qtype]
    return n_elements // elements * size


def needs_imatrix(name: str, qtype: Q) -> bool:
    """True when writing `name` as `qtype` needs importance data (as llama-quantize / ggml decide)."""
    if qtype in GGML_IMATRIX_TYPES:
        return True
    return qtype in LLAMA_IMATRIX_TYPES and name not in IMATRIX_EXEMPT


def main_type(types: dict[Q, int]) -> Q:
    """The non-F32 type holding the most elements (F32 if none): the file's nominal type."""
    counts = {q: n for q, n in types.items() if q is not Q.F32}
    return max(counts, key=counts.__getitem__) if counts else Q.F32


def file_type_of(tensors: Iterable[PlannedTensor]) -> tuple[str, LlamaFileType]:
    """(llama-quantize ftype name, general.file_type) for tensors with their ggml_type set."""
    counts: dict[Q, int] = {}
    for t in tensors:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + t.n_elements
    return FILE_TYPES.get(main_type(counts), GUESSED_FILE_TYPE)
