"""KL divergence of quantized GGUFs against a reference GGUF, measured by the pinned `llama-perplexity`.

`llama-perplexity --kl-divergence-base LOGITS` first runs the reference (usually the F32 GGUF) over a text and
stores its log-probabilities (second half of every `--ctx-size` chunk); `--kl-divergence` then runs each
candidate over the same tokens and prints the mean KLD (with its uncertainty), KLD percentiles, Δp statistics and
"Same top p", the share of positions whose most likely token is unchanged. Both runs use an F32 KV cache by
default, so the comparison measures the weights only. `compute_imatrix` runs the pinned `llama-imatrix`.

This module only needs the standard library and click: `glmgguf kld` starts without torch.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from glmgguf.errors import GlmggufError

DEFAULT_CTX = 256
KV_F32 = ("-ctk", "f32", "-ctv", "f32")
MIN_KLD_VALUES = 100  # llama-perplexity prints its statistics only above this many scored tokens


class KldError(GlmggufError, RuntimeError):
    """llama-perplexity / llama-imatrix failed or printed nothing this module can read."""


class KldOutputTruncated(KldError):
    """llama-perplexity's output ends early: its logger thread had not printed everything when it exited.

    The pinned llama.cpp leaks its logger singleton on purpose and queued lines can be lost at exit (see the comment
    on common_log_main in common/log.cpp); on a busy machine that cuts off the statistics, sometimes the end of
    the chunk table too. A rerun prints them.
    """


_NUM = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|-?nan|-?inf)"
_PM = r"\s*(?:±|\+/-)\s*"
_MEAN_KLD = re.compile(rf"^Mean\s+KLD:\s*{_NUM}{_PM}{_NUM}", re.MULTILINE)
_SAME_TOP = re.compile(rf"^Same top p:\s*{_NUM}{_PM}{_NUM}\s*%", re.MULTILINE)
_RMS_DP = re.compile(rf"^RMS Δp\s*:\s*{_NUM}{_PM}{_NUM}\s*%", re.MULTILINE)
_MEAN_DP = re.compile(rf"^Mean\s+Δp:\s*{_NUM}{_PM}{_NUM}\s*%", re.MULTILINE)
_PPL_Q = re.compile(rf"^Mean PPL\(Q\)\s*:\s*{_NUM}{_PM}{_NUM}", re.MULTILINE)
_PPL_BASE = re.compile(rf"^Mean PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}", re.MULTILINE)
_LN_RATIO = re.compile(rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}{_PM}{_NUM}", re.MULTILINE)
_KLD_PCT = re.compile(rf"^\s*(Maximum|Median|Minimum|\d+(?:\.\d+)?%)\s+KLD:\s*{_NUM}\s*$", re.MULTILINE)
_COMPUTING = re.compile(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)")
# one row of the per-chunk table: chunk, PPL ± u, ln ratio ± u, KLD ± u, Δp RMS ± u %, same top ± u %
_ROW = re.compile(rf"^\s*(\d+)\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}\s*%"
                  rf"\s+{_NUM}{_PM}{_NUM}\s*%\s*$", re.MULTILINE)
_PPL_FINAL = re.compile(rf"Final estimate: PPL = {_NUM}{_PM}{_NUM}")


def _f(text: str) -> float:
    return float(text)


def _pct_key(label: str) -> str:
    return {"Maximum": "max", "Median": "median", "Minimum": "min"}.get(label, label.rstrip("%"))


@dataclass
class KldStats:
    """What one `llama-perplexity --kl-divergence` run printed (percent values as printed, 0-100)."""

    mean_kld: float
    mean_kld_err: float
    same_top_pct: float
    same_top_pct_err: float
    kld_percentiles: dict[str, float] = field(default_factory=dict)  # "max", "99.9", ..., "median", ..., "min"
    ppl: float | None = None
    ppl_err: float | None = None
    ppl_base: float | None = None
    ppl_base_err: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_err: float | None = None
    mean_dp_pct: float | None = None
    rms_dp_pct: float | None = None
    chunks: int | None = None
    ctx: int | None = None

    @property
    def finite(self) -> bool:
        values = [self.mean_kld, self.mean_kld_err, self.same_top_pct, *self.kld_percentiles.values()]
        return all(math.isfinite(v) for v in values)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_kld_output(text: str) -> KldStats:
    """Read llama-perplexity's `--kl-divergence` output: its final statistics, or the last chunk row when the run
    scored too few tokens for the statistics block. Raises KldOutputTruncated when the output ends before the
    statistics of a run that should have them, or before the last chunk's row."""
    chunks = ctx = None
    if m := _COMPUTING.search(text):
        chunks, ctx = int(m.group(1)), int(m.group(2))
    mean, same = _MEAN_KLD.search(text), _SAME_TOP.search(text)
    if mean is not None and same is not None:
        stats = KldStats(_f(mean.group(1)), _f(mean.group(2)), _f(same.group(1)), _f(same.group(2)),
                         chunks=chunks, ctx=ctx)
        stats.kld_percentiles = {_pct_key(m.group(1)): _f(m.group(2)) for m in _KLD_PCT.finditer(text)}
        for regex, attrs in ((_PPL_Q, ("ppl", "ppl_err")), (_PPL_BASE, ("ppl_base", "ppl_base_err")),
                             (_LN_RATIO, ("ln_ppl_ratio", "ln_ppl_ratio_err"))):
            if m := regex.search(text):
                setattr(stats, attrs[0], _f(m.group(1)))
                setattr(stats, attrs[1], _f(m.group(2)))
        if m := _MEAN_DP.search(text):
            stats.mean_dp_pct = _f(m.group(1))
        if m := _RMS_DP.search(text):
            stats.rms_dp_pct = _f(m.group(1))
        return stats
    rows = list(_ROW.finditer(text))
    if not rows:
        if chunks is not None:
            raise KldOutputTruncated("llama-perplexity's output ends before its first chunk row")
        raise KldError("no KL divergence statistics in the llama-perplexity output")
    g = rows[-1].groups()
    if chunks is None or int(g[0]) != chunks:
        raise KldOutputTruncated(f"llama-perplexity's output ends at chunk {g[0]} of {chunks or '?'}")
    if ctx is not None and chunks * (ctx - 1 - ctx // 2) >= MIN_KLD_VALUES:
        raise KldOutputTruncated("llama-perplexity's output ends before its statistics")
    return KldStats(mean_kld=_f(g[5]), mean_kld_err=_f(g[6]), same_top_pct=_f(g[9]), same_top_pct_err=_f(g[10]),
                    ppl=_f(g[1]), ppl_err=_f(g[2]), ln_ppl_ratio=_f(g[3]), ln_ppl_ratio_err=_f(g[4]),
                    rms_dp_pct=_f(g[7]), chunks=chunks or int(g[0]), ctx=ctx)


def _tool(name: str, path: str | os.PathLike | None) -> Path:
    if path is not None:
        return Path(path)
    from glmgguf.llama import ensure_toolchain

    return getattr(ensure_toolchain(), name)


def _run(cmd: Sequence[str], what: str, log: Path | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace")
    output = proc.stdout + proc.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    if proc.returncode != 0:
        tail = "\n".join(line for line in output.splitlines()[-25:] if " W model has unused tensor" not in line)
        raise KldError(f"{what} exited with {proc.returncode}:\n{tail}")
    return output


def _errors_in(output: str) -> list[str]:
    """llama-perplexity reports some failures (unreadable logits, vocab mismatch) with exit status 0."""
    return [line for line in output.splitlines() if re.search(r"\bE (kl_divergence|perplexity):", line)
            or re.search(r"^(kl_divergence|perplexity): .*(failed|inconsistent|does not look|must provide)", line)]


def write_heldout_text(path: str | os.PathLike, max_chars: int = 400_000, split: str = "heldout") -> Path:
    """The testbed's held-out standard-library text (never trained on), cut to `max_chars`, written to `path`."""
    from glmgguf.testbed import stdlib_corpus

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(stdlib_corpus(split, max_bytes=2 * max_chars))[:max_chars])
    return path


def kld_base(base: str | os.PathLike, text: str | os.PathLike, logits: str | os.PathLike, ctx: int = DEFAULT_CTX,
             chunks: int | None = None, threads: int | None = None, f32_kv: bool = True,
             perplexity: str | os.PathLike | None = None, log: Path | None = None) -> float | None:
    """Run the reference GGUF `base` over `text` and save its log-probabilities to `logits`; returns its PPL."""
    cmd = [_tool("perplexity", perplexity), "-m", base, "-f", text, "-c", str(ctx),
           "--kl-divergence-base", logits, "-t", str(threads or os.cpu_count() or 1)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if f32_kv:
        cmd += list(KV_F32)
    Path(logits).unlink(missing_ok=True)
    output = _run(cmd, f"llama-perplexity --kl-divergence-base on {base}", log)
    errors = _errors_in(output)
    if errors or not Path(logits).is_file():
        raise KldError(f"llama-perplexity wrote no logits for {base}: " + ("; ".join(errors) or output[-2000:]))
    m = _PPL_FINAL.search(output)
    return float(m.group(1)) if m else None


def kld_candidate(candidate: str | os.PathLike, logits: str | os.PathLike, ctx: int = DEFAULT_CTX,
                  threads: int | None = None, f32_kv: bool = True, perplexity: str | os.PathLike | None = None,
                  log: Path | None = None, attempts: int = 3) -> KldStats:
    """KL divergence of `candidate` against the base log-probabilities `logits` (same `ctx` as the base run).

    A run whose output was cut off at exit (KldOutputTruncated) is repeated, up to `attempts` runs in all.
    """
    cmd = [_tool("perplexity", perplexity), "-m", candidate, "-c", str(ctx), "--kl-divergence-base", logits,
           "--kl-divergence", "-t", str(threads or os.cpu_count() or 1)]
    if f32_kv:
        cmd += list(KV_F32)
    for attempt in range(1, attempts + 1):
        output = _run(cmd, f"llama-perplexity --kl-divergence on {candidate}", log)
        errors = _errors_in(output)
        if errors:
            raise KldError(f"llama-perplexity on {candidate}: " + "; ".join(errors))
        try:
            return parse_kld_output(output)
        except KldOutputTruncated as e:
            if attempt == attempts:
                raise KldOutputTruncated(f"llama-perplexity on {candidate}, {attempts} runs: {e}") from None
        except KldError:
            tail = "\n".join(line for line in output.splitlines()[-20:] if " W model has unused tensor" not in line)
            raise KldError(f"llama-perplexity on {candidate} printed no KL divergence statistics:\n{tail}") from None
    raise AssertionError("unreachable")


def compute_imatrix(model: str | os.PathLike, text: str | os.PathLike, out: str | os.PathLike,
                    ctx: int = DEFAULT_CTX, chunks: int | None = None, threads: int | None = None,
                    imatrix_tool: str | os.PathLike | None = None, log: Path | None = None) -> Path:
    """An importance matrix of `model` over `text`, written by the pinned llama-imatrix (its GGUF format)."""
    out = Path(out)
    cmd = [_tool("imatrix", imatrix_tool), "-m", model, "-f", text, "-o", out, "-c", str(ctx), "--no-ppl",
           "-t", str(threads or os.cpu_count() or 1)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    out.unlink(missing_ok=True)
    _run(cmd, f"llama-imatrix on {model}", log)
    if not out.is_file():
        raise KldError(f"llama-imatrix wrote no {out}")
    return out


@dataclass
class GgufSize:
    file_bytes: int
    tensor_bytes: int
    n_elements: int

    @property
    def bpw(self) -> float:
        return 8 * self.tensor_bytes / self.n_elements if self.n_elements else 0.0


def gguf_size(path: str | os.PathLike) -> GgufSize:
    """File size, tensor data bytes and weight count of a (possibly split) GGUF."""
    from glmgguf.gguf.inspect import read_summary

    s = read_summary(path)
    total = s.total()
    return GgufSize(s.file_bytes, total.n_bytes, total.n_elements)


def compare(base: str | os.PathLike, candidates: Sequence[str | os.PathLike], text: str | os.PathLike,
            ctx: int = DEFAULT_CTX, chunks: int | None = None, threads: int | None = None, f32_kv: bool = True,
            logits: str | os.PathLike | None = None, log_dir: Path | None = None) -> dict[str, KldStats]:
    """KL divergence of every candidate against `base` over `text` (one base run, then one run per candidate).

    With `log_dir`, each run's full output is kept there (`base.log`, `<candidate stem>.log`).
    """
    def log(name: str) -> Path | None:
        return None if log_dir is None else Path(log_dir) / f"{name}.log"

    with tempfile.TemporaryDirectory(prefix="glmgguf-kld-") as tmp:
        logits_path = Path(logits) if logits is not None else Path(tmp) / "base-logits.bin"
        kld_base(base, text, logits_path, ctx, chunks, threads, f32_kv, log=log("base"))
        return {str(c): kld_candidate(c, logits_path, ctx, threads, f32_kv, log=log(Path(c).stem))
                for c in candidates}


def first_part(path: Path) -> Path:
    """A GGUF file as is; a split GGUF's folder: its first part (llama.cpp loads the others from its name)."""
    if not path.is_dir():
        return path
    parts = sorted(path.glob("*.gguf"))
    if not parts:
        raise click.BadParameter(f"{path} holds no .gguf file", param_hint="CANDIDATES")
    return parts[0]


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of KLD results: dicts with name, bpw, size_bytes and a KldStats (or None) under 'kld'."""
    lines = ["| model | bpw | size MiB | mean KLD | 99% KLD | same top % |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        k: KldStats | None = r.get("kld")
        size = f"{r['size_bytes'] / 2**20:.2f}" if r.get("size_bytes") is not None else "-"
        bpw = f"{r['bpw']:.2f}" if r.get("bpw") is not None else "-"
        if k is None:
            lines.append(f"| {r['name']} | {bpw} | {size} | - | - | - |")
            continue
        p99 = k.kld_percentiles.get("99.0")
        lines.append(f"| {r['name']} | {bpw} | {size} | {k.mean_kld:.6f} ± {k.mean_kld_err:.6f} | "
                     f"{'-' if p99 is None else f'{p99:.4f}'} | {k.same_top_pct:.2f} ± {k.same_top_pct_err:.2f} |")
    return "\n".join(lines)


@click.command("kld")
@click.argument("base", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Held-out text to score (not the imatrix calibration text).")
@click.option("--ctx", "-c", type=click.IntRange(min=8), default=DEFAULT_CTX, show_default=True,
              help="Context size of each chunk (KLD is scored on the second half of every chunk).")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Use at most this many chunks of the text.")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True)
@click.option("--f16-kv", is_flag=True, help="Use llama.cpp's default F16 KV cache instead of F32.")
@click.option("--logits", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep the base model's log-probabilities in this file (default: a temporary file).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results.")
def kld_cmd(base: Path, candidates: tuple[Path, ...], text: Path, ctx: int, chunks: int | None, threads: int,
            f16_kv: bool, logits: Path | None, json_out: Path | None) -> None:
    """KL divergence of CANDIDATE GGUFs against BASE (e.g. the F32 GGUF) with the pinned llama-perplexity.

    A split GGUF is given by its first part or its folder."""
    import json

    candidates = tuple(first_part(c) for c in candidates)
    try:
        results = compare(base, candidates, text, ctx, chunks, threads, not f16_kv, logits)
        rows = []
        for c in candidates:
            size = gguf_size(c)
            rows.append({"name": c.name, "path": str(c), "bpw": size.bpw, "size_bytes": size.file_bytes,
                         "kld": results[str(c)]})
    except (KldError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_table(rows))
    if json_out is not None:
        json_out.write_text(json.dumps({"base": str(base), "text": str(text), "ctx": ctx, "f32_kv": not f16_kv,
                                        "results": [{**r, "kld": r["kld"].to_dict()} for r in rows]}, indent=2)
                            + "\n")
