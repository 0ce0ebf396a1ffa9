"""Run the pinned upstream converter (and ours) in a measured subprocess: wall time and peak RSS.

Each converter runs as the child of a fresh, stdlib-only wrapper process; the wrapper times the child and reads
`getrusage(RUSAGE_CHILDREN).ru_maxrss`, which is then the child's own peak resident set (the wrapper has no
other children), and reports both as JSON. Both converters are measured the same way, so the numbers compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
UPSTREAM_MAIN = BENCH_DIR / "_upstream_main.py"

# Runs in its own interpreter: argv = [result.json, cmd...]. Only the standard library.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
rc = subprocess.call(cmd)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
scale = 1 if sys.platform == "darwin" else 1024
with open(out, "w") as fh:
    json.dump({"returncode": rc, "wall_s": wall, "peak_rss_bytes": ru.ru_maxrss * scale,
               "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "write_bytes": ru.ru_oublock * 512}, fh)
"""


def portable(obj: object) -> object:
    """`obj` with this checkout's path written as `.` and the home directory as `~` in every string, so result
    files name no machine's paths."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable(v) for v in obj]
    if isinstance(obj, str | Path):
        return str(obj).replace(str(BENCH_DIR.parent), ".").replace(str(Path.home()), "~")
    return obj


class ConvertRunError(RuntimeError):
    """A measured converter run exited non-zero."""


def busy_cpu_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict:
    """Run `cmd` under the wrapper; returns returncode, wall_s, peak_rss_bytes, user_s, sys_s, write_bytes,
    other_cpu_s.

    `write_bytes` is the child's block output count (`ru_oublock`, 512-byte units; on Linux the bytes it dirtied
    for the storage layer, whether or not they reached the disk during the run).

    The child's stdout/stderr go to `log` when given (else they are inherited).
    """
    busy_before = busy_cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        result = Path(tmp) / "result.json"
        wrapper = [sys.executable, "-c", _WRAPPER, str(result), *cmd]
        if log is None:
            subprocess.run(wrapper, env=env, check=True)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                subprocess.run(wrapper, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)
        stats = json.loads(result.read_text())
    busy_after = busy_cpu_seconds()
    # CPU time other processes used during the run: contention on a small machine skews the timings.
    stats["other_cpu_s"] = (None if busy_before is None or busy_after is None
                            else max(0.0, busy_after - busy_before - stats["user_s"] - stats["sys_s"]))
    return stats


def _checked(stats: dict, what: str, log: Path | None) -> dict:
    if stats["returncode"] != 0:
        tail = ""
        if log is not None and log.is_file():
            tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ConvertRunError(f"{what} exited with {stats['returncode']}" + (f" (log: {log})" if log else "")
                              + tail)
    return stats


def upstream_command(source_dir: Path, model_dir: Path, out: Path, outtype: str,
                     extra_args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, str(UPSTREAM_MAIN), str(source_dir), str(model_dir),
            "--outfile", str(out), "--outtype", outtype, *extra_args]


def upstream_env(source_dir: Path) -> dict[str, str]:
    """The environment for the upstream converter: the tree's gguf-py ahead of any installed gguf."""
    env = dict(os.environ)
    paths = [str(Path(source_dir) / "gguf-py"), str(source_dir)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("NO_LOCAL_GGUF", None)
    return env


def ours_command(model_dir: Path, out: Path, outtype: str) -> list[str]:
    return [sys.executable, "-c", "from glmgguf.cli import main; main()", "convert", str(model_dir), str(out),
            "--outtype", outtype, "--force"]


def _finish(stats: dict, out: Path) -> dict:
    stats["output"] = str(out)
    stats["output_bytes"] = out.stat().st_size
    return stats


def run_upstream_convert(source_dir: Path, model_dir: Path, out: Path, outtype: str,
                         log: Path | None = None, extra_args: Sequence[str] = ()) -> dict:
    """Convert `model_dir` with `source_dir`'s convert_hf_to_gguf.py; returns the run's measurements.

    `extra_args` go to the converter as they are (e.g. `--no-mtp`).
    """
    source_dir, model_dir, out = Path(source_dir), Path(model_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = upstream_command(source_dir, model_dir, out, outtype, extra_args)
    stats = measure(cmd, upstream_env(source_dir), log)
    return _finish(_checked(stats, "upstream convert_hf_to_gguf.py", log), out)


def run_ours_convert(model_dir: Path, out: Path, outtype: str, log: Path | None = None) -> dict:
    """Convert `model_dir` with `glmgguf convert`; returns the run's measurements."""
    model_dir, out = Path(model_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = measure(ours_command(model_dir, out, outtype), dict(os.environ), log)
    return _finish(_checked(stats, "glmgguf convert", log), out)


# --- comparing two GGUF files -----------------------------------------------------------------------------

IGNORED_KV_PREFIXES = ("GGUF.", "general.", "glmgguf.")


def _kv_value(field) -> object:
    value = field.contents()
    return value.tolist() if hasattr(value, "tolist") else value


def gguf_kv(path: Path) -> dict[str, tuple[list[int], object]]:
    """Every KV pair of a GGUF file: key -> (value type codes, value as plain Python)."""
    import gguf

    return {key: (list(field.types), _kv_value(field)) for key, field in gguf.GGUFReader(path).fields.items()}


def _kv_type(field) -> str:
    import gguf

    return "/".join(gguf.GGUFValueType(t).name for t in field.types)


def summarize(value: object, limit: int = 8) -> object:
    """A printable/JSON-able stand-in for a KV value (long lists and strings shortened)."""
    if isinstance(value, list) and len(value) > limit:
        return {"len": len(value), "head": value[:limit]}
    if isinstance(value, str) and len(value) > 120:
        return {"len": len(value), "head": value[:80]}
    if isinstance(value, float) and value != value:  # NaN
        return "nan"
    return value


def compare_gguf(a: Path, b: Path, labels: tuple[str, str] = ("upstream", "ours"),
                 ignore: tuple[str, ...] = IGNORED_KV_PREFIXES) -> dict:
    """Tensor-by-tensor (name, shape, GGML type, bytes) and key-by-key comparison of two GGUF files.

    Returns {"tensors": {...}, "kv": {...}, "tensors_identical": bool, "kv_identical": bool}; KV keys under
    `ignore` are left out (file names, provenance).
    """
    import gguf

    la, lb = labels
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    shape_mismatch, type_mismatch, data_mismatch = {}, {}, []
    identical = 0
    for name in [n for n in ta if n in tb]:
        x, y = ta[name], tb[name]
        sx, sy = [int(d) for d in x.shape], [int(d) for d in y.shape]
        if sx != sy:
            shape_mismatch[name] = {la: sx, lb: sy}
        if x.tensor_type != y.tensor_type:
            type_mismatch[name] = {la: x.tensor_type.name, lb: y.tensor_type.name}
        if x.data.tobytes() != y.data.tobytes():
            data_mismatch.append(name)
        elif sx == sy and x.tensor_type == y.tensor_type:
            identical += 1
    tensors = {
        "count": {la: len(ta), lb: len(tb)},
        "identical": identical,
        f"only_{la}": {n: {"shape": [int(d) for d in ta[n].shape], "type": ta[n].tensor_type.name}
                       for n in ta if n not in tb},
        f"only_{lb}": {n: {"shape": [int(d) for d in tb[n].shape], "type": tb[n].tensor_type.name}
                       for n in tb if n not in ta},
        "shape_mismatch": shape_mismatch,
        "type_mismatch": type_mismatch,
        "data_mismatch": data_mismatch,
    }
    ka = {k: (_kv_type(f), _kv_value(f)) for k, f in ra.fields.items() if not k.startswith(ignore)}
    kb = {k: (_kv_type(f), _kv_value(f)) for k, f in rb.fields.items() if not k.startswith(ignore)}
    differing = {k: {la: {"type": ka[k][0], "value": summarize(ka[k][1])},
                     lb: {"type": kb[k][0], "value": summarize(kb[k][1])}}
                 for k in ka if k in kb and ka[k] != kb[k]}
    kv = {
        f"only_{la}": {k: summarize(v) for k, (_, v) in ka.items() if k not in kb},
        f"only_{lb}": {k: summarize(v) for k, (_, v) in kb.items() if k not in ka},
        "differing": differing,
        "equal": sum(1 for k in ka if k in kb and ka[k] == kb[k]),
        "ignored_prefixes": list(ignore),
    }
    tensors_identical = not (tensors[f"only_{la}"] or tensors[f"only_{lb}"] or shape_mismatch
                             or type_mismatch or data_mismatch)
    kv_identical = not (kv[f"only_{la}"] or kv[f"only_{lb}"] or differing)
    return {"tensors": tensors, "kv": kv, "tensors_identical": tensors_identical, "kv_identical": kv_identical}
