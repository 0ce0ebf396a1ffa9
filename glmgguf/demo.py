"""`glmgguf demo`: the whole path on the built-in testbed, ending in a running llama-server."""

from __future__ import annotations

import time
from pathlib import Path

import click

from glmgguf.checkpoint import open_checkpoint
from glmgguf.gguf.convert import convert
from glmgguf.gguf.recipe import load_recipe
from glmgguf.llama import LlamaServer, ensure_toolchain
from glmgguf.testbed.train import trained_testbed

DEFAULT_PROMPT = "Write a Python function that reads a file and returns its lines."


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where the GGUF and the server log go.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
@click.option("--recipe", default="q4_protected", show_default=True, help="Quant recipe of the GGUF.")
@click.option("--max-tokens", default=96, show_default=True)
def demo(workdir: Path, prompt: str, recipe: str, max_tokens: int) -> None:
    """Testbed -> GGUF -> llama-server -> one chat request (builds llama.cpp on first use)."""
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    click.echo("1/4 llama.cpp toolchain (pinned, cached after the first build)")
    toolchain = ensure_toolchain()
    click.echo("2/4 trained tiny testbed (GlmMoeDsaForCausalLM, cached after the first training)")
    model = trained_testbed("tiny")
    click.echo(f"3/4 convert -> {recipe} GGUF (one streaming pass, ggml's quantizers)")
    gguf_path = workdir / f"testbed-{recipe}.gguf"
    choose = load_recipe(recipe).chooser(open_checkpoint(model).layout.layers)
    result = convert(model, gguf_path, choose, settings={"recipe": recipe}, force=True)
    click.echo(f"    {result.n_tensors} tensors, {result.n_bytes / 2**20:.1f} MiB in {result.seconds:.1f} s")
    click.echo("4/4 llama-server on 127.0.0.1, one chat request")
    with LlamaServer(gguf_path, ["-c", "2048"], toolchain=toolchain, log_path=workdir / "llama-server.log") as srv:
        reply = srv.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
    answer = reply["choices"][0]["message"]["content"]
    timings = reply.get("timings", {})
    click.echo(f"\nprompt: {prompt}\nanswer ({reply['choices'][0].get('finish_reason')}):\n{answer}\n")
    click.echo(f"prompt: {timings.get('prompt_n', '?')} tokens at {timings.get('prompt_per_second', 0):.0f} tok/s; "
               f"generation: {timings.get('predicted_n', '?')} tokens at "
               f"{timings.get('predicted_per_second', 0):.0f} tok/s; total {time.perf_counter() - t0:.1f} s")
