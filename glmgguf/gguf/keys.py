"""GGUF metadata key names in one namespace, gguf-py style: `gguf.Keys` for the keys it knows, and here the
glm-dsa keys it lacks, llama-quantize's imatrix record and the toolkit's own provenance keys.

`{arch}` templates (gguf-py's and `Arch`'s) are filled with `arch_key`.
"""

from __future__ import annotations

from gguf import Keys

from glmgguf.layout import GGUF_ARCH

__all__ = ["READER_PREFIX", "SPLIT_PREFIX", "Arch", "Keys", "Provenance", "QuantizeImatrix", "arch_key"]

READER_PREFIX = "GGUF."  # fields gguf-py's GGUFReader reports about the file itself (version, counts)
SPLIT_PREFIX = "split."  # the part numbering of a split file (`Keys.Split`)


class Arch:
    """glm-dsa keys the pinned gguf-py has no constant for (llama.cpp `LLM_KV_ATTENTION_INDEXER_*`)."""

    INDEXER_TYPES = "{arch}.attention.indexer.types"
    INDEXER_LAYERNORM_EPS = "{arch}.attention.indexer.layer_norm_epsilon"  # read by the patched runtime only


class QuantizeImatrix:
    """What llama-quantize records of the imatrix it used (llama.cpp `LLM_KV_QUANTIZE_IMATRIX_*`)."""

    PREFIX = "quantize.imatrix."
    FILE = PREFIX + "file"
    DATASET = PREFIX + "dataset"
    N_ENTRIES = PREFIX + "entries_count"
    N_CHUNKS = PREFIX + "chunks_count"


class Provenance:
    """The toolkit's own keys: what made the file and how."""

    PREFIX = "glmgguf."
    VERSION = PREFIX + "version"
    SOURCE_CONFIG_SHA256 = PREFIX + "source_config_sha256"
    REQUIRES_PATCHES = PREFIX + "requires_patches"  # llama.cpp patches the file needs (glmgguf.llama.patches)
    RECIPE = PREFIX + "recipe"
    RECIPE_SHA256 = PREFIX + "recipe_sha256"
    OUTTYPE = PREFIX + "outtype"
    MTP = PREFIX + "mtp"
    INDEXER = PREFIX + "indexer"


def arch_key(template: str, arch: str = GGUF_ARCH) -> str:
    """A `{arch}` key template filled in (glm-dsa unless told)."""
    return template.format(arch=arch)
