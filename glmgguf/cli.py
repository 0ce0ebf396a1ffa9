"""The `glmgguf` command line: a click group; each stage registers its commands here."""

from __future__ import annotations

import click

from glmgguf import __version__
from glmgguf.demo import demo
from glmgguf.eval.cli import eval_group
from glmgguf.gguf.cli import convert_cmd, inspect_cmd, quantize_cmd, recipes_cmd
from glmgguf.gguf.kld import kld_cmd
from glmgguf.kd.cli import kd as kd_cmd
from glmgguf.llama import cli as llama_cli
from glmgguf.llama.patch_cli import patch as patch_cmd
from glmgguf.nvfp4.cli import nvfp4 as nvfp4_cmd
from glmgguf.pipeline.cli import pipeline as pipeline_cmd
from glmgguf.reap.cli import reap as reap_cmd
from glmgguf.testbed.cli import testbed as testbed_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glmgguf")
def main() -> None:
    """Turn GLM-5.x MoE checkpoints into GGUF builds that llama.cpp runs."""


main.add_command(llama_cli.llama)
main.add_command(patch_cmd)
main.add_command(convert_cmd)
main.add_command(quantize_cmd)
main.add_command(inspect_cmd)
main.add_command(recipes_cmd)
main.add_command(kld_cmd)
main.add_command(testbed_cmd)
main.add_command(demo)
main.add_command(reap_cmd)
main.add_command(kd_cmd)
main.add_command(nvfp4_cmd)
main.add_command(eval_group)
main.add_command(pipeline_cmd)
