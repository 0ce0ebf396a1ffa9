"""`glmgguf convert` against the pinned upstream `convert_hf_to_gguf.py`: same tensors, same bytes, same keys."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from glmgguf.gguf.convert import convert, outtype_chooser
from glmgguf.gguf.plan import MtpMode


def _load_bench_upstream():
    path = Path(__file__).resolve().parents[1] / "bench" / "upstream.py"
    spec = importlib.util.spec_from_file_location("glmgguf_bench_upstream", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench_upstream()

# Namespaces whose every upstream key must be in our file with the same type and value.
CHECKED_PREFIXES = ("glm-dsa.", "tokenizer.")

# Keys under CHECKED_PREFIXES where ours deliberately differs from upstream: key -> why. (Outside them, e.g.
# `general.name`, upstream derives a display name from the directory/config and adds `general.size_label`,
# sampling defaults and `general.quantization_version` even for float files; those are not compared.)
INTENTIONAL_DIFFERENCES: dict[str, str] = {}

# Keys under CHECKED_PREFIXES that we write and upstream does not: key -> why it is harmless.
KNOWN_EXTRA_KEYS: dict[str, str] = {
    # Written explicitly from tokenizer_config.json (false for GLM). Upstream omits it when the config has no
    # `add_bos_token`; llama.cpp's default for the glm4 pre-tokenizer is also false, so the behaviour is equal.
    "tokenizer.ggml.add_bos_token": "explicit add_bos_token (llama.cpp's glm4 default is the same: false)",
    # The reference indexer LayerNorm eps (1e-6); read by the patched runtime, ignored by the pinned one.
    "glm-dsa.attention.indexer.layer_norm_epsilon": "indexer k_norm eps for the patched runtime",
}


def _convert_both(source_dir: Path, model_dir: Path, tmp: Path, outtype: str, mtp: MtpMode) -> tuple[Path, Path]:
    up = tmp / f"upstream-{outtype}-{mtp.value}.gguf"
    ours = tmp / f"ours-{outtype}-{mtp.value}.gguf"
    extra = {MtpMode.KEEP: (), MtpMode.DROP: ("--no-mtp",), MtpMode.ONLY: ("--mtp",)}[mtp]
    bench.run_upstream_convert(source_dir, model_dir, up, outtype, log=tmp / f"upstream-{outtype}.log",
                               extra_args=extra)
    convert(model_dir, ours, outtype_chooser(outtype), mtp=mtp, progress=False)
    return up, ours


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "outtype", "mtp"),
    [("bf16", "bf16", MtpMode.KEEP), ("bf16", "f32", MtpMode.KEEP), ("bf16", "q8_0", MtpMode.KEEP),
     ("bf16", "bf16", MtpMode.DROP), ("bf16", "bf16", MtpMode.ONLY), ("fp8", "f32", MtpMode.KEEP),
     ("fp8", "bf16", MtpMode.KEEP)],
    ids=["bf16", "f32", "q8_0", "bf16-no-mtp", "bf16-mtp-only", "fp8-source-f32", "fp8-source-bf16"],
)
def test_same_gguf_as_upstream(tmp_path, tiny_testbed_dir, tiny_fp8_testbed_dir, llama_toolchain, source, outtype,
                               mtp):
    model = Path(tiny_fp8_testbed_dir if source == "fp8" else tiny_testbed_dir)
    up, ours = _convert_both(Path(llama_toolchain.source_dir), model, tmp_path, outtype, mtp)

    cmp = bench.compare_gguf(up, ours)
    t = cmp["tensors"]
    assert not t["only_upstream"], f"tensors upstream writes and we do not: {t['only_upstream']}"
    assert not t["only_ours"], f"tensors we write and upstream does not: {t['only_ours']}"
    assert not t["shape_mismatch"], t["shape_mismatch"]
    assert not t["type_mismatch"], t["type_mismatch"]
    assert not t["data_mismatch"], f"tensor bytes differ: {t['data_mismatch']}"
    assert t["identical"] == t["count"]["upstream"] == t["count"]["ours"] > 0

    kv_up, kv_ours = bench.gguf_kv(up), bench.gguf_kv(ours)
    checked = [k for k in kv_up if k.startswith(CHECKED_PREFIXES)]
    assert any(k.startswith("glm-dsa.") for k in checked) and "tokenizer.ggml.tokens" in checked
    missing = [k for k in checked if k not in kv_ours and k not in INTENTIONAL_DIFFERENCES]
    assert not missing, f"keys upstream writes and we do not: {missing}"
    differing = {
        k: (bench.summarize(kv_up[k][1]), bench.summarize(kv_ours[k][1]))
        for k in checked
        if k in kv_ours and kv_up[k] != kv_ours[k] and k not in INTENTIONAL_DIFFERENCES
    }
    assert not differing, f"keys whose type or value differ (upstream, ours): {differing}"
    for key in ("general.architecture", "general.file_type"):
        assert kv_up[key] == kv_ours[key], key

    extra = sorted(k for k in kv_ours if k.startswith(CHECKED_PREFIXES) and k not in kv_up)
    print(f"{outtype}/{mtp.value}: keys only in ours: {extra}; "
          f"provenance: {sorted(k for k in kv_ours if k.startswith('glmgguf.'))}")
    unexplained = [k for k in extra if k not in KNOWN_EXTRA_KEYS]
    assert not unexplained, f"keys we write that upstream does not (explain them in KNOWN_EXTRA_KEYS): {unexplained}"


@pytest.mark.slow
def test_fp8_recipe_same_bytes_as_upstream_and_llama_quantize(tmp_path, tiny_fp8_testbed_dir, llama_toolchain):
    """One-pass `convert --recipe q4_protected` from the block-FP8 source equals the upstream converter's F32 GGUF
    of the same checkpoint quantized by the pinned llama-quantize with the recipe's command line."""
    import shlex
    import subprocess

    from click.testing import CliRunner

    from glmgguf.cli import main

    up = tmp_path / "upstream-f32.gguf"
    bench.run_upstream_convert(Path(llama_toolchain.source_dir), Path(tiny_fp8_testbed_dir), up, "f32",
                               log=tmp_path / "upstream.log")
    ref = tmp_path / "ref.gguf"
    args = CliRunner().invoke(main, ["recipes", "q4_protected", "--llama-quantize-args", str(up), "--out", str(ref)])
    cmd = shlex.split(args.stdout.strip().splitlines()[-1])
    proc = subprocess.run([str(llama_toolchain.quantize), *cmd[1:], "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = tmp_path / "ours.gguf"
    result = CliRunner().invoke(main, ["convert", str(tiny_fp8_testbed_dir), str(ours), "--recipe", "q4_protected",
                                       "--threads", "2"])
    assert result.exit_code == 0, result.output
    t = bench.compare_gguf(ref, ours)["tensors"]
    assert t["identical"] == t["count"]["upstream"] == t["count"]["ours"] > 0, t
