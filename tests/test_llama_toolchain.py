"""The pinned llama.cpp toolchain: real build, tools, shared libs, binding, server, patches."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from glmgguf.cli import main
from glmgguf.llama import (
    LlamaServer,
    LlamaServerError,
    LlamaSourceError,
    Toolchain,
    ensure_toolchain,
    find_toolchain,
    llama_cpp_module,
)
from glmgguf.llama.build import TOOLS, series_patches, toolchain_from_build_dir
from glmgguf.llama.seed import compiled_objects, seed_build_dir

REPO = Path(__file__).resolve().parents[1]
APPLY = REPO / "patches" / "apply.py"


@pytest.fixture(autouse=True)
def _no_build_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLMGGUF_LLAMA_BUILD", raising=False)


# --- source validation (no build needed) -------------------------------------------------------------

def test_bad_source_is_rejected_clearly(tmp_path: Path) -> None:
    with pytest.raises(LlamaSourceError, match="not a directory"):
        ensure_toolchain(source=tmp_path / "nope")
    with pytest.raises(LlamaSourceError, match="missing CMakeLists.txt, src/models/glm-dsa.cpp"):
        ensure_toolchain(source=tmp_path)
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    with pytest.raises(LlamaSourceError, match="glm-dsa"):
        ensure_toolchain(source=tmp_path)


def test_cli_bad_source(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["llama", "build", "--source", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a usable llama.cpp source tree" in result.output


# --- patches/apply.py on a scratch tree ----------------------------------------------------------------

def _patch(name: str, old: str, new: str) -> str:
    return f"--- a/{name}\n+++ b/{name}\n@@ -1,3 +1,3 @@\n one\n-{old}\n+{new}\n three\n"


def _apply(action: str, tree: Path, series: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(APPLY), action, "--llama-cpp", str(tree), "--series", str(series), *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_apply_idempotent_and_all_or_none(tmp_path: Path) -> None:
    tree, pdir = tmp_path / "tree", tmp_path / "p"
    tree.mkdir()
    pdir.mkdir()
    for f in ("a.txt", "b.txt"):
        (tree / f).write_text("one\ntwo\nthree\n")
    (pdir / "1.patch").write_text(_patch("a.txt", "two", "TWO"))
    (pdir / "2.patch").write_text(_patch("b.txt", "two", "2"))
    (pdir / "bad.patch").write_text(_patch("b.txt", "zzz", "y"))
    series = pdir / "series"
    series.write_text("# against test\n1.patch\n\n2.patch\n")

    assert _apply("check", tree, series).returncode == 0
    assert _apply("apply", tree, series, "--dry-run").returncode == 0
    assert (tree / "a.txt").read_text() == "one\ntwo\nthree\n"
    out = _apply("apply", tree, series)
    assert out.returncode == 0, out.stdout
    assert (tree / "a.txt").read_text() == "one\nTWO\nthree\n"
    assert (tree / "b.txt").read_text() == "one\n2\nthree\n"
    again = _apply("apply", tree, series)
    assert again.returncode == 0 and "nothing to apply" in again.stdout
    assert _apply("revert", tree, series).returncode == 0
    assert _apply("revert", tree, series).returncode == 0
    assert (tree / "a.txt").read_text() == (tree / "b.txt").read_text() == "one\ntwo\nthree\n"

    series.write_text("1.patch\nbad.patch\n")
    out = _apply("apply", tree, series)
    assert out.returncode == 1 and "bad.patch" in out.stdout
    assert (tree / "a.txt").read_text() == "one\ntwo\nthree\n"  # nothing applied


# --- a patched build seeded from a finished one (a toy CMake project) -----------------------------------------

TOY = {
    "CMakeLists.txt": "cmake_minimum_required(VERSION 3.13)\nproject(toy C)\n"
                      "set(CMAKE_BUILD_RPATH_USE_ORIGIN ON)\nadd_library(core SHARED a.c b.c)\n"
                      "add_executable(app main.c)\ntarget_link_libraries(app core)\n",
    "value.h": "#define VALUE 1\n",
    "a.c": '#include "value.h"\nint a(void) { return VALUE; }\n',
    "b.c": "int b(void) { return 10; }\n",
    "main.c": '#include <stdio.h>\nint a(void); int b(void);\nint main(void) { printf("%d", a() + b()); }\n',
}


def _toy_build(source: Path, build: Path) -> list[str]:
    for cmd in (["cmake", "-S", str(source), "-B", str(build)], ["cmake", "--build", str(build)]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    return compiled_objects(out.stdout)


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("make") and shutil.which("cc")),
                    reason="needs cmake, make and a C compiler")
def test_seeded_build_recompiles_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMAKE_GENERATOR", raising=False)
    plain = tmp_path / "plain"
    for name, text in TOY.items():
        (plain / name).parent.mkdir(parents=True, exist_ok=True)
        (plain / name).write_text(text)
    assert len(_toy_build(plain, tmp_path / "done.partial" / "build")) == 3
    (tmp_path / "done.partial").rename(tmp_path / "done")  # as a finished cache entry is
    patched = tmp_path / "patched"
    shutil.copytree(plain, patched)
    time.sleep(0.05)
    (patched / "value.h").write_text("#define VALUE 2\n")

    assert seed_build_dir(tmp_path / "done" / "build", patched, tmp_path / "p" / "build")
    assert _toy_build(patched, tmp_path / "p" / "build") == ["CMakeFiles/core.dir/a.c.o"]
    run = [str(tmp_path / d / "build" / "app") for d in ("done", "p")]
    assert [subprocess.run([r], capture_output=True, text=True).stdout for r in run] == ["11", "12"]
    assert "patched" not in (tmp_path / "done" / "build" / "CMakeCache.txt").read_text()


def test_seed_refuses_a_ninja_build(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (done / "CMakeCache.txt").write_text(f"CMAKE_CACHEFILE_DIR:INTERNAL={done}\n"
                                         f"CMAKE_HOME_DIRECTORY:INTERNAL={tmp_path / 'src'}\n"
                                         "CMAKE_GENERATOR:INTERNAL=Ninja\n")
    assert not seed_build_dir(done, tmp_path / "src2", tmp_path / "new")
    assert not (tmp_path / "new").exists() and "Ninja" in caplog.text


# --- the real build ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tools_exist_and_run(llama_toolchain: Toolchain) -> None:
    tc = llama_toolchain
    assert [tc.server, tc.quantize, tc.perplexity, tc.imatrix, tc.gguf_split]
    for name in TOOLS:
        if name == "llama-quantize":  # no --version; --help prints usage and exits 1
            out = subprocess.run([tc.tool(name), "--help"], capture_output=True, text=True, timeout=60)
            assert "usage:" in out.stdout + out.stderr
        else:
            out = subprocess.run([tc.tool(name), "--version"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "version:" in out.stdout + out.stderr, (name, out)
    assert tc.python_package_dir is not None
    assert (tc.python_package_dir / "llama_cpp" / "__init__.py").is_file()
    assert tc.patched == []


@pytest.mark.slow
def test_shared_libs_load_with_ctypes(llama_toolchain: Toolchain) -> None:
    base = ctypes.CDLL(str(llama_toolchain.lib_dir / "libggml-base.so"))
    assert base.ggml_row_size and base.ggml_quantize_chunk
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    assert base.ggml_row_size(0, 256) == 1024  # GGML_TYPE_F32
    assert ctypes.CDLL(str(llama_toolchain.lib_dir / "libllama.so")).llama_model_load_from_file


@pytest.mark.slow
def test_cached_build_is_reused_instantly(llama_toolchain: Toolchain,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"cached lookup ran a subprocess: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    t0 = time.perf_counter()
    again = ensure_toolchain()
    assert time.perf_counter() - t0 < 1.0
    assert again == llama_toolchain
    assert find_toolchain() == llama_toolchain
    patched = find_toolchain(patches=True)  # the series is part of the cache key: never the plain build
    assert patched is None or (patched != llama_toolchain and patched.patched)


@pytest.mark.slow
def test_existing_build_dir_override(llama_toolchain: Toolchain, monkeypatch: pytest.MonkeyPatch) -> None:
    build_dir = llama_toolchain.bin_dir.parent
    monkeypatch.setenv("GLMGGUF_LLAMA_BUILD", str(build_dir))
    tc = ensure_toolchain()
    assert tc.bin_dir == llama_toolchain.bin_dir and tc.source_dir == llama_toolchain.source_dir
    assert tc.python_package_dir == llama_toolchain.python_package_dir
    assert toolchain_from_build_dir(build_dir.parent) == llama_toolchain
    with pytest.raises(Exception, match="no llama-server"):
        toolchain_from_build_dir(build_dir / "CMakeFiles")


@pytest.mark.slow
def test_cli_where(llama_toolchain: Toolchain) -> None:
    result = CliRunner().invoke(main, ["llama", "where"])
    assert result.exit_code == 0 and str(llama_toolchain.bin_dir) in result.output


@pytest.mark.slow
def test_patch_check_on_pinned_tree(llama_toolchain: Toolchain) -> None:
    cmd = [sys.executable, str(APPLY), "check", "--llama-cpp", str(llama_toolchain.source_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    n = len(series_patches())
    assert out.returncode == 0 and f"{n} patches" in out.stdout and out.stdout.count("not applied") == n


# --- a tiny llama-arch GGUF: binding logits and llama-server ------------------------------------------------

N_EMBD, N_FF, N_HEAD, N_LAYER = 64, 128, 4, 2


@pytest.fixture(scope="module")
def tiny_gguf(llama_toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-layer llama GGUF whose blocks add nothing (zero output projections): logits are closed-form."""
    import gguf

    vocab = gguf.GGUFReader(llama_toolchain.source_dir / "models" / "ggml-vocab-llama-spm.gguf")
    rng = np.random.default_rng(0)
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].contents())
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    for key, field in vocab.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type)
    t = {
        "token_embd.weight": rng.standard_normal((n_vocab, N_EMBD)),
        "output_norm.weight": 1 + 0.1 * rng.standard_normal(N_EMBD),
        "output.weight": rng.standard_normal((n_vocab, N_EMBD)) / 8,
    }
    for i in range(N_LAYER):
        shapes = {"attn_q": (N_EMBD, N_EMBD), "attn_k": (N_EMBD, N_EMBD), "attn_v": (N_EMBD, N_EMBD),
                  "ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD)}
        for name, shape in shapes.items():
            t[f"blk.{i}.{name}.weight"] = rng.standard_normal(shape) / 8
        t[f"blk.{i}.attn_output.weight"] = np.zeros((N_EMBD, N_EMBD))
        t[f"blk.{i}.ffn_down.weight"] = np.zeros((N_EMBD, N_FF))
        t[f"blk.{i}.attn_norm.weight"] = np.ones(N_EMBD)
        t[f"blk.{i}.ffn_norm.weight"] = np.ones(N_EMBD)
    t = {k: v.astype(np.float32) for k, v in t.items()}
    for k, v in t.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, t


@pytest.mark.slow
def test_binding_logits_match_closed_form(llama_toolchain: Toolchain, tiny_gguf: tuple[Path, dict]) -> None:
    path, t = tiny_gguf
    llama_cpp = llama_cpp_module(llama_toolchain)
    assert llama_cpp.__version__ == "0.3.36"
    assert Path(llama_cpp.llama_cpp._lib._name).parent == llama_toolchain.lib_dir
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, type_k=0, type_v=0, n_threads=2,
                          verbose=False)
    tokens = llm.tokenize(b"Hello world, this is a test")
    llm.eval(tokens)
    got = np.asarray(llm.scores[: len(tokens)])
    x = t["token_embd.weight"][tokens]
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * t["output_norm.weight"]
    want = x @ t["output.weight"].T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_server_chat_and_completion(llama_toolchain: Toolchain, tiny_gguf: tuple[Path, dict]) -> None:
    with LlamaServer(tiny_gguf[0], ["-c", "256", "-t", "2", "-np", "1"], toolchain=llama_toolchain) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        out = srv.completion("Hello", n_predict=4, temperature=0)
        assert out["tokens_predicted"] == 4
        chat = srv.chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert chat["choices"][0]["message"]["role"] == "assistant"
        proc = srv.proc
    assert proc is not None and proc.poll() is not None  # stopped on exit


@pytest.mark.slow
def test_server_fails_fast_with_log_tail(llama_toolchain: Toolchain, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(LlamaServerError, match="exited") as err:
        with LlamaServer(tmp_path / "missing.gguf", toolchain=llama_toolchain, startup_timeout=120):
            pass
    assert time.monotonic() - t0 < 60
    assert "missing.gguf" in str(err.value)
