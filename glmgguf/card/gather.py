"""All the facts of one build (`BuildFacts`), from its stage manifest, its lineage and its files."""

from __future__ import annotations

from pathlib import Path

from glmgguf.card import facts as F
from glmgguf.card import files
from glmgguf.gguf.recipe import Recipe, builtin_recipes, load_recipe


def _shipped_recipes() -> dict[str, Recipe]:
    return {name: load_recipe(name) for name in builtin_recipes()}


def gather(output: Path, base_model: str | None = None, license: str | None = None,
           kld: Path | None = None) -> F.BuildFacts:
    """The facts of the pipeline output `output` (a GGUF file or split folder, an NVFP4 folder, a checkpoint).

    `base_model` / `license` override what the source model's folder says (a Hugging Face cache path names its
    repository, its README's front matter its license); `kld` is a `glmgguf kld --json` file that may hold this
    GGUF's KL divergence (default: the pipeline's `kld` stage's, when current).
    """
    rec = F.find_stage(output)
    records = F.lineage(rec)
    src = F.source_model_path(records)
    ckpt = F.checkpoint_dir(records)
    common = {"name": rec.name, "output": rec.output, "source": src.name if src else None,
              "base_model": base_model or F.hub_id(src),
              "license": license or (F.front_matter_value(src / "README.md", "license") if src else None),
              "prune": F.prune_facts(ckpt), "kd": F.kd_facts(ckpt), "workdir": rec.dir.parent}
    if rec.output.suffix == ".gguf" or (rec.output.is_dir() and any(rec.output.glob("*.gguf"))):
        summary, g = files.gguf_facts(rec.output, _shipped_recipes())
        evals = F.eval_facts(rec)
        return F.BuildFacts(kind="gguf", size_bytes=F.files_size(files.gguf_parts(rec.output)), storage="GGUF",
                            model=files.gguf_model(summary), gguf=g, evals=evals, lora=F.lora_facts(records, evals),
                            baseline=F.baseline_facts(rec, records) if evals else (),
                            kld=F.kld_facts(kld or F.pipeline_kld(rec), g.files[0]), **common)
    if not (rec.output / "config.json").is_file():
        raise F.CardError(f"{rec.output}: neither a GGUF nor a checkpoint with a config.json")
    nv = files.nvfp4_facts(rec.output)
    return F.BuildFacts(kind="nvfp4" if nv else "checkpoint",
                        size_bytes=F.files_size(files.weight_files(rec.output)),
                        storage=files.checkpoint_storage(rec.output), model=files.checkpoint_model(rec.output),
                        nvfp4=nv, evals=F.eval_facts(rec), lora=F.lora_facts(records, ()), **common)
