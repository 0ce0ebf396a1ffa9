"""The loop detector on a CI-sized subset of bench/loop_cases.py's labelled set (GLM-5.2 tokenizer)."""

from __future__ import annotations

import pytest

from bench.loop_cases import LOOP_FAMILIES, NATURAL_KINDS, Pool, loop_cases, natural_chunks, score, token_pieces

N_LOOPS = 20
N_CHUNKS = 25


@pytest.fixture(scope="module")
def glm_tokenizer():
    from tokenizers import Tokenizer

    from glmgguf.testbed.glm_tokenizer import real_tokenizer_dir

    return Tokenizer.from_file(str(real_tokenizer_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def pieces(glm_tokenizer):
    return token_pieces(glm_tokenizer)


@pytest.fixture(scope="module")
def pool(glm_tokenizer):
    return Pool(glm_tokenizer, chunks=20)


# found / 20 on this subset (the full set's rates are in bench/results/loop_detection.json)
MEASURED = {"exact": 20, "counter": 20, "noisy": 20, "paragraph": 20, "nested": 20, "think": 20, "code": 20,
            "prose": 20}


@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_loop_family_recall_within_deadline(pool, pieces, family):
    """Each loop found after its start and within max(3 iterations, 512 tokens); never inside the prefix."""
    cases = loop_cases(pool, family, N_LOOPS, seed=1)
    assert all(c.period <= 512 for c in cases)
    s = score(cases, pieces)[family]
    assert s["early"] == 0
    assert s["hits"] == MEASURED[family], s


@pytest.mark.parametrize("kind", NATURAL_KINDS)
def test_no_false_loop_on_natural_text(glm_tokenizer, pieces, kind):
    chunks = natural_chunks(glm_tokenizer, kind, N_CHUNKS)
    assert len(chunks) == N_CHUNKS and all(len(c.tokens) == 512 for c in chunks)
    assert score(chunks, pieces)[kind]["hits"] == 0
