"""`glmgguf convert` against the pinned upstream `convert_hf_to_gguf.py`: same tensors, same bytes, same keys."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader

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


def _kv(path: Path) -> dict[str, tuple[list[int], object]]:
    reader = GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        value = field.contents()
        out[key] = (list(field.types), value.tolist() if hasattr(value, "tolist") else value)
    return out


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
    ("outtype", "mtp"),
    [("bf16", MtpMode.KEEP), ("f32", MtpMode.KEEP), ("q8_0", MtpMode.KEEP), ("bf16", MtpMode.DROP),
     ("bf16", MtpMode.ONLY)],
    ids=["bf16", "f32", "q8_0", "bf16-no-mtp", "bf16-mtp-only"],
)
def test_same_gguf_as_upstream(tmp_path, tiny_testbed_dir, llama_toolchain, outtype, mtp):
    up, ours = _convert_both(Path(llama_toolchain.source_dir), Path(tiny_testbed_dir), tmp_path, outtype, mtp)

    cmp = bench.compare_gguf(up, ours)
    t = cmp["tensors"]
    assert not t["only_upstream"], f"tensors upstream writes and we do not: {t['only_upstream']}"
    assert not t["only_ours"], f"tensors we write and upstream does not: {t['only_ours']}"
    assert not t["shape_mismatch"], t["shape_mismatch"]
    assert not t["type_mismatch"], t["type_mismatch"]
    assert not t["data_mismatch"], f"tensor bytes differ: {t['data_mismatch']}"
    assert t["identical"] == t["count"]["upstream"] == t["count"]["ours"] > 0

    kv_up, kv_ours = _kv(up), _kv(ours)
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
