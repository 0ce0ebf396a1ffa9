"""`glmgguf eval`: degeneration probes (loops), run comparison, sampler sweeps."""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from glmgguf.cli_options import stack_options

if TYPE_CHECKING:
    from glmgguf.eval.probes import Prompt
    from glmgguf.eval.run import RunSpec

SAMPLER_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def _wait_reachable(url: str, retries: int, backoff: float) -> None:
    """GET /health with the run's retry policy; a server that never answers is a one-line error."""
    from glmgguf.eval.probes import EvalError

    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError, ValueError) as e:
            error = str(e)
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise EvalError(f"cannot reach llama-server at {url} ({error}); start it or use --gguf")


@contextmanager
def _server(opts: dict[str, Any], log_path: Path) -> Iterator[str]:
    """The URL of `--server`, or of a llama-server started on `--gguf` (stopped again on exit)."""
    from glmgguf.eval.probes import EvalError
    from glmgguf.llama import LlamaServer, LlamaServerError

    if (opts["server"] is None) == (opts["gguf"] is None):
        raise EvalError("give exactly one of --server URL or --gguf FILE")
    if opts["lora"] and opts["server"]:
        raise EvalError("--lora starts llama-server with the adapter: use it with --gguf")
    if opts["server"]:
        _wait_reachable(opts["server"], opts["retries"], opts["backoff"])
        yield opts["server"]
        return
    ctx = opts["ctx_size"] or opts["parallel"] * (opts["safety_cap"] + 2048)
    args = ["-c", str(ctx), "-np", str(opts["parallel"]), *(["-t", str(opts["threads"])] if opts["threads"] else []),
            *_draft_server_args(opts), *(["--lora", str(opts["lora"])] if opts["lora"] else []), *opts["server_arg"]]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        srv = LlamaServer(opts["gguf"], args, log_path=log_path).start()
    except LlamaServerError as e:
        raise EvalError(str(e).splitlines()[0]) from None
    try:
        yield srv.url
    finally:
        srv.stop()


def _draft(opts: dict[str, Any]) -> dict[str, Any] | None:
    """The MTP drafting setting of the options (None without --draft-mtp); only for a server we start."""
    from glmgguf.eval.draft import draft_settings
    from glmgguf.eval.probes import EvalError

    if not opts["draft_mtp"]:
        return None
    if opts["server"]:
        raise EvalError("--draft-mtp starts llama-server with MTP drafting: use it with --gguf (a running server "
                        "started with --spec-type draft-mtp reports its acceptance anyway)")
    return draft_settings(opts["draft_max"], opts["draft_p_min"])


def _draft_server_args(opts: dict[str, Any]) -> list[str]:
    from glmgguf.eval.draft import check_mtp_gguf, draft_args

    draft = _draft(opts)
    if draft is None:
        return []
    check_mtp_gguf(opts["gguf"])
    return draft_args(draft)


def _probe_options(f: Callable) -> Callable:
    """Options shared by `loops` and `sweep`."""
    options = [
        click.option("--server", metavar="URL", help="A running llama-server (http://HOST:PORT)."),
        click.option("--gguf", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     help="Start llama-server on this model instead (log kept next to the output)."),
        click.option("--prompts", required=True, metavar="FILE.jsonl|fuzz",
                     help="JSONL of {\"messages\": [...]} or {\"text\": ...} (optional id, source), or 'fuzz'."),
        click.option("--preset", default="raw", show_default=True,
                     type=click.Choice(["raw", "guarded", "greedy"]),
                     help="raw: T=1, no truncation; guarded: raw + min_p 0.05 + repetition_penalty 1.05; greedy."),
        click.option("--temperature", type=float), click.option("--top-p", type=float),
        click.option("--top-k", type=int), click.option("--min-p", type=float),
        click.option("--repetition-penalty", type=float), click.option("--seed", type=int),
        click.option("--system", help="System prompt put before every chat prompt (e.g. a brevity instruction)."),
        click.option("--parallel", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Concurrent requests (with --gguf also llama-server's -np)."),
        click.option("--safety-cap", default=16384, show_default=True, type=click.IntRange(min=1),
                     help="Hard token limit per generation, reported as outcome 'cap'."),
        click.option("--limit", type=click.IntRange(min=1), help="Only the first N prompts."),
        click.option("--ctx-size", "--ctx", type=click.IntRange(min=256),
                     help="--gguf: llama-server -c  [default: parallel x (safety-cap + 2048)]"),
        click.option("--threads", type=click.IntRange(min=1), help="--gguf: llama-server -t."),
        click.option("--server-arg", multiple=True, help="--gguf: extra llama-server argument (repeatable)."),
        click.option("--lora", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     help="--gguf: apply this LoRA adapter GGUF (`glmgguf kd lora-gguf`; llama-server --lora)."),
        click.option("--draft-mtp", is_flag=True,
                     help="--gguf: speculative decoding with the GGUF's MTP block (llama-server --spec-type "
                          "draft-mtp); the run records drafted and accepted tokens."),
        click.option("--draft-max", default=3, show_default=True, type=click.IntRange(min=1),
                     help="--draft-mtp: tokens drafted per step (--spec-draft-n-max)."),
        click.option("--draft-p-min", default=0.0, show_default=True, type=click.FloatRange(0, 1),
                     help="--draft-mtp: stop drafting below this top-1 draft probability (--spec-draft-p-min)."),
        click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0),
                     help="Tries again on a lost connection or 5xx, after 2, 4, 8 ... x --backoff seconds."),
        click.option("--backoff", default=2.0, show_default=True, type=click.FloatRange(min=0)),
        click.option("--idle-timeout", default=900.0, show_default=True, type=click.FloatRange(min=1),
                     help="Fail a request whose stream stays silent this long (no limit on total time)."),
        click.option("--force", is_flag=True, help="Overwrite the output and discard its journal."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    return stack_options(*options)(f)


def _spec(opts: dict[str, Any], overrides: dict[str, Any]) -> tuple[list[Prompt], RunSpec]:
    """The prompts and the run spec of the options (a sweep point's `overrides` on top)."""
    from glmgguf.eval.probes import load_prompts
    from glmgguf.eval.run import RunSpec, sampler_settings

    prompts, sha = load_prompts(opts["prompts"])
    sampler = sampler_settings(opts["preset"], {**{k: opts[k] for k in SAMPLER_FLAGS}, **overrides})
    return prompts[:opts["limit"]], RunSpec(sampler=sampler, prompts=str(opts["prompts"]), prompts_sha256=sha,
                                            limit=opts["limit"], safety_cap=opts["safety_cap"], system=opts["system"],
                                            draft=_draft(opts), lora=opts["lora"].name if opts["lora"] else None)


def _run_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    return {"parallel": opts["parallel"], "retries": opts["retries"], "backoff": opts["backoff"],
            "idle_timeout": opts["idle_timeout"], "progress": not opts["quiet"]}


@click.group("eval")
def eval_group() -> None:
    """Degeneration evaluation: loop probes on llama-server, run comparisons, sampler sweeps."""


@eval_group.command("loops")
@_probe_options
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Run file (JSON).")
def loops_cmd(out: Path, **opts: Any) -> None:
    """Generate on every prompt until EOS or a detected loop; record outcome, tokens, distinct-4, time."""
    from glmgguf.eval.compare import compare_table
    from glmgguf.eval.run import run_probes
    from glmgguf.io.atomic import OutputExistsError

    prompts, spec = _spec(opts, {})
    if out.exists() and not opts["force"]:
        raise OutputExistsError(f"{out} already exists (use --force to overwrite)")
    with _server(opts, out.with_name(out.name + ".server.log")) as url:
        doc = run_probes(url, prompts, spec, out, force=opts["force"], **_run_kwargs(opts))
    click.echo(compare_table([(out.stem, doc)]), nl=False)
    click.echo(f"wrote {out}")


def _labelled(value: str) -> tuple[str, Path]:
    """`LABEL=FILE` or `FILE` (labelled by its name without the extension); the file must exist."""
    label, sep, path = value.partition("=")
    file = Path(path if sep else value)
    if not file.is_file():
        raise click.BadParameter(f"{file} is not a file", param_hint="RUNS / --kl")
    return (label if sep else file.stem), file


@eval_group.command("compare")
@click.argument("runs", nargs=-1, required=True, metavar="[LABEL=]RUN.json...")
@click.option("--kl", "kls", multiple=True, metavar="[LABEL=]KL.json",
              help="A `glmgguf kd eval --json` result: adds a table of held-out KL to the teacher (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here (markdown).")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Bar chart of loop and EOS rates.")
def compare_cmd(runs: tuple[str, ...], kls: tuple[str, ...], out: Path | None, png: Path | None) -> None:
    """Compare run files: rates with Wilson 95% CIs, z-tests against the first run, loops per source; with --kl,
    the checkpoints' held-out KL to the teacher."""
    from glmgguf.eval.compare import compare_chart, compare_table, kl_table, load_run

    loaded = [(label, load_run(p)) for label, p in map(_labelled, runs)]
    table = compare_table(loaded)
    if kls:
        table += "\n" + kl_table([(label, json.loads(p.read_text())) for label, p in map(_labelled, kls)])
    click.echo(table, nl=False)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    if png:
        compare_chart(loaded, png)


def _grid(specs: tuple[str, ...]) -> list[dict[str, str]]:
    """`--grid key=v1,v2` options -> the list of their combinations."""
    from glmgguf.eval.probes import EvalError
    from glmgguf.eval.run import SAMPLER_TYPES

    axes = []
    for g in specs:
        key, sep, values = g.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SAMPLER_TYPES or not values.strip():
            raise EvalError(f"--grid {g!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SAMPLER_TYPES)}")
        axes.append([(key, v.strip()) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


@eval_group.command("sweep")
@_probe_options
@click.option("--grid", "grids", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="Sampler setting and its values (repeatable; all combinations are run).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory: one run file per grid point, compare.md, compare.png.")
def sweep_cmd(grids: tuple[str, ...], out: Path, **opts: Any) -> None:
    """The same probes over a grid of sampler settings, on one server; one comparison table."""
    from glmgguf.eval.compare import compare_chart, compare_table, load_run
    from glmgguf.eval.probes import EvalError
    from glmgguf.eval.run import run_probes

    points = [(combo, *_spec(opts, combo)) for combo in _grid(grids)]
    runs = []
    with _server(opts, out / "llama-server.log") as url:
        for combo, prompts, spec in points:
            label = " ".join(f"{k}={v}" for k, v in combo.items())
            path = out / (label.replace(" ", "_") + ".json")
            if path.exists() and not opts["force"]:
                doc = load_run(path)
                if doc["spec"] != json.loads(json.dumps(spec.as_dict())):
                    raise EvalError(f"{path} holds a run with other settings; use --force to redo it")
            else:
                doc = run_probes(url, prompts, spec, path, force=opts["force"], **_run_kwargs(opts))
            runs.append((label, doc))
    table = compare_table(runs)
    (out / "compare.md").write_text(table)
    compare_chart(runs, out / "compare.png")
    click.echo(table, nl=False)
    click.echo(f"wrote {out}/compare.md and compare.png")
