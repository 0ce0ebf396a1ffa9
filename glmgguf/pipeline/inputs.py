"""The plan's inputs: the source model, the text files, recipes and imatrix files, checked against the model."""

from __future__ import annotations

import json
from pathlib import Path

from glmgguf.layout import GlmLayout, LayoutError
from glmgguf.pipeline.plan import BUILTIN_DATA, BUILTIN_MODELS, Plan, PlanError

EVAL_PROMPT_SETS = ("fuzz",)


def _relative(plan: Plan, value: str) -> Path:
    return (plan.base / value).resolve()


def _builtin(model: str) -> tuple[str, bool]:
    """`testbed:SIZE[-fp8]` -> (SIZE, stored as block-FP8)."""
    name = model.split(":", 1)[1]
    return name.removesuffix("-fp8"), name.endswith("-fp8")


def model_config(plan: Plan, override: Path | None = None) -> dict:
    """The source model's config.json (`override` stands in for it in dry runs of models not on this machine)."""
    if override is not None:
        return json.loads(Path(override).read_text())
    if plan.model in BUILTIN_MODELS:
        from glmgguf.testbed.build import config_json

        size, fp8 = _builtin(plan.model)
        return config_json(size, fp8=fp8)
    cfg = _relative(plan, plan.model) / "config.json"
    if not cfg.is_file():
        raise PlanError(f"{plan.where('pipeline', 'model')}: model {plan.model!r} has no config.json "
                        f"(looked for {cfg}; or use one of {', '.join(BUILTIN_MODELS)})")
    return json.loads(cfg.read_text())


def model_path(plan: Plan) -> Path:
    """Where the source checkpoint is (a builtin testbed: its cache entry, which may not be trained yet)."""
    if plan.model in BUILTIN_MODELS:
        from glmgguf.cache import cache_root
        from glmgguf.testbed.train import DEFAULT_STEPS, cache_key

        size, fp8 = _builtin(plan.model)
        path = cache_root() / "testbed" / f"{size}-trained-{cache_key(size, 0, DEFAULT_STEPS.get(size, 200))}"
        return path.with_name(path.name + "-fp8") if fp8 else path
    return _relative(plan, plan.model)


def resolve_model(plan: Plan) -> Path:
    """The source checkpoint directory; a builtin testbed is trained (once, cached) on first use."""
    if plan.model in BUILTIN_MODELS:
        from glmgguf.testbed.release_fp8 import trained_fp8_testbed
        from glmgguf.testbed.train import trained_testbed

        size, fp8 = _builtin(plan.model)
        return trained_fp8_testbed(size) if fp8 else trained_testbed(size)
    return _relative(plan, plan.model)


def data_path(plan: Plan, entry: str) -> Path:
    """Where a [data] entry's file is: a builtin split's under WORKDIR/data, a path relative to the plan."""
    if entry in BUILTIN_DATA:
        return plan.workdir / "data" / f"{entry.replace(':', '-')}.jsonl"
    return _relative(plan, entry)


def data_files(plan: Plan, kind: str) -> list[Path]:
    """The [data] `kind` files; builtin splits are written first (same bytes every time)."""
    out = []
    for entry in getattr(plan.data, kind):
        path = data_path(plan, entry)
        if entry in BUILTIN_DATA and not path.is_file():
            from glmgguf.testbed import stdlib_corpus

            path.parent.mkdir(parents=True, exist_ok=True)
            docs = [d for d in stdlib_corpus(entry.split(":", 1)[1]) if d.strip()]
            tmp = path.with_name(path.name + ".partial")
            tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            tmp.replace(path)
        out.append(path)
    return out


def kld_text_path(plan: Plan) -> Path:
    """Where the [kld] text is: a builtin split's as plain text under WORKDIR/data, a path relative to the plan."""
    assert plan.kld is not None
    entry = plan.kld.text
    if entry in BUILTIN_DATA:
        return plan.workdir / "data" / f"{entry.replace(':', '-')}.txt"
    return _relative(plan, entry)


def kld_text(plan: Plan) -> Path:
    """The [kld] text file; a builtin split is written first (same bytes every time)."""
    from glmgguf.gguf.kld import write_heldout_text

    path = kld_text_path(plan)
    assert plan.kld is not None
    if plan.kld.text in BUILTIN_DATA and not path.is_file():
        tmp = write_heldout_text(path.with_name(path.name + ".partial"), split=plan.kld.text.split(":", 1)[1])
        tmp.replace(path)
    return path


def recipe_ref(plan: Plan, recipe: str) -> str:
    """A shipped recipe name as is; a .toml file relative to the plan, made absolute."""
    return str(_relative(plan, recipe)) if recipe.endswith(".toml") else recipe


def eval_prompts(plan: Plan) -> str:
    assert plan.eval is not None
    p = plan.eval.prompts
    return p if p in EVAL_PROMPT_SETS else str(_relative(plan, p))


def check_inputs(plan: Plan, config: dict, check_files: bool = True) -> GlmLayout:
    """Everything that can be checked before work starts; returns the source model's layout."""
    from glmgguf.gguf.recipe import RecipeError, load_recipe

    try:
        layout = GlmLayout.from_config(config)
    except LayoutError as e:
        raise PlanError(f"{plan.where('pipeline', 'model')}: model {plan.model!r}: {e}") from None
    if check_files and plan.model not in BUILTIN_MODELS and not (_relative(plan, plan.model) / "config.json").is_file():
        raise PlanError(f"{plan.where('pipeline', 'model')}: model directory {_relative(plan, plan.model)} not found")
    if check_files:
        for kind in ("calibration", "kd", "heldout"):
            for entry in getattr(plan.data, kind):
                if entry not in BUILTIN_DATA and not _relative(plan, entry).is_file():
                    raise PlanError(f"{plan.where('data', kind)}: [data] {kind} file {_relative(plan, entry)} not "
                                    f"found (builtin text: {', '.join(BUILTIN_DATA)})")
    if plan.reap is not None and plan.reap.keep is not None:
        most = max((layer.n_experts for layer in layout.moe_layers), default=0)
        if plan.reap.keep > most:
            raise PlanError(f"{plan.where('reap', 'keep')}: [reap] keep = {plan.reap.keep} is more than the "
                            f"model's {most} routed experts per layer")
        if plan.reap.keep < layout.experts_per_tok:
            raise PlanError(f"{plan.where('reap', 'keep')}: [reap] keep = {plan.reap.keep} is fewer than the "
                            f"{layout.experts_per_tok} experts each token is routed to")
    for i, g in enumerate(plan.gguf):
        try:
            load_recipe(recipe_ref(plan, g.recipe))
        except RecipeError as e:
            raise PlanError(f"{plan.where('gguf', 'recipe', i)}: {e}") from None
        if g.imatrix is not None and check_files and not g.imatrix.is_file():
            raise PlanError(f"{plan.where('gguf', 'imatrix', i)}: imatrix file {g.imatrix} not found")
    if plan.kld is not None and check_files and plan.kld.text not in BUILTIN_DATA:
        if not kld_text_path(plan).is_file():
            raise PlanError(f"{plan.where('kld', 'text')}: [kld] text file {kld_text_path(plan)} not found "
                            f"(builtin text: {', '.join(BUILTIN_DATA)})")
    if plan.eval is not None and check_files and plan.eval.prompts not in EVAL_PROMPT_SETS:
        if not _relative(plan, plan.eval.prompts).is_file():
            raise PlanError(f"{plan.where('eval', 'prompts')}: prompts file {_relative(plan, plan.eval.prompts)} "
                            f"not found (builtin: {', '.join(EVAL_PROMPT_SETS)})")
    return layout
