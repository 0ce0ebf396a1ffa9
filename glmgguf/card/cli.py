"""`glmgguf card OUTPUT`: the model card of one pipeline output, with the family table of its workdir."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("card")
@click.argument("output", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the card (default: README.md inside a folder output, beside a file output).")
@click.option("--base-model", help="The source model's Hugging Face repository (org/name), when the manifests do "
                                   "not say it.")
@click.option("--license", "license_", help="The source model's license (e.g. mit), when its README does not say it.")
@click.option("--kld", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A `glmgguf kld --json` file holding this GGUF's KL divergence.")
def card_cmd(output: Path, out: Path | None, base_model: str | None, license_: str | None, kld: Path | None) -> None:
    """Write the model card (README.md with YAML front matter) of OUTPUT, a pipeline stage output: a GGUF file
    or split folder, an NVFP4 folder or a pruned / distilled checkpoint, with its stage manifest beside it.

    Only facts from manifests and measurements go on the card; measurements that were not run are listed.
    """
    from glmgguf.card.facts import find_stage
    from glmgguf.card.gather import gather
    from glmgguf.card.pipeline import card_path, workdir_builds
    from glmgguf.card.render import FamilyRow, render

    facts = gather(output, base_model, license_, kld=kld)
    target = (out or card_path(find_stage(output).output)).resolve()
    rows = [FamilyRow(facts if b.name == facts.name else gather(b.output, base_model, license_), card_path(b.output))
            for b in workdir_builds(facts.workdir)]
    target.write_text(render(facts, rows, target.parent))
    click.echo(f"wrote {target}")
