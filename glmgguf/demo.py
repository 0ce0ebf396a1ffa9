"""`glmgguf demo`: the shipped testbed plan end to end, then one chat request to the result in llama-server."""

from __future__ import annotations

import time
from pathlib import Path

import click

from glmgguf.llama import LlamaServer, ensure_toolchain
from glmgguf.pipeline.plan import parse_plan
from glmgguf.pipeline.report import report_lines
from glmgguf.pipeline.run import run_plan

DEFAULT_PROMPT = "Write a Python function that reads a file and returns its lines."


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where the pipeline's stages, the GGUF and the server logs go.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
@click.option("--max-tokens", default=96, show_default=True)
@click.option("--quiet", is_flag=True, help="Stage output only to the stages' log files.")
def demo(workdir: Path, prompt: str, max_tokens: int, quiet: bool) -> None:
    """The testbed plan: observe, prune, Router-KD, q4_protected GGUF, loop evaluation, then one chat request.

    The plan is `glmgguf pipeline testbed` (see `glmgguf/pipeline/plans/testbed.toml`); a second run skips the
    finished stages. llama.cpp is built and the tiny testbed trained on first use, both cached.
    """
    t0 = time.perf_counter()
    click.echo("llama.cpp toolchain (pinned, cached after the first build)")
    toolchain = ensure_toolchain()
    plan = parse_plan("testbed", workdir / "pipeline")
    click.echo(f"pipeline 'testbed' in {plan.workdir} (trains the tiny testbed on first use)")
    run_plan(plan, quiet=quiet, echo=click.echo)
    click.echo("\n" + "\n".join(report_lines(plan)))
    gguf = plan.workdir / "gguf-q4_protected" / "q4_protected.gguf"
    click.echo(f"\nllama-server on 127.0.0.1 with {gguf.name}, one chat request")
    with LlamaServer(gguf, ["-c", "2048"], toolchain=toolchain, log_path=workdir / "llama-server.log") as srv:
        reply = srv.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
    answer = reply["choices"][0]["message"]["content"]
    timings = reply.get("timings", {})
    click.echo(f"\nprompt: {prompt}\nanswer ({reply['choices'][0].get('finish_reason')}):\n{answer}\n")
    click.echo(f"prompt: {timings.get('prompt_n', '?')} tokens at {timings.get('prompt_per_second', 0):.0f} tok/s; "
               f"generation: {timings.get('predicted_n', '?')} tokens at "
               f"{timings.get('predicted_per_second', 0):.0f} tok/s; total {time.perf_counter() - t0:.1f} s")
