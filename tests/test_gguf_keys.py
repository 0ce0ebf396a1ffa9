"""GGUF key names and GGML type facts live in one place each; type choosers follow one protocol."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

import glmgguf
from glmgguf.gguf import qtypes
from glmgguf.gguf.convert import outtype_chooser
from glmgguf.gguf.keys import Provenance, QuantizeImatrix
from glmgguf.gguf.recipe import Recipe

PACKAGE = Path(glmgguf.__file__).parent
KEY_HOME = PACKAGE / "gguf" / "keys.py"
# a GGUF KV key of a namespace the package writes or reads (file names such as tokenizer.json are not keys)
KEY_LITERAL = re.compile(r"^(general|glm-dsa|quantize|imatrix|split|tokenizer|GGUF)\.(?!(json|model|txt|py)$)[\w.]+$")


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_key_names_are_typed_only_in_the_keys_module():
    ours = {v for k, v in vars(Provenance).items() if k.isupper()} | {
        v for k, v in vars(QuantizeImatrix).items() if k.isupper()}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == KEY_HOME:
            continue
        for line, value in _string_literals(path):
            if KEY_LITERAL.match(value) or value in ours:
                found.append(f"{path.relative_to(PACKAGE)}:{line}: {value!r}")
    assert not found, "GGUF key strings outside glmgguf/gguf/keys.py:\n" + "\n".join(found)


def test_sizes_follow_gguf_py():
    for qtype in qtypes.WRITABLE_TYPES:
        elements, size = GGML_QUANT_SIZES[qtype]
        assert qtypes.block_size(qtype) == elements
        assert qtypes.nbytes(qtype, 3 * elements) == 3 * size
        assert qtypes.row_fits(qtype, 2 * elements) and (elements == 1 or not qtypes.row_fits(qtype, elements + 1))
    assert qtypes.nbytes(Q.Q8_0, 64) == 68 and qtypes.nbytes(Q.BF16, 64) == 128


def test_choosers_record_their_policy():
    choose = outtype_chooser("q8_0")
    assert choose.provenance() == {Provenance.OUTTYPE: "q8_0"} and choose.warnings() == []
    recipe = Recipe.parse('description = "d"\ndefault = "Q8_0"\n[[rule]]\nrole = "expert_up"\ntype = "Q4_K"\n', "r")
    chooser = recipe.chooser([])
    assert chooser.provenance() == {Provenance.RECIPE: "r", Provenance.RECIPE_SHA256: recipe.sha256}
    assert chooser.warnings() == ["recipe r: rule 1 (role=expert_up -> Q4_K) matches no tensor of this model"]
