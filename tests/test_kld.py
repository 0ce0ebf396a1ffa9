"""KL divergence against the F32 GGUF with the pinned llama-perplexity: output parsing, the `glmgguf kld` command,
and the order of the shipped recipes on the trained tiny testbed."""

# ruff: noqa: E501  (the sample output below keeps the tool's own line widths)

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from glmgguf.cli import main
from glmgguf.gguf.kld import KldError, KldOutputTruncated, format_table, parse_kld_output

# The end of a `llama-perplexity --kl-divergence` run of the pinned version (chunk table + statistics).
SAMPLE = """\
0.00.354.892 I kl_divergence: computing over 16 chunks, n_ctx=256, batch_size=2048, n_seq=8
0.05.996.182 I kl_divergence: 5.64 seconds per pass - ETA 0.18 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1     434.5097 ±   73.7486       0.00371 ±    0.00977       0.01065 ±    0.00453     0.317 ±  0.133 %    89.764 ±  2.700 %
  16     196.6095 ±   10.9126       0.00537 ±    0.00263       0.00588 ±    0.00085     1.521 ±  0.368 %    94.882 ±  0.489 %

====== Perplexity statistics ======
Mean PPL(Q)                   : 196.609476 ±  10.912610
Mean PPL(base)                : 195.555972 ±  10.859700
Cor(ln(PPL(Q)), ln(PPL(base))):  99.89%
Mean ln(PPL(Q)/PPL(base))     :   0.005373 ±   0.002634
Mean PPL(Q)/PPL(base)         :   1.005387 ±   0.002648
Mean PPL(Q)-PPL(base)         :   1.053504 ±   0.519068

====== KL divergence statistics ======
Mean    KLD:   0.005877 ±   0.000849
Maximum KLD:   0.986516
99.9%   KLD:   0.605758
99.0%   KLD:   0.112577
95.0%   KLD:   0.017161
90.0%   KLD:   0.005779
Median  KLD:   0.000270
10.0%   KLD:   0.000050
 5.0%   KLD:   0.000034
 1.0%   KLD:   0.000014
 0.1%   KLD:  -0.000005
Minimum KLD:  -0.000034

====== Token probability statistics ======
Mean    Δp: -0.024 ± 0.034 %
Maximum Δp: 37.315%
99.0%   Δp:  1.406%
Median  Δp: -0.000%
Minimum Δp: -41.593%
RMS Δp    :  1.521 ± 0.368 %
Same top p: 94.882 ± 0.489 %
"""


def test_parse_statistics():
    s = parse_kld_output(SAMPLE)
    assert (s.mean_kld, s.mean_kld_err) == (0.005877, 0.000849)
    assert (s.same_top_pct, s.same_top_pct_err) == (94.882, 0.489)
    assert s.kld_percentiles == {"max": 0.986516, "99.9": 0.605758, "99.0": 0.112577, "95.0": 0.017161,
                                 "90.0": 0.005779, "median": 0.000270, "10.0": 0.000050, "5.0": 0.000034,
                                 "1.0": 0.000014, "0.1": -0.000005, "min": -0.000034}
    assert (s.ppl, s.ppl_base, s.ln_ppl_ratio) == (196.609476, 195.555972, 0.005373)
    assert (s.mean_dp_pct, s.rms_dp_pct) == (-0.024, 1.521)
    assert (s.chunks, s.ctx) == (16, 256)
    assert s.finite
    assert "0.005877 ± 0.000849" in format_table([{"name": "x", "bpw": 4.5, "size_bytes": 2**20, "kld": s}])


def test_parse_falls_back_to_the_last_chunk_row():
    """Below 100 scored tokens llama-perplexity prints only the chunk table: its last row is the running mean."""
    table_only = SAMPLE[:SAMPLE.index("====== Perplexity")].replace("n_ctx=256", "n_ctx=8")  # 16 x 3 tokens
    s = parse_kld_output(table_only)
    assert (s.mean_kld, s.mean_kld_err) == (0.00588, 0.00085)
    assert (s.same_top_pct, s.same_top_pct_err) == (94.882, 0.489)
    assert s.kld_percentiles == {} and s.ppl == 196.6095 and (s.chunks, s.ctx) == (16, 8)


def test_parse_refuses_truncated_output():
    """The pinned llama-perplexity can exit before its logger thread printed everything (seen on a busy machine):
    no statistics although 16 x 127 tokens were scored, or a table that stops before the last chunk."""
    with pytest.raises(KldOutputTruncated, match="before its statistics"):
        parse_kld_output(SAMPLE[:SAMPLE.index("====== Perplexity")])
    with pytest.raises(KldOutputTruncated, match="chunk 1 of 16"):
        parse_kld_output(SAMPLE[:SAMPLE.index("  16     196")])
    with pytest.raises(KldOutputTruncated, match="before its first chunk row"):
        parse_kld_output(SAMPLE[:SAMPLE.index("chunk  ")])


def test_parse_nonfinite_and_garbage():
    s = parse_kld_output(SAMPLE.replace("0.005877 ±   0.000849", "nan ±   nan"))
    assert math.isnan(s.mean_kld) and not s.finite
    with pytest.raises(KldError):
        parse_kld_output("main: error: unable to load model\n")


# --- with the pinned llama-perplexity, on the trained tiny testbed -------------------------------------------
# ctx 32 = the testbed's index_topk: the DSA indexer keeps every token, so the KLD measures the weights alone
# (above it, the untrained testbed indexer's top-k flips under any perturbation and dominate the mean).
CTX = 32
CHUNKS = 256  # 3840 scored tokens


@pytest.fixture(scope="module")
def kld_files(tmp_path_factory, trained_testbed_dir, llama_toolchain):
    from glmgguf.gguf.convert import convert, outtype_chooser
    from glmgguf.gguf.kld import write_heldout_text
    from glmgguf.gguf.quantize import quantize_gguf
    from glmgguf.gguf.recipe import load_recipe

    d = tmp_path_factory.mktemp("kld")
    f32 = d / "f32.gguf"
    convert(trained_testbed_dir, f32, outtype_chooser("f32"), progress=False)
    files = {"f32": f32}
    for name in ("q8_0", "q4_protected", "q2_protected"):
        files[name] = d / f"{name}.gguf"
        quantize_gguf(f32, files[name], load_recipe(name), threads=2, progress=False)
    files["text"] = write_heldout_text(d / "heldout.txt", max_chars=8 * CTX * CHUNKS)
    return files


@pytest.mark.slow
def test_recipe_kld_order(kld_files, tmp_path):
    """More bits, less divergence: q8_0 < q4_protected < q2_protected, through the `glmgguf kld` command."""
    out = tmp_path / "kld.json"
    names = ("q8_0", "q4_protected", "q2_protected")
    result = CliRunner().invoke(main, ["kld", str(kld_files["f32"]), *(str(kld_files[n]) for n in names),
                                       "--text", str(kld_files["text"]), "-c", str(CTX), "--chunks", str(CHUNKS),
                                       "-t", "2", "--json", str(out), "--logits", str(tmp_path / "base.bin")])
    assert result.exit_code == 0, result.output
    assert "| q4_protected.gguf |" in result.output
    assert (tmp_path / "base.bin").stat().st_size > 0
    rows = {Path(r["path"]).stem: r for r in json.loads(out.read_text())["results"]}
    kld = {n: rows[n]["kld"] for n in names}
    for n in names:
        k = kld[n]
        assert all(math.isfinite(v) for v in (k["mean_kld"], k["mean_kld_err"], k["same_top_pct"],
                                              *k["kld_percentiles"].values())), (n, k)
        assert k["mean_kld"] > 0 and 0 < k["same_top_pct"] <= 100, (n, k)
        assert k["chunks"] == CHUNKS and k["ctx"] == CTX
        assert set(k["kld_percentiles"]) >= {"max", "99.0", "median", "min"}
    assert kld["q8_0"]["mean_kld"] < kld["q4_protected"]["mean_kld"] < kld["q2_protected"]["mean_kld"], kld
    assert kld["q8_0"]["same_top_pct"] > kld["q2_protected"]["same_top_pct"], kld
    assert rows["q8_0"]["bpw"] > rows["q4_protected"]["bpw"] > rows["q2_protected"]["bpw"]


@pytest.mark.slow
def test_kld_of_the_base_itself_is_zero(kld_files, tmp_path):
    from glmgguf.gguf.kld import compare

    res = compare(kld_files["f32"], [kld_files["f32"]], kld_files["text"], ctx=CTX, chunks=16, threads=2)
    s = res[str(kld_files["f32"])]
    assert abs(s.mean_kld) < 1e-5 and s.same_top_pct > 99


@pytest.mark.slow
def test_kld_refuses_a_bad_logits_file(kld_files, tmp_path):
    """llama-perplexity exits 0 on an unreadable base logits file: still one clear error, no numbers."""
    from glmgguf.gguf.kld import kld_base, kld_candidate

    logits = tmp_path / "base.bin"
    kld_base(kld_files["f32"], kld_files["text"], logits, ctx=CTX, chunks=8, threads=2)
    logits.write_bytes(b"not logits" + logits.read_bytes()[10:])
    with pytest.raises(KldError):
        kld_candidate(kld_files["q8_0"], logits, ctx=CTX, threads=2)
