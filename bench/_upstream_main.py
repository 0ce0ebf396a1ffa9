"""Run a llama.cpp tree's `convert_hf_to_gguf.py` with the BPE pre-tokenizer answered up front.

Usage: python _upstream_main.py LLAMA_CPP_DIR [convert_hf_to_gguf.py arguments...]

The upstream converter identifies the pre-tokenizer by hashing the tokens of a probe string and refuses hashes
it does not know (every test checkpoint's tokenizer is one). GLM-5.x uses the `glm4` pre-tokenizer, so the
answer is patched into `TextModel.get_vocab_base_pre` before the converter's `main()` runs. The tree's own
`gguf-py` goes first on `sys.path` so the converter uses the gguf package it was written against.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

PRE_TOKENIZER = os.environ.get("UPSTREAM_VOCAB_PRE", "glm4")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    tree = Path(sys.argv[1]).resolve()
    script = tree / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"{tree}: no convert_hf_to_gguf.py")
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]

    from conversion.base import TextModel

    def get_vocab_base_pre(self, tokenizer) -> str:
        return PRE_TOKENIZER

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
