"""The `glmgguf` command line: a click group whose stage commands load on first use.

Each stage's module is imported only when its command runs (or when `--help` lists the commands), so a command
that needs neither torch nor transformers (`quantize`, `inspect`, `recipes`, `eval`, `pipeline`) starts fast.
"""

from __future__ import annotations

import importlib

import click

from glmgguf import __version__
from glmgguf.errors import install_cli_warnings, sigterm_exits, user_errors

COMMANDS = {  # name -> "module:attribute"
    "card": "glmgguf.card.cli:card_cmd",
    "convert": "glmgguf.gguf.cli:convert_cmd",
    "demo": "glmgguf.demo:demo",
    "eval": "glmgguf.eval.cli:eval_group",
    "gptq": "glmgguf.gptq.cli:gptq",
    "imatrix": "glmgguf.gguf.cli:imatrix_group",
    "inspect": "glmgguf.gguf.cli:inspect_cmd",
    "kd": "glmgguf.kd.cli:kd",
    "kld": "glmgguf.gguf.kld:kld_cmd",
    "llama": "glmgguf.llama.cli:llama",
    "nvfp4": "glmgguf.nvfp4.cli:nvfp4",
    "patch": "glmgguf.llama.patch_cli:patch",
    "pipeline": "glmgguf.pipeline.cli:pipeline",
    "quantize": "glmgguf.gguf.cli:quantize_cmd",
    "reap": "glmgguf.reap.cli:reap",
    "recipes": "glmgguf.gguf.cli:recipes_cmd",
    "testbed": "glmgguf.testbed.cli:testbed",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module when the subcommand is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert cmd.name == name, f"{COMMANDS[name]} is named {cmd.name!r}, not {name!r}"
        return cmd

    def invoke(self, ctx: click.Context):
        """Run the command; any `GlmggufError` it raises becomes one `Error:` line (exit status 1), and the
        library's log warnings are printed as `warning:` lines; SIGTERM cleans up like Ctrl-C."""
        install_cli_warnings()
        with sigterm_exits(), user_errors():
            return super().invoke(ctx)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glmgguf")
def main() -> None:
    """Turn GLM-5.x MoE checkpoints into GGUF builds that llama.cpp runs."""
