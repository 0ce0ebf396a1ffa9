"""Mixed quant recipes, glmgguf quantize / convert --recipe, imatrix, split output, inspect - against the pinned
llama.cpp (llama-quantize bytes, llama-imatrix files, llama-server loading)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from glmgguf.checkpoint import open_checkpoint
from glmgguf.cli import main
from glmgguf.gguf.convert import convert, outtype_chooser
from glmgguf.gguf.imatrix import Imatrix, ImatrixEntry, ImatrixError, load_imatrix, slice_experts
from glmgguf.gguf.plan import plan_tensors
from glmgguf.gguf.quantize import open_gguf, quantize_gguf
from glmgguf.gguf.recipe import (
    Recipe,
    RecipeError,
    builtin_recipes,
    fallback_type,
    load_recipe,
)
from glmgguf.layout import Role

# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tiny_testbed_dir) -> Path:
    out = tmp_path_factory.mktemp("q") / "tiny-f32.gguf"
    convert(tiny_testbed_dir, out, outtype_chooser("f32"), progress=False)
    return out


@pytest.fixture(scope="module")
def bf16_gguf(tmp_path_factory, tiny_testbed_dir) -> Path:
    out = tmp_path_factory.mktemp("q") / "tiny-bf16.gguf"
    convert(tiny_testbed_dir, out, outtype_chooser("bf16"), progress=False)
    return out


@pytest.fixture(scope="module")
def imatrix_file(tmp_path_factory, llama_toolchain, f32_gguf) -> Path:
    """An imatrix of the tiny testbed made by the pinned llama-imatrix (GGUF format) on a short text."""
    from glmgguf.testbed import stdlib_corpus

    d = tmp_path_factory.mktemp("imatrix")
    text = d / "calib.txt"
    text.write_text("".join(stdlib_corpus("heldout"))[:30000])
    out = d / "imatrix.gguf"
    subprocess.run([str(llama_toolchain.imatrix), "-m", str(f32_gguf), "-f", str(text), "-o", str(out), "-c", "128",
                    "--chunks", "6", "-t", "2", "--no-ppl"], check=True, capture_output=True)
    return out


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    from glmgguf.gguf.writer import split_paths

    return {t.name: t for p in split_paths(path) for t in GGUFReader(p).tensors}


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert np.array_equal(ta[name].data.reshape(-1).view(np.uint8), tb[name].data.reshape(-1).view(np.uint8)), name


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _llama_quantize(toolchain, recipe: str, src: Path, out: Path, imatrix: Path | None = None) -> None:
    """Run the pinned llama-quantize with the command line `glmgguf recipes --llama-quantize-args` prints."""
    args = ["recipes", recipe, "--llama-quantize-args", src, "--out", out]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    cmd = shlex.split(result.stdout.strip().splitlines()[-1])
    assert cmd[0] == "llama-quantize"
    proc = subprocess.run([str(toolchain.quantize), *cmd[1:], "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


# --- recipes as data ---------------------------------------------------------------------------------------------


def test_shipped_recipes_resolve(tiny_testbed_dir):
    assert {"q4_protected", "q3_protected", "q2_protected", "q8_0", "bf16", "f32"} <= set(builtin_recipes())
    ckpt = open_checkpoint(tiny_testbed_dir)
    plan = plan_tensors(ckpt)
    for name in builtin_recipes():
        res = load_recipe(name).resolve(plan, ckpt.layout.layers)
        assert res.warnings == [], (name, res.warnings)
        for t in plan:
            if t.always_f32:  # norms, 1-D, router, indexer.proj: F32 whatever the recipe says
                assert res[t.name] is Q.F32, (name, t.name)
    res = load_recipe("q4_protected").resolve(plan, ckpt.layout.layers)
    expected = {Role.EXPERT_GATE: Q.Q4_K, Role.EXPERT_UP: Q.Q4_K, Role.EXPERT_DOWN: Q.Q6_K}
    for t in plan:
        if not t.always_f32:
            assert res[t.name] is expected.get(t.role, Q.Q8_0), t.name
    # q3: the first MoE layer's experts one step higher; ffn_down one step above gate/up
    res = load_recipe("q3_protected").resolve(plan, ckpt.layout.layers)
    first_moe = ckpt.layout.moe_layers[0].index
    assert res[f"blk.{first_moe}.ffn_gate_exps.weight"] is Q.Q4_K
    assert res[f"blk.{first_moe}.ffn_down_exps.weight"] is Q.Q5_K
    assert res[f"blk.{first_moe + 1}.ffn_up_exps.weight"] is Q.Q3_K
    assert res[f"blk.{first_moe + 1}.ffn_down_exps.weight"] is Q.Q4_K


def test_layer_selectors_and_regex(tiny_testbed_dir):
    ckpt = open_checkpoint(tiny_testbed_dir)
    plan = plan_tensors(ckpt)
    n = ckpt.layout.n_layers  # the MTP block
    recipe = Recipe.parse('''
description = "selectors"
default = "F16"
[[rule]]
layers = "mtp"
type = "Q8_0"
[[rule]]
role = "expert_down"
layers = ["last_moe:1", 0]
type = "Q6_K"
[[rule]]
name = 'attn_(q|kv)_a'
layers = "1-2"
type = "Q5_K"
[[rule]]
role = "dense_ffn"
layers = "first_moe:1"
type = "Q2_K"
''', "sel")
    res = recipe.resolve(plan, ckpt.layout.layers)
    assert res[f"blk.{n}.ffn_down_exps.weight"] is Q.Q8_0
    assert res[f"blk.{n}.nextn.eh_proj.weight"] is Q.Q8_0
    assert res[f"blk.{n - 1}.ffn_down_exps.weight"] is Q.Q6_K
    assert res[f"blk.{n - 2}.ffn_down_exps.weight"] is Q.F16
    assert res["blk.1.attn_q_a.weight"] is Q.Q5_K and res["blk.2.attn_kv_a_mqa.weight"] is Q.Q5_K
    assert res["blk.0.attn_q_a.weight"] is Q.F16 and res["blk.1.attn_q_b.weight"] is Q.F16
    assert res["token_embd.weight"] is Q.F16  # outside blocks: no layer selector matches it
    # dense FFN lives in layer 0 only, never in the first MoE layer: the rule matches nothing -> a warning
    assert len(res.warnings) == 1 and "rule 4" in res.warnings[0] and "matches no tensor" in res.warnings[0]


def test_fallback_chain():
    # llama-quantize's tensor_type_fallback, as documented in glmgguf.gguf.recipe
    assert fallback_type(Q.Q4_K, 256) is Q.Q4_K
    assert fallback_type(Q.Q4_K, 192) is Q.Q5_0
    assert fallback_type(Q.Q6_K, 128) is Q.Q8_0
    assert fallback_type(Q.Q5_K, 64) is Q.Q5_1
    assert fallback_type(Q.Q3_K, 96) is Q.Q4_0
    assert fallback_type(Q.Q2_K, 32) is Q.Q4_0
    assert fallback_type(Q.IQ2_XXS, 160) is Q.IQ4_NL
    assert fallback_type(Q.Q4_K, 48) is Q.F16  # Q5_0 does not fit either
    assert fallback_type(Q.Q8_0, 48) is Q.F16
    assert fallback_type(Q.BF16, 7) is Q.BF16


@pytest.mark.parametrize(("text", "message"), [
    ('description = "x"\ndefault = "Q4_Z"\n', "unknown type 'Q4_Z'"),
    ('description = "x"\ndefault = "Q8_0"\n[[rule]]\nrole = "expert_gate"\ntype = "Q9_K"\n',
     "rule 1: unknown type 'Q9_K'"),
    ('description = "x"\ndefault = "Q8_0"\n[[rule]]\nrole = "experts"\ntype = "Q4_K"\n',
     "rule 1: unknown role 'experts'"),
    ('description = "x"\ndefault = "Q8_0"\n[[rule]]\nname = "blk.(["\ntype = "Q4_K"\n', "rule 1: bad name regex"),
    ('description = "x"\ndefault = "Q8_0"\n[[rule]]\nlayers = "middle"\ntype = "Q4_K"\n',
     "rule 1: layers: unknown selector 'middle'"),
    ('description = "x"\ndefault = "Q8_0"\n[[rule]]\nrole = "attn"\nqtype = "Q4_K"\n', "rule 1: unknown key(s) qtype"),
    ('default = "Q8_0"\n', "needs a one-line 'description'"),
    ('description = "x"\ndefault = "I32"\n', "unknown type 'I32'"),
])
def test_bad_recipe_files(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_recipes_command_lists_descriptions():
    result = _cli("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert {line.split()[0] for line in lines} == set(builtin_recipes())
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


# --- imatrix --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_imatrix_reader_matches_llama_normalization(imatrix_file):
    """values = in_sum2 / round(counts) per matrix (1 where an expert was never routed), read independently."""
    im = load_imatrix(imatrix_file)
    raw = {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(imatrix_file).tensors}
    assert im.datasets == [str(imatrix_file.parent / "calib.txt")] and im.chunk_count == 6
    expert = "blk.1.ffn_gate_exps.weight"
    sums, counts = raw[expert + ".in_sum2"], raw[expert + ".counts"]
    assert sums.shape == (16, 256) and counts.shape == (16, 1)
    for e in range(16):
        want = sums[e] / np.float32(round(float(counts[e, 0]))) if counts[e, 0] > 0 else np.ones(256, np.float32)
        assert np.array_equal(im.values(expert).reshape(16, 256)[e], want)
    # attn_k_b: one count for all heads' matrices
    kb = im.for_tensor("blk.0.attn_k_b.weight", (4, 64, 32))
    assert kb.shape == (4, 32)
    assert np.array_equal(kb.reshape(-1), raw["blk.0.attn_k_b.weight.in_sum2"].reshape(-1) / raw[
        "blk.0.attn_k_b.weight.counts"].reshape(-1)[0])


def test_imatrix_slice_and_save(tmp_path):
    rng = np.random.default_rng(0)
    sums = rng.random((6, 8), dtype=np.float32)
    im = Imatrix({"blk.1.ffn_up_exps.weight": ImatrixEntry(sums.reshape(-1), np.array([3, 0, 5, 1, 2, 4])),
                  "blk.1.attn_q_a.weight": ImatrixEntry(rng.random(8, dtype=np.float32), np.array([7]))},
                 ["calib.txt"], 4, 128)
    sliced = slice_experts(im, {1: [4, 0, 2]})
    vals = sliced.for_tensor("blk.1.ffn_up_exps.weight", (3, 16, 8))
    assert np.array_equal(vals, np.stack([sums[4] / 2, sums[0] / 3, sums[2] / 5]))
    assert np.array_equal(sliced.values("blk.1.attn_q_a.weight"), im.values("blk.1.attn_q_a.weight"))
    assert np.array_equal(im.values("blk.1.ffn_up_exps.weight").reshape(6, 8)[1], np.ones(8, np.float32))
    with pytest.raises(ImatrixError, match="6 experts in the imatrix, 3 in the model: slice it"):
        im.for_tensor("blk.1.ffn_up_exps.weight", (3, 16, 8))
    with pytest.raises(ImatrixError, match="names expert 9 of 6"):
        slice_experts(im, {1: [9]})
    sliced.save(tmp_path / "sliced.gguf")
    back = load_imatrix(tmp_path / "sliced.gguf")
    assert back.datasets == ["calib.txt"] and back.chunk_count == 4 and back.chunk_size == 128
    for name in im.entries:
        assert np.array_equal(back.values(name), sliced.values(name))


# --- bit identity with llama-quantize ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("source", ["f32", "bf16"])
def test_q4_protected_matches_llama_quantize(tmp_path, llama_toolchain, f32_gguf, bf16_gguf, imatrix_file,
                                             source, use_imatrix):
    src = f32_gguf if source == "f32" else bf16_gguf
    imatrix = imatrix_file if use_imatrix else None
    ref = tmp_path / "llama.gguf"
    _llama_quantize(llama_toolchain, "q4_protected", src, ref, imatrix)
    ours = tmp_path / "ours.gguf"
    args = ["quantize", src, ours, "--recipe", "q4_protected", "--threads", "1" if use_imatrix else "2"]
    result = _cli(*args, *(["--imatrix", imatrix] if imatrix else []))
    assert result.exit_code == 0, result.output
    _assert_same_tensors(ours, ref)
    types = {t.name: t.tensor_type for t in _tensors(ours).values()}
    assert types["blk.1.ffn_gate_exps.weight"] == Q.Q4_K and types["blk.1.ffn_down_exps.weight"] == Q.Q6_K
    assert types["blk.0.attn_q_b.weight"] == Q.Q8_0 and types["blk.0.indexer.proj.weight"] == Q.F32
    # KV: everything llama-quantize writes, plus our recipe keys
    diff = _cli("inspect", ours, "--diff", ref)
    assert "KV differences" in diff.output and "change type" not in diff.output, diff.output
    changed = {line.split(":")[0].strip() for line in diff.output.splitlines() if line.startswith("  ")}
    assert changed == {"glmgguf.recipe", "glmgguf.recipe_sha256"}, diff.output


@pytest.mark.slow
def test_imatrix_changes_the_bytes(tmp_path, f32_gguf, imatrix_file):
    """Sanity check for the test above: the imatrix really reaches the K-quant kernels."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    rec = load_recipe("q4_protected")
    quantize_gguf(f32_gguf, a, rec, progress=False)
    quantize_gguf(f32_gguf, b, rec, imatrix=load_imatrix(imatrix_file), progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert ta["blk.2.ffn_up_exps.weight"].data.tobytes() != tb["blk.2.ffn_up_exps.weight"].data.tobytes()
    assert ta["blk.0.attn_q_a.weight"].data.tobytes() == tb["blk.0.attn_q_a.weight"].data.tobytes()  # Q8_0


FALLBACK_RECIPE = '''
description = "K-quants on rows that do not fit (fallback chain), IQ4_NL, Q5_1"
default = "Q4_K"
[[rule]]
role = ["attn", "indexer"]
type = "Q6_K"
[[rule]]
role = "shared_expert"
type = "Q5_K"
[[rule]]
role = "expert_down"
type = "IQ4_NL"
[[rule]]
role = "dense_ffn"
type = "Q5_1"
'''


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["q3_protected", "q2_protected", "fallback"])
def test_other_recipes_match_llama_quantize(tmp_path, llama_toolchain, bf16_gguf, imatrix_file, recipe):
    if recipe == "fallback":
        path = tmp_path / "fallback.toml"
        path.write_text(FALLBACK_RECIPE)
        recipe = str(path)
    ref, ours = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    _llama_quantize(llama_toolchain, recipe, bf16_gguf, ref, imatrix_file)
    res = quantize_gguf(bf16_gguf, ours, load_recipe(recipe), imatrix=load_imatrix(imatrix_file), threads=2,
                        progress=False)
    _assert_same_tensors(ours, ref)
    if recipe.endswith(".toml"):
        fb = {c.name: c.qtype for c in res.resolution.fallbacks}
        assert fb["blk.0.attn_q_b.weight"] is Q.Q8_0  # Q6_K on a row of 128
        assert fb["blk.0.attn_k_b.weight"] is Q.Q8_0  # row 32


@pytest.fixture(scope="module")
def legacy_imatrix(imatrix_file, llama_toolchain, f32_gguf) -> Path:
    """The same imatrix in the legacy .dat format, converted by the pinned llama-imatrix itself (it wants a model
    argument but loads none when given no text)."""
    out = imatrix_file.with_name("imatrix.dat")
    subprocess.run([str(llama_toolchain.imatrix), "-m", str(f32_gguf), "--in-file", str(imatrix_file), "-o", str(out),
                    "--output-format", "dat"], check=True, capture_output=True)
    assert out.read_bytes()[:4] != b"GGUF"
    return out


@pytest.mark.slow
def test_legacy_dat_imatrix_matches_llama_quantize(tmp_path, llama_toolchain, bf16_gguf, imatrix_file,
                                                   legacy_imatrix):
    """A .dat imatrix written by llama-imatrix gives llama-quantize's bytes, and the values of its GGUF twin."""
    dat, im = load_imatrix(legacy_imatrix), load_imatrix(imatrix_file)
    assert dat.legacy and dat.entries.keys() <= im.entries.keys() and len(dat.entries) > 20
    for name in dat.entries:  # .dat stores (sum / count) * ncall in float32; reading divides by ncall again
        np.testing.assert_allclose(dat.values(name), im.values(name), rtol=1e-6)
    ref, ours = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    _llama_quantize(llama_toolchain, "q3_protected", bf16_gguf, ref, legacy_imatrix)
    result = _cli("quantize", bf16_gguf, ours, "--recipe", "q3_protected", "--imatrix", legacy_imatrix,
                  "--threads", "2")
    assert result.exit_code == 0, result.output
    _assert_same_tensors(ours, ref)


@pytest.fixture(scope="module")
def pruned_bf16(tmp_path_factory, tiny_testbed_dir) -> tuple[Path, Path]:
    """The tiny testbed pruned to 12 of 16 experts per MoE layer (a fixed keep-map) and its BF16 GGUF."""
    from glmgguf.reap.prune import PrunePlan, prune_checkpoint

    d = tmp_path_factory.mktemp("pruned")
    layers = [x.index for x in open_checkpoint(tiny_testbed_dir).layout.layers if x.n_experts]
    keep = {L: sorted(np.random.default_rng(L).choice(16, 12, replace=False).tolist()) for L in layers}
    prune_checkpoint(tiny_testbed_dir, PrunePlan(keep, {L: 16 for L in layers}, "random", "uniform"), d / "model")
    convert(d / "model", d / "pruned-bf16.gguf", outtype_chooser("bf16"), progress=False)
    return d / "model", d / "pruned-bf16.gguf"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_slice_command(tmp_path, llama_toolchain, pruned_bf16, imatrix_file, legacy_imatrix, fmt):
    """`glmgguf imatrix slice` turns the unpruned model's imatrix into the pruned model's: kept experts' rows in
    keep-map order; the pruned GGUF then quantizes to llama-quantize's bytes with it, and refuses the unsliced one."""
    from glmgguf.reap.prune import load_keep_map

    model, src = pruned_bf16
    full = imatrix_file if fmt == "gguf" else legacy_imatrix
    sliced = tmp_path / "sliced.gguf"
    result = _cli("imatrix", "slice", full, model, sliced)
    assert result.exit_code == 0 and "expert tensors sliced" in result.output, result.output
    keep, before, after = load_keep_map(model), load_imatrix(full), load_imatrix(sliced)
    expert = "blk.2.ffn_down_exps.weight"
    np.testing.assert_array_equal(after.values(expert).reshape(12, -1),
                                  before.values(expert).reshape(16, -1)[keep[2]])
    assert np.array_equal(after.values("blk.0.attn_q_a.weight"), before.values("blk.0.attn_q_a.weight"))
    refused = _cli("quantize", src, tmp_path / "x.gguf", "--recipe", "q4_protected", "--imatrix", full)
    assert refused.exit_code == 1 and "slice it with the prune keep-map" in refused.output, refused.output
    ref, ours = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    _llama_quantize(llama_toolchain, "q4_protected", src, ref, sliced)
    result = _cli("quantize", src, ours, "--recipe", "q4_protected", "--imatrix", sliced, "--threads", "2")
    assert result.exit_code == 0, result.output
    _assert_same_tensors(ours, ref)


def test_imatrix_slice_refusals(tmp_path):
    im = tmp_path / "im.gguf"
    Imatrix({"blk.1.ffn_up_exps.weight": ImatrixEntry(np.ones(6 * 8, np.float32), np.arange(1, 7))},
            ["calib.txt"], 4, 128).save(im)
    bad = tmp_path / "keep.json"
    bad.write_text('{"keep_map": {"1": [0, 7]}, "source_experts": {"1": 6}}')
    result = _cli("imatrix", "slice", im, bad, tmp_path / "out.gguf")
    assert result.exit_code == 1 and "keep-map names expert 7 of 6" in result.output, result.output
    result = _cli("imatrix", "slice", im, tmp_path, tmp_path / "out.gguf")
    assert result.exit_code == 1 and "has no reap_keep_map.json" in result.output, result.output
    bad.write_text('{"keep_map": {"1": [5, 0]}, "source_experts": {"1": 6}}')
    result = _cli("imatrix", "slice", im, bad, im)
    assert result.exit_code == 1 and "is the input" in result.output, result.output
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("*.partial"))


# --- one-pass convert == convert f32 + quantize ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
def test_one_pass_convert_equals_two_step(tmp_path, llama_toolchain, tiny_testbed_dir, f32_gguf, imatrix_file,
                                          use_imatrix):
    extra = ["--imatrix", imatrix_file] if use_imatrix else []
    one = tmp_path / "one.gguf"
    result = _cli("convert", tiny_testbed_dir, one, "--recipe", "q4_protected", "--threads", "2", *extra)
    assert result.exit_code == 0, result.output
    two = tmp_path / "two.gguf"
    result = _cli("quantize", f32_gguf, two, "--recipe", "q4_protected", "--threads", "2", *extra)
    assert result.exit_code == 0, result.output
    _assert_same_tensors(one, two)
    kv = open_gguf(one)
    assert kv.value("glmgguf.recipe") == "q4_protected"
    assert kv.value("glmgguf.recipe_sha256") == load_recipe("q4_protected").sha256
    assert kv.value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_outtype_and_recipe_are_exclusive(tmp_path, tiny_testbed_dir):
    result = _cli("convert", tiny_testbed_dir, tmp_path / "x.gguf", "--outtype", "f32", "--recipe", "q8_0")
    assert result.exit_code == 2 and "mutually exclusive" in result.output


# --- llama-server loads the result; split output -------------------------------------------------------------


def _generates(toolchain, model: Path) -> str:
    from glmgguf.llama import LlamaServer

    with LlamaServer(model, ["-c", "256", "-t", "2", "-ngl", "0"], toolchain=toolchain) as srv:
        reply = srv.completion("def main():\n", n_predict=24, temperature=0.0, seed=0)
    assert reply["tokens_predicted"] > 0 and reply["content"], reply
    return reply["content"]


@pytest.mark.slow
def test_trained_q4_protected_generates_and_splits(tmp_path, llama_toolchain, trained_testbed_dir):
    q4 = tmp_path / "trained-q4.gguf"
    result = _cli("convert", trained_testbed_dir, q4, "--recipe", "q4_protected", "--threads", "2")
    assert result.exit_code == 0, result.output
    text = _generates(llama_toolchain, q4)

    # the same model as llama.cpp split parts of at most 4 MB, from the quantize command
    f32 = tmp_path / "trained-f32.gguf"
    convert(trained_testbed_dir, f32, outtype_chooser("f32"), progress=False)
    split = tmp_path / "split.gguf"
    result = _cli("quantize", f32, split, "--recipe", "q4_protected", "--split-max-size", "4M", "--threads", "2")
    assert result.exit_code == 0, result.output
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    n = len(parts)
    assert n >= 2 and [p.name for p in parts] == [f"split-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert not list(tmp_path.glob("*.partial")) and not split.exists()
    for i, p in enumerate(parts):
        r = GGUFReader(p)
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == n
        assert r.fields["split.tensors.count"].contents() == len(_tensors(q4))
        assert sum(t.n_bytes for t in r.tensors) <= 4_000_000 or len(r.tensors) == 1
    _assert_same_tensors(parts[0], q4)  # the parts hold exactly the one-file model's tensors
    assert _generates(llama_toolchain, parts[0]) == text


# --- inspect ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inspect_table(tmp_path, llama_toolchain, tiny_testbed_dir):
    out = tmp_path / "q8.gguf"
    assert _cli("convert", tiny_testbed_dir, out, "--recipe", "q8_0").exit_code == 0
    result = _cli("inspect", out)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line and line[0].isalpha()}
    assert rows["attn"][2] == "Q8_0x30" and rows["attn"][-1] == "8.500"
    assert rows["norm"][-1] == "32.000" and rows["router"][2].startswith("F32x")
    assert "glmgguf.recipe = 'q8_0'" in result.output
    assert f"glmgguf.recipe_sha256 = '{load_recipe('q8_0').sha256}'" in result.output


# --- bad input: one clear error line, nothing half-written ------------------------------------------------------


def _other_arch_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _foreign_imatrix(path: Path) -> Path:
    """An imatrix of a model with a different hidden size (the same tensor names)."""
    Imatrix({"blk.0.attn_q_a.weight": ImatrixEntry(np.ones(512, np.float32), np.array([3])),
             "blk.1.ffn_gate_exps.weight": ImatrixEntry(np.ones(16 * 512, np.float32), np.full(16, 3))},
            ["other.txt"], 1, 128).save(path)
    return path


def _pruned_imatrix(path: Path) -> Path:
    """The model's shapes except 32 experts instead of 16 (an unpruned model's imatrix on a pruned one)."""
    Imatrix({"blk.1.ffn_gate_exps.weight": ImatrixEntry(np.ones(32 * 256, np.float32), np.full(32, 3))},
            ["other.txt"], 1, 128).save(path)
    return path


BAD = {
    "unknown recipe": (lambda d: ["--recipe", "q5_fancy"], "unknown recipe 'q5_fancy'"),
    "unknown type": (lambda d: ["--recipe", _write(d / "r.toml", 'description="x"\ndefault="Q8_0"\n[[rule]]\n'
                                                                 'role="attn"\ntype="Q3_XL"\n')],
                     "r.toml: rule 1: unknown type 'Q3_XL'"),
    "needs imatrix": (lambda d: ["--recipe", _write(d / "iq2.toml", 'description="x"\ndefault="Q8_0"\n[[rule]]\n'
                                                                    'role="expert_gate"\ntype="IQ2_XXS"\n')],
                      "blk.1.ffn_gate_exps.weight: IQ2_XXS needs an importance matrix"),
    "foreign imatrix": (lambda d: ["--recipe", "q4_protected", "--imatrix", _foreign_imatrix(d / "im.gguf")],
                        "imatrix for blk.0.attn_q_a.weight has 512 values, the model's tensor needs 256"),
    "unpruned imatrix": (lambda d: ["--recipe", "q4_protected", "--imatrix", _pruned_imatrix(d / "im.gguf")],
                         "32 experts in the imatrix, 16 in the model"),
    "missing imatrix": (lambda d: ["--recipe", "q4_protected", "--imatrix", d / "none.gguf"], "not found"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_quantize_input(tmp_path, f32_gguf, case):
    args, message = BAD[case]
    out = tmp_path / "out.gguf"
    result = _cli("quantize", f32_gguf, out, *args(tmp_path))
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last, result.output
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_other_architecture_refused(tmp_path):
    src = _other_arch_gguf(tmp_path / "llama.gguf")
    out = tmp_path / "out.gguf"
    result = _cli("quantize", src, out, "--recipe", "q4_protected")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {src}: architecture 'llama' is not glm-dsa (GLM-5.x); refusing to quantize it")
    assert not out.exists() and not (tmp_path / "out.gguf.partial").exists()


def test_unused_rule_warns(tmp_path, f32_gguf):
    recipe = _write(tmp_path / "r.toml", 'description="x"\ndefault="F16"\n[[rule]]\nrole="dense_ffn"\n'
                                         'layers="last_moe:1"\ntype="Q8_0"\n')
    out = tmp_path / "out.gguf"
    result = _cli("quantize", f32_gguf, out, "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert "warning: recipe r: rule 1 (role=dense_ffn layers=last_moe:1 -> Q8_0) matches no tensor" in result.output
    assert out.exists()


def test_existing_output_needs_force(tmp_path, f32_gguf):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    result = _cli("quantize", f32_gguf, out, "--recipe", "bf16")
    assert result.exit_code == 1 and "already exists" in result.output
    assert out.read_bytes() == b"keep me"
    assert _cli("quantize", f32_gguf, out, "--recipe", "bf16", "--force").exit_code == 0
    assert _tensors(out)["blk.0.attn_q_a.weight"].tensor_type == Q.BF16


@pytest.mark.slow
def test_split_input_and_requantize_refused(tmp_path, f32_gguf):
    """A split GGUF reads back from its first part; an already quantized input is not requantized."""
    parts = tmp_path / "parts.gguf"
    assert _cli("quantize", f32_gguf, parts, "--recipe", "f32", "--split-max-size", "20M").exit_code == 0
    (first,) = tmp_path.glob("parts-00001-of-*.gguf")
    assert not first.name.endswith("-00001.gguf")
    direct, via_parts = tmp_path / "direct.gguf", tmp_path / "via.gguf"
    assert _cli("quantize", f32_gguf, direct, "--recipe", "q8_0").exit_code == 0
    result = _cli("quantize", first, via_parts, "--recipe", "q8_0")
    assert result.exit_code == 0, result.output
    _assert_same_tensors(direct, via_parts)
    result = _cli("quantize", direct, tmp_path / "q4.gguf", "--recipe", "q4_protected")
    assert result.exit_code == 1 and "is already Q8_0" in result.output.strip().splitlines()[-1], result.output
    assert not (tmp_path / "q4.gguf").exists()
