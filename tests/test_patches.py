"""The llama.cpp patch series: the apply script on scratch trees, per-layer expert counts end to end, parity.

The parity tests of tests/test_convert.py are repeated here against the patched runtime. One process can hold one
libllama only, so llama.cpp logits are computed in a child process (`glmgguf.parity.llama_logits_isolated`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType

from glmgguf.cli import main
from glmgguf.gguf.convert import convert, outtype_chooser
from glmgguf.gguf.plan import IndexerMode, MtpMode
from glmgguf.layout import GlmLayout
from glmgguf.llama import LlamaServer, LlamaServerError, Toolchain, ensure_toolchain
from glmgguf.llama.build import META, build_key
from glmgguf.llama.patches import PER_LAYER_EXPERTS, SERIES, apply_module
from glmgguf.llama.source import (
    PINNED_LLAMA_CPP_COMMIT,
    PINNED_LLAMA_CPP_PYTHON,
    fetch_pinned_source,
    pinned_identity,
)
from glmgguf.parity import kl_stats, llama_logits_isolated, masked_transformers_logits, transformers_logits
from glmgguf.reap.prune import PrunePlan, prune_checkpoint

REPO = Path(__file__).resolve().parents[1]
APPLY = REPO / "patches" / "apply.py"
N_TOKENS = 160
# routed experts kept per MoE block of the 16-expert testbed (block 4 is the MTP block)
NON_UNIFORM = {1: 12, 2: 9, 3: 14, 4: 10}

apply_py = apply_module()
ENTRIES = apply_py.read_entries(SERIES)


# --- helpers ---------------------------------------------------------------------------------------------------

def keep_map(counts: dict[int, int], n_experts: int, seed: int = 0) -> dict[int, list[int]]:
    """A random subset of experts per block (ascending ids; position = new id)."""
    rng = random.Random(seed)
    return {L: sorted(rng.sample(range(n_experts), n)) for L, n in counts.items()}


def slice_experts(src: Path, out: Path, keep: dict[int, list[int]]) -> Path:
    """A REAP-style prune of `src` keeping experts `keep[L]` of every MoE block L (renumbered 0..n-1)."""
    n = {x.index: x.n_experts for x in GlmLayout.from_dir(src).moe_layers}
    plan = PrunePlan(keep=keep, source_experts=n, metric="manual", per_layer="global")
    return prune_checkpoint(src, plan, out).out


def _kv(reader: GGUFReader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


# --- the series on the pinned source (scratch copies) ----------------------------------------------------------

@pytest.fixture(scope="module")
def pinned_tree() -> Path:
    """The pinned llama.cpp source (read only; tests copy what they change)."""
    return fetch_pinned_source().llama_cpp_dir


def _touched() -> list[str]:
    files: list[str] = []
    for p in ENTRIES:
        files += [f for f in p.files() if f not in files]
    return files


@pytest.fixture
def scratch_tree(pinned_tree: Path, tmp_path: Path) -> Path:
    """The files the series touches, copied from the pinned source, plus its submodule-style `.git` file."""
    tree = tmp_path / "llama.cpp"
    for rel in [*_touched(), "CMakeLists.txt"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pinned_tree / rel, tree / rel)
    (tree / ".git").write_text("gitdir: ../../.git/modules/vendor/llama.cpp\n")  # as in the sdist: a dead link
    return tree


def _digest(tree: Path) -> dict[str, str]:
    return {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file() and ".git" not in p.relative_to(tree).parts}


def _apply(action: str, tree: Path, *extra: str, isolated: bool = True) -> subprocess.CompletedProcess[str]:
    """patches/apply.py as a user runs it; `-I -S`: no site-packages, proving it needs the stdlib only."""
    flags = ["-I", "-S"] if isolated else []
    return subprocess.run([sys.executable, *flags, str(APPLY), action, "--llama-cpp", str(tree), *extra],
                          capture_output=True, text=True)


def test_series_names_upstream_version_and_files() -> None:
    assert [p.name for p in ENTRIES][0] == PER_LAYER_EXPERTS
    for p in ENTRIES:
        assert PINNED_LLAMA_CPP_COMMIT in p.upstream and PINNED_LLAMA_CPP_PYTHON in p.upstream, p
        text = p.path.read_text()
        assert text.startswith("From ") and "Subject: [PATCH" in text  # git format-patch, with a message
        assert p.files() and p.preimages()


def test_series_applies_cleanly_and_is_idempotent(scratch_tree: Path, pinned_tree: Path) -> None:
    before = _digest(scratch_tree)
    out = _apply("check", scratch_tree)
    assert out.returncode == 0 and out.stdout.count("not applied") == len(ENTRIES), out.stdout
    dry = _apply("apply", scratch_tree, "--dry-run")
    assert dry.returncode == 0 and "would apply" in dry.stdout and _digest(scratch_tree) == before
    out = _apply("apply", scratch_tree)
    assert out.returncode == 0, out.stdout
    patched = _digest(scratch_tree)
    assert patched != before
    assert "n_expert_layer" in (scratch_tree / "src/models/glm-dsa.cpp").read_text()
    again = _apply("apply", scratch_tree)
    assert again.returncode == 0 and "nothing to apply" in again.stdout and _digest(scratch_tree) == patched
    check = _apply("check", scratch_tree)
    assert check.returncode == 0 and check.stdout.count("  applied") == len(ENTRIES)
    dry = _apply("revert", scratch_tree, "--dry-run")
    assert dry.returncode == 0 and "would revert" in dry.stdout and _digest(scratch_tree) == patched
    out = _apply("revert", scratch_tree)
    assert out.returncode == 0 and _digest(scratch_tree) == before, out.stdout
    out = _apply("revert", scratch_tree)
    assert out.returncode == 0 and "nothing to revert" in out.stdout and _digest(scratch_tree) == before


def test_partly_applied_series_completes(scratch_tree: Path) -> None:
    first = subprocess.run(["patch", "-p1", "-s", "-i", str(ENTRIES[0].path)], cwd=scratch_tree)
    assert first.returncode == 0
    out = _apply("check", scratch_tree)
    assert out.returncode == 0 and out.stdout.count("  applied") == 1, out.stdout
    assert _apply("apply", scratch_tree).returncode == 0
    assert _apply("check", scratch_tree).stdout.count("  applied") == len(ENTRIES)


def test_local_edit_in_a_hunk_is_refused_untouched(scratch_tree: Path) -> None:
    f = scratch_tree / "src/models/glm-dsa.cpp"
    text = f.read_text()
    assert text.count("n_expert, n_expert_used,") == 2
    f.write_text(text.replace("n_expert, n_expert_used,", "n_expert, /* mine */ n_expert_used,", 1))
    before = _digest(scratch_tree)
    for action in ("check", "apply", "revert"):
        out = _apply(action, scratch_tree)
        assert out.returncode == 1, (action, out.stdout)
        assert PER_LAYER_EXPERTS in out.stdout and "src/models/glm-dsa.cpp" in out.stdout
        assert "Nothing was changed" in out.stdout
    assert _digest(scratch_tree) == before


def test_local_edit_elsewhere_still_applies(scratch_tree: Path) -> None:
    f = scratch_tree / "src/models/glm-dsa.cpp"
    f.write_text("// a local note at the top\n" + f.read_text())
    assert _apply("apply", scratch_tree).returncode == 0
    assert f.read_text().startswith("// a local note") and "n_expert_layer" in f.read_text()
    assert _apply("revert", scratch_tree).returncode == 0
    assert "n_expert_layer" not in f.read_text()


def test_wrong_upstream_version_names_the_expected_one(scratch_tree: Path) -> None:
    """A tree from another llama.cpp: the lines around the hunks moved on (as an upstream refactor does)."""
    for rel, old, new in [
        ("src/llama-model.cpp", "    ml.get_key(LLM_KV_EXPERT_COUNT,            hparams.n_expert,        false);",
         "    ml.get_key(LLM_KV_EXPERT_COUNT, hparams.n_expert, false); // refactored upstream"),
        ("src/models/glm-dsa.cpp", "n_expert, n_expert_used,", "hparams.n_expert, hparams.n_expert_used(),"),
        ("src/llama-hparams.h", "    uint32_t indexer_top_k     = 0;", "    uint32_t indexer_top_k = 0;"),
    ]:
        f = scratch_tree / rel
        assert old in f.read_text(), rel
        f.write_text(f.read_text().replace(old, new))
    (scratch_tree / ".git").unlink()
    subprocess.run(["git", "init", "-q"], cwd=scratch_tree, check=True, capture_output=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=scratch_tree, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "other"], cwd=scratch_tree, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=scratch_tree, capture_output=True, text=True).stdout
    before = _digest(scratch_tree)
    out = _apply("apply", scratch_tree)
    assert out.returncode == 1
    assert f"made against llama.cpp {PINNED_LLAMA_CPP_COMMIT} (llama-cpp-python {PINNED_LLAMA_CPP_PYTHON})" \
        in out.stdout, out.stdout
    assert "src/llama-model.cpp" in out.stdout and "src/models/glm-dsa.cpp" in out.stdout
    assert f"git HEAD {head[:12]}" in out.stdout
    assert _digest(scratch_tree) == before


def test_git_checkout_apply_and_revert(scratch_tree: Path) -> None:
    (scratch_tree / ".git").unlink()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "upstream"]):
        subprocess.run([*git, *cmd], cwd=scratch_tree, check=True, capture_output=True)
    assert _apply("apply", scratch_tree).returncode == 0
    status = subprocess.run(["git", "status", "--porcelain"], cwd=scratch_tree, capture_output=True, text=True)
    changed = {line[3:] for line in status.stdout.splitlines()}
    assert changed == set(_touched())
    assert _apply("revert", scratch_tree).returncode == 0
    status = subprocess.run(["git", "status", "--porcelain"], cwd=scratch_tree, capture_output=True, text=True)
    assert status.stdout == ""


def test_cli_wraps_the_script(scratch_tree: Path) -> None:
    r = CliRunner().invoke(main, ["patch", "check", "--llama-cpp", str(scratch_tree)])
    assert r.exit_code == 0 and r.output.count("not applied") == len(ENTRIES), r.output
    r = CliRunner().invoke(main, ["patch", "apply", "--llama-cpp", str(scratch_tree), "--dry-run"])
    assert r.exit_code == 0 and "would apply" in r.output
    r = CliRunner().invoke(main, ["patch", "apply", "--llama-cpp", str(scratch_tree)])
    assert r.exit_code == 0 and f"apply: {len(ENTRIES)} patches" in r.output
    r = CliRunner().invoke(main, ["patch", "revert", "--llama-cpp", str(scratch_tree)])
    assert r.exit_code == 0 and f"revert: {len(ENTRIES)} patches" in r.output
    (scratch_tree / "src/models/glm-dsa.cpp").write_text("// not llama.cpp\n")
    r = CliRunner().invoke(main, ["patch", "apply", "--llama-cpp", str(scratch_tree)])
    assert r.exit_code == 1 and "Nothing was changed" in r.output


# --- converter: per-layer expert counts ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nonuniform_tiny(tiny_testbed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    keep = keep_map(NON_UNIFORM, 16)
    return slice_experts(tiny_testbed_dir, tmp_path_factory.mktemp("nonuniform") / "tiny", keep)


def test_convert_writes_per_layer_counts(tmp_path: Path, nonuniform_tiny: Path) -> None:
    assert GlmLayout.from_dir(nonuniform_tiny).uniform_experts is None
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(nonuniform_tiny), str(out), "--outtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert PER_LAYER_EXPERTS in r.output and "glmgguf llama build --patches" in r.output
    rd = GGUFReader(out)
    field = rd.fields["glm-dsa.expert_count"]
    assert field.types == [GGUFValueType.ARRAY, GGUFValueType.UINT32]
    assert field.contents() == [0, *NON_UNIFORM.values()]
    assert _kv(rd, "glmgguf.requires_patches") == [PER_LAYER_EXPERTS]
    shapes = {t.name: list(t.shape) for t in rd.tensors}
    for L, n in NON_UNIFORM.items():
        assert shapes[f"blk.{L}.ffn_gate_inp.weight"][-1] == n and shapes[f"blk.{L}.ffn_up_exps.weight"][-1] == n

    q8 = tmp_path / "q8.gguf"  # GGUF -> GGUF quantization keeps the per-layer counts and the requirement
    r = CliRunner().invoke(main, ["quantize", str(out), str(q8), "--recipe", "q8_0"])
    assert r.exit_code == 0, r.output
    assert _kv(GGUFReader(q8), "glm-dsa.expert_count") == [0, *NON_UNIFORM.values()]
    assert _kv(GGUFReader(q8), "glmgguf.requires_patches") == [PER_LAYER_EXPERTS]

    drop = tmp_path / "drop.gguf"
    convert(nonuniform_tiny, drop, outtype_chooser("bf16"), MtpMode.DROP, progress=False)
    assert _kv(GGUFReader(drop), "glm-dsa.expert_count") == [0, 12, 9, 14]


def test_uniform_counts_stay_scalar(tmp_path: Path, tiny_testbed_dir: Path) -> None:
    """Only the MTP block differs: dropping it leaves one count, which the unpatched runtime reads."""
    src = slice_experts(tiny_testbed_dir, tmp_path / "src", keep_map({1: 12, 2: 12, 3: 12, 4: 8}, 16))
    out = tmp_path / "m.gguf"
    res = convert(src, out, outtype_chooser("bf16"), MtpMode.DROP, progress=False)
    rd = GGUFReader(out)
    assert _kv(rd, "glm-dsa.expert_count") == 12 and "glmgguf.requires_patches" not in rd.fields
    assert not res.requires_patches


# --- transformers: masking removed experts out of routing == pruning -------------------------------------------

def test_masked_unpruned_equals_pruned_in_transformers(tmp_path: Path, tiny_testbed_dir: Path) -> None:
    keep = keep_map({1: 10, 2: 10, 3: 10, 4: 10}, 16, seed=1)
    pruned = slice_experts(tiny_testbed_dir, tmp_path / "pruned", keep)
    ids = list(range(5, 5 + 96))
    ref_pruned = masked_transformers_logits(pruned, ids)
    ref_masked = masked_transformers_logits(tiny_testbed_dir, ids, keep)
    full = masked_transformers_logits(tiny_testbed_dir, ids)
    stats = kl_stats(ref_pruned, ref_masked)
    print(f"masked unpruned vs pruned: {stats}, max |dlogit| {float((ref_pruned - ref_masked).abs().max()):.2e}")
    assert torch.allclose(ref_pruned, ref_masked, atol=1e-5, rtol=1e-5)
    assert stats.mean < 1e-10
    # and the masking matters: the removed experts were being routed to
    assert kl_stats(full, ref_masked).mean > 100 * max(stats.mean, 1e-12)
    assert float((full - ref_masked).abs().max()) > 1e-3


# --- the patched runtime ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def patched_toolchain() -> Toolchain:
    """llama.cpp with patches/llama.cpp/series applied (a separate cached build from the plain one's objects).

    GLMGGUF_LLAMA_BUILD (a build of one's own, usually unpatched) is ignored here.
    """
    saved = os.environ.pop("GLMGGUF_LLAMA_BUILD", None)
    try:
        return ensure_toolchain(patches=True)
    finally:
        if saved is not None:
            os.environ["GLMGGUF_LLAMA_BUILD"] = saved


@pytest.fixture(scope="module")
def parity_ids(trained_testbed_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    from glmgguf.testbed.train import stdlib_corpus

    tok = AutoTokenizer.from_pretrained(trained_testbed_dir)
    ids = tok("".join(stdlib_corpus("heldout"))[:20000])["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS > GlmLayout.from_dir(trained_testbed_dir).index_topk  # sparse DSA active
    return ids


@pytest.fixture(scope="module")
def reference_logits(trained_testbed_dir: Path, parity_ids: list[int]) -> torch.Tensor:
    return transformers_logits(trained_testbed_dir, parity_ids)


@pytest.mark.slow
def test_patched_build(patched_toolchain: Toolchain) -> None:
    assert patched_toolchain.patched == [p.name for p in ENTRIES]
    assert (patched_toolchain.source_dir / "src/models/glm-dsa.cpp").read_text().count("n_expert_layer") >= 3
    out = subprocess.run([sys.executable, str(APPLY), "check", "--llama-cpp", str(patched_toolchain.source_dir)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("  applied") == len(ENTRIES)
    # cached: reports the patched build at once
    r = CliRunner(env={"GLMGGUF_LLAMA_BUILD": None}).invoke(main, ["llama", "build", "--patches"])
    assert r.exit_code == 0 and str(patched_toolchain.bin_dir) in r.output and PER_LAYER_EXPERTS in r.output


def _dep_paths(dep_file: Path) -> set[str]:
    """The absolute paths a compiler dependency file names, normalised (`src/models/../x.h` is `src/x.h`)."""
    return {os.path.normpath(t) for t in dep_file.read_text().replace("\\\n", " ").split() if t.startswith("/")}


@pytest.mark.slow
def test_patched_build_recompiles_only_what_the_patches_touch(patched_toolchain: Toolchain) -> None:
    """The patched build starts from the plain build's objects: only what depends on a changed file compiles.

    Changed are the patched files and the two version stamps CMake writes from the source's git state (the
    patched copy has none, so it reports commit "unknown").
    """
    entry = patched_toolchain.bin_dir.parent.parent
    meta = json.loads((entry / META).read_text())
    if "compiled_objects" not in meta:
        pytest.skip(f"{entry} was built before patched builds reused the plain build's objects")
    assert Path(meta["seeded_from"]).name == build_key(pinned_identity(), [], "cpu")
    build = entry / "build"
    changed = sorted({f"/source/{f}" for e in ENTRIES for f in e.files()})
    changed += ["/build/ggml/src/ggml-version.h", "/build/common/build-info.cpp"]
    deps = {str(d.relative_to(build))[:-2]: _dep_paths(d) for d in build.rglob("*.o.d")}
    dependents = sorted(obj for obj, paths in deps.items() if any(p.endswith(f) for p in paths for f in changed))
    assert dependents and meta["compiled_objects"] == dependents
    assert len(dependents) < len(deps) / 4  # measured: 35 of 202


@pytest.mark.slow
@pytest.mark.parametrize("indexer", ["native", "duplicate"])
@pytest.mark.parametrize("mtp", ["keep", "drop"])
def test_patched_f32_logit_parity(tmp_path, patched_toolchain, trained_testbed_dir, parity_ids, reference_logits,
                                  indexer, mtp):
    """tests/test_convert.py::test_f32_logit_parity, unchanged, on the patched runtime."""
    out = tmp_path / "model.gguf"
    convert(trained_testbed_dir, out, outtype_chooser("f32"), MtpMode(mtp), IndexerMode(indexer), progress=False)
    stats = kl_stats(reference_logits, llama_logits_isolated(patched_toolchain, out, parity_ids))
    print(f"patched f32 indexer={indexer} mtp={mtp}: {stats}")
    assert stats.mean < 1e-5, stats
    assert stats.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("outtype", "bound"), [("bf16", 5e-3), ("q8_0", 2e-2)])
def test_patched_lower_precision_kl(tmp_path, patched_toolchain, trained_testbed_dir, parity_ids, reference_logits,
                                    outtype, bound):
    """tests/test_convert.py::test_lower_precision_kl, unchanged, on the patched runtime."""
    out = tmp_path / "model.gguf"
    convert(trained_testbed_dir, out, outtype_chooser(outtype), progress=False)
    stats = kl_stats(reference_logits, llama_logits_isolated(patched_toolchain, out, parity_ids))
    print(f"patched {outtype}: {stats}")
    assert stats.mean < bound, stats
    assert stats.top1_agreement > 0.9


@pytest.fixture(scope="module")
def nonuniform_trained(trained_testbed_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    keep = keep_map(NON_UNIFORM, 16)
    d = tmp_path_factory.mktemp("nonuniform-trained")
    src = slice_experts(trained_testbed_dir, d / "ckpt", keep)
    gguf_path = d / "model-f32.gguf"
    convert(src, gguf_path, outtype_chooser("f32"), progress=False)
    return keep, gguf_path


@pytest.mark.slow
def test_nonuniform_matches_masked_reference(tmp_path, patched_toolchain, trained_testbed_dir, parity_ids,
                                             reference_logits, nonuniform_trained):
    keep, gguf_path = nonuniform_trained
    ref = masked_transformers_logits(trained_testbed_dir, parity_ids, keep)
    got = llama_logits_isolated(patched_toolchain, gguf_path, parity_ids)
    stats = kl_stats(ref, got)
    print(f"non-uniform {NON_UNIFORM} f32, patched llama.cpp vs masked transformers: {stats}")
    assert stats.mean < 1e-5, stats
    assert stats.top1_agreement == 1.0
    # the pruned model really is a different function from the unpruned one
    assert kl_stats(reference_logits, got).mean > 100 * stats.mean


@pytest.mark.slow
def test_nonuniform_serves_in_patched_server(patched_toolchain, nonuniform_trained) -> None:
    _, gguf_path = nonuniform_trained
    with LlamaServer(gguf_path, ["-c", "512", "-t", "2", "-np", "1", "-lv", "4"],
                     toolchain=patched_toolchain) as srv:
        out = srv.completion("def main(", n_predict=8, temperature=0)
        assert out["tokens_predicted"] == 8
    assert "n_expert              = [0, 12, 9, 14, 10]" in srv.log_path.read_text()


@pytest.mark.slow
def test_unpatched_runtime_refuses_nonuniform(llama_toolchain, nonuniform_trained) -> None:
    _, gguf_path = nonuniform_trained
    with pytest.raises(LlamaServerError, match="exited") as err:
        with LlamaServer(gguf_path, ["-c", "512", "-t", "2"], toolchain=llama_toolchain, startup_timeout=120):
            pass
    # the pinned loader reads expert_count as one u32: an array fails loudly instead of loading garbage
    assert "key glm-dsa.expert_count has wrong type arr but expected type u32" in str(err.value)


@pytest.mark.slow
def test_indexer_norm_eps_from_metadata(tmp_path, patched_toolchain, llama_toolchain, trained_testbed_dir,
                                        parity_ids, reference_logits):
    """The converter writes eps 1e-6 (the reference's); the patched runtime uses it, eps 0 is the old behaviour."""
    out = tmp_path / "model.gguf"
    convert(trained_testbed_dir, out, outtype_chooser("f32"), progress=False)
    assert GGUFReader(out).fields["glm-dsa.attention.indexer.layer_norm_epsilon"].contents() == pytest.approx(1e-6)
    key = "glm-dsa.attention.indexer.layer_norm_epsilon"
    logits = {e: llama_logits_isolated(patched_toolchain, out, parity_ids, kv_overrides={key: e})
              for e in (0.0, 1e-3)}
    logits[1e-6] = llama_logits_isolated(patched_toolchain, out, parity_ids)
    stats = {e: kl_stats(reference_logits, x) for e, x in logits.items()}
    for e, st in stats.items():
        print(f"indexer k_norm eps {e:g}: {st}, max |dlogit| vs eps 1e-6 "
              f"{float((logits[e] - logits[1e-6]).abs().max()):.2e}")
    assert stats[1e-6].mean < 1e-5 and stats[0.0].mean < 1e-5
    # the eps only moves indexer scores, i.e. which keys are selected: 1e-3 is enough to flip selections, which
    # shows the key is read (at 1e-6 vs 0 this testbed's selections, hence its logits, stay the same)
    assert float((logits[1e-3] - logits[1e-6]).abs().max()) > 1e-3


@pytest.mark.slow
def test_indexer_cache_type(patched_toolchain, nonuniform_trained, monkeypatch) -> None:
    _, gguf_path = nonuniform_trained
    monkeypatch.setenv("LLAMA_DSA_INDEXER_CACHE_TYPE", "f32")
    with LlamaServer(gguf_path, ["-c", "512", "-t", "2", "-np", "1", "-ctk", "f16", "-lv", "4"],
                     toolchain=patched_toolchain) as srv:
        assert srv.completion("x = ", n_predict=2, temperature=0)["tokens_predicted"] == 2
    log = srv.log_path.read_text()
    assert "indexer key cache type f32 (LLAMA_DSA_INDEXER_CACHE_TYPE)" in log
    assert "K (f32)" in log and "K (f16)" in log  # the indexer cache f32, the main cache f16
    monkeypatch.setenv("LLAMA_DSA_INDEXER_CACHE_TYPE", "f31")
    with pytest.raises(LlamaServerError, match="unknown ggml type 'f31'"):
        with LlamaServer(gguf_path, ["-c", "512", "-t", "2"], toolchain=patched_toolchain, startup_timeout=120):
            pass
