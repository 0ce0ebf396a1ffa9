"""`glmgguf kd`: teacher (cache the unpruned model's distributions), train (router-only distillation), lora, eval."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click

from glmgguf.choices import DTYPES, KD_SCHEDULES
from glmgguf.cli_options import DEVICE_MAP_PARAM, parse_size_option, stack_options, streaming_options, text_options


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


_threads_opt = click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch.")


def _training_options(lr: float, trained: str) -> Callable[[Callable], Callable]:
    """The options `kd train` and `kd lora` share (the student, the optimizer, FSDP, checkpoints); `lr` is the
    default learning rate, `trained` what trains in float32."""
    options = [
        click.option("--teacher-cache", "cache", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Cache written by `glmgguf kd teacher` from the unpruned teacher."),
        click.option("--lr", default=lr, show_default=True, type=float, help="AdamW learning rate."),
        click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="Optimizer steps."),
        click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
                     help="Sequences per step (under --fsdp the global batch, split across the ranks)."),
        click.option("--schedule", type=click.Choice(KD_SCHEDULES), default="constant", show_default=True,
                     help="Learning-rate schedule after warmup (cosine ends at 10%)."),
        click.option("--warmup", "warmup_steps", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Linear warmup steps."),
        click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0.0),
                     help="Clip the gradient norm (0: off)."),
        click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="f32", show_default=True,
                     help=f"Dtype the frozen model runs in ({trained} train in float32 either way)."),
        click.option("--device-map", default=None, type=DEVICE_MAP_PARAM,
                     help="accelerate device_map of the student: 'auto' places it across all GPUs, 'cuda', 'cpu' "
                          "[default: cpu]; under --fsdp cpu or cuda per rank."),
        click.option("--fsdp", is_flag=True,
                     help="Under torchrun: shard the student over the ranks with FSDP2 and split each batch across "
                          "them; rank 0 writes the outputs."),
        click.option("--cpu-offload", is_flag=True, help="With --fsdp: keep the parameter shards in host memory."),
        click.option("--save-every", default=50, show_default=True, type=click.IntRange(min=0),
                     help="Checkpoint every N steps (0: none)."),
        click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --work-dir."),
        click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Checkpoints  [default: OUT.work]"),
        click.option("--eval-cache", type=click.Path(file_okay=False, path_type=Path),
                     help="A held-out teacher cache to measure during training (not with --fsdp)."),
        click.option("--eval-every", default=0, show_default=True, type=click.IntRange(min=0),
                     help="With --eval-cache: measure every N steps (and at start and end)."),
        click.option("--no-gradient-checkpointing", is_flag=True, help="Keep all activations (faster, more memory)."),
        _threads_opt,
    ]
    return stack_options(*options)


@click.group("kd")
def kd() -> None:
    """Router-KD: distill a pruned model's routers to the unpruned teacher (only gate tensors change); LoRA-KD."""


@kd.command("teacher")
@click.argument("model", type=click.Path(file_okay=False, path_type=Path))
@text_options("KD text")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Cache directory.")
@click.option("--top-k", default=64, show_default=True, type=click.IntRange(min=1),
              help="Teacher tokens kept per position (the rest is one bucket); >= vocab size keeps all.")
@streaming_options("Compute dtype of the teacher.")
@click.option("--shard-size", default="2G", show_default=True, callback=parse_size_option,
              help="Bytes per cache shard.")
@_threads_opt
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def teacher_cmd(model: Path, data: tuple[Path, ...], out: Path, top_k: int, seq_len: int, max_tokens: int | None,
                num_samples: int | None, seed: int, text_field: str, batch_size: int, streaming: bool, device: str,
                dtype: str, work_dir: Path | None, spill_threshold: int, shard_size: int, threads: int | None,
                force: bool) -> None:
    """Run the unpruned teacher MODEL over the KD text once and cache its top-k next-token distributions.

    Under `torchrun --nproc-per-node N -m glmgguf kd teacher ...` each rank runs its share of the text on its own
    device and rank 0 writes the cache one process would write."""
    from glmgguf.dist import launch
    from glmgguf.kd.identity import file_hashes
    from glmgguf.kd.teacher import build_teacher_cache
    from glmgguf.layout import GlmLayout
    from glmgguf.textpass import TextPass

    _threads(threads)
    with launch(device) as dist:
        tp = TextPass.prepare(model, out, force=force, data=data, seq_len=seq_len, max_tokens=max_tokens,
                              num_samples=num_samples, seed=seed, text_field=text_field, batch_size=batch_size,
                              streaming=streaming, device=device, dtype=dtype, work_dir=work_dir,
                              spill_threshold=spill_threshold, dist=dist)
        layout = GlmLayout.from_dir(model)
        text = {"files": file_hashes(data), "seed": seed, "max_tokens": max_tokens, "num_samples": num_samples,
                "text_field": text_field, **tp.text.describe()}
        if dist is None or dist.main:
            click.echo(tp.describe("KD text") + f", top-{min(top_k, layout.vocab_size)} of {layout.vocab_size}")
        with tp.progress(layout.n_layers, "teacher") as progress:
            res = build_teacher_cache(
                model, tp.text.sequences, out, top_k=top_k, streaming=streaming, batch_size=batch_size,
                dtype=tp.dtype, device=tp.device, device_map=None if tp.device == "cpu" else tp.device,
                work_dir=tp.work_dir, spill_bytes=spill_threshold, shard_bytes=shard_size, text=text, force=force,
                progress=progress, dist=dist)
        tp.finish()
    if res is None:
        return
    m = res.manifest
    click.echo(f"wrote {out}: {m['positions']} positions in {len(m['shards'])} shard(s), top-{m['top_k']}, "
               f"mean mass outside the top-k {m['mean_rest_mass']:.4f}, {res.seconds:.1f} s"
               + (f"; resumed after layers {m['layers_resumed']}" if m.get("layers_resumed") else ""))


@kd.command("train")
@click.argument("student", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output checkpoint: STUDENT with only the router tensors changed.")
@_training_options(5e-5, "routers")
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--train-bias", is_flag=True,
              help="Also train e_score_correction_bias (straight-through gradient; it only selects experts).")
@click.option("--no-mtp", is_flag=True, help="Leave the MTP block's router unchanged.")
@click.option("--mtp-weight", default=1.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Weight of the MTP head's KL in the loss.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data order.")
@click.option("--data", "data", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The KD text files: checked against the cache (refused when the cache was made from others).")
@click.option("--force", is_flag=True, help="Overwrite OUT; discard checkpoints of an earlier run.")
def train_cmd(student: Path, cache: Path, out: Path, lr: float, steps: int, batch_size: int, schedule: str,
              warmup_steps: int, weight_decay: float, grad_clip: float, train_bias: bool, no_mtp: bool,
              mtp_weight: float, seed: int, dtype: str, device_map: str | None, no_gradient_checkpointing: bool,
              fsdp: bool, cpu_offload: bool, save_every: int, resume: bool, work_dir: Path | None,
              eval_cache: Path | None, eval_every: int, data: tuple[Path, ...],
              threads: int | None, force: bool) -> None:
    """Train only the MoE routers of STUDENT (pruned from the teacher) to match the teacher cache.

    On many GPUs: `torchrun --nproc-per-node N -m glmgguf kd train ... --fsdp` (rank 0 writes OUT)."""
    from tqdm import tqdm

    from glmgguf.dist import launch
    from glmgguf.kd.train import LOG_NAME, TrainOptions, train_router

    _threads(threads)
    opts = TrainOptions(steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, schedule=schedule, grad_clip=grad_clip, train_bias=train_bias,
                        mtp=not no_mtp, mtp_weight=mtp_weight, seed=seed, dtype=DTYPES[dtype],
                        device_map=None if device_map in (None, "cpu") else device_map,
                        gradient_checkpointing=not no_gradient_checkpointing, save_every=save_every,
                        eval_every=eval_every, fsdp=fsdp, cpu_offload=cpu_offload)
    if cpu_offload and not fsdp:
        raise click.UsageError("--cpu-offload needs --fsdp")
    bar: list = []

    def progress(step: int, total: int, rec: dict) -> None:
        if not bar:
            bar.append(tqdm(total=total, initial=step - 1, unit="step", desc="router-KD", dynamic_ncols=True))
        b = bar[0]
        b.update(1)
        post = f"KL {rec['kl']:.4f}"
        if rec.get("mtp_kl") is not None:
            post += f", MTP {rec['mtp_kl']:.4f}"
        b.set_postfix_str(post + f", lr {rec['lr']:.2e}")

    def log(line: str) -> None:
        (bar[0].write if bar else click.echo)(line)

    try:
        with launch(device_map or "auto") as dist:
            if dist is not None and fsdp:
                opts.device_map = None  # each rank reads its own shards onto its device (load_sharded_student)
            res = train_router(student, cache, out, opts, work_dir=work_dir, resume=resume, force=force,
                               eval_cache=eval_cache, data=list(data) or None, progress=progress, log=log,
                               dist=dist)
    finally:
        if bar:
            bar[0].close()
    if res is None:
        return
    w = res.write
    recs = res.records
    first = sum(r["kl"] for r in recs[:10]) / max(len(recs[:10]), 1) if recs else float("nan")
    last = sum(r["kl"] for r in recs[-10:]) / max(len(recs[-10:]), 1) if recs else float("nan")
    click.echo(f"train KL {first:.5f} (first 10 steps) -> {last:.5f} (last 10)")
    click.echo(f"wrote {out}: {len(w.changed)} router tensors changed, {w.identical} of {w.n_tensors} tensors "
               f"verified byte-identical to the student; log {out / LOG_NAME}, curve {out / 'kd_loss.png'} "
               f"({res.seconds:.1f} s)")


@kd.command("eval")
@click.argument("model", type=click.Path(file_okay=False, path_type=Path))
@click.option("--teacher-cache", "cache", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Teacher cache of held-out text (`glmgguf kd teacher`).")
@click.option("--data", "data", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The text the cache should have been made from (checked).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="f32", show_default=True)
@click.option("--device-map", default=None, type=DEVICE_MAP_PARAM,
              help="accelerate device_map ('auto' over all GPUs) [default: cpu].")
@click.option("--no-mtp", is_flag=True, help="Do not measure the MTP head.")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A PEFT adapter directory (`kd lora --out`) applied to MODEL.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result.")
@_threads_opt
def eval_cmd(model: Path, cache: Path, data: tuple[Path, ...], batch_size: int, dtype: str, device_map: str | None,
             no_mtp: bool, adapter: Path | None, json_out: Path | None, threads: int | None) -> None:
    """KL(teacher || MODEL) and top-1 agreement on the cached (held-out) text, for any checkpoint."""
    import torch

    from glmgguf.kd.evaluate import evaluate

    _threads(threads)
    t0 = time.perf_counter()
    res = evaluate(model, cache, batch_size=batch_size, dtype=getattr(torch, DTYPES[dtype]),
                   device_map=None if device_map in (None, "cpu") else device_map, mtp=not no_mtp,
                   data=list(data) or None, adapter=adapter)
    if json_out is not None:
        json_out.write_text(json.dumps(res.to_json(), indent=1) + "\n")
    click.echo(f"{model.name}: {res} (top-{res.cache_top_k} cache, {time.perf_counter() - t0:.1f} s)")


@kd.command("lora")
@click.argument("student", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="PEFT adapter directory (PeftModel.from_pretrained on STUDENT).")
@_training_options(1e-3, "the adapters")
@click.option("--target", "targets", default="attn,shared", show_default=True,
              help="Modules that get adapters, comma-separated: attn (MLA projections), attn_out (o_proj only: "
                   "with shared and dense, what `kd lora-gguf` can write), shared (shared experts of the MoE "
                   "layers), dense (MLPs of the dense layers); experts is refused.")
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank.")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="LoRA alpha (scale alpha / rank).")
@click.option("--train-gates", is_flag=True, help="Also train the MoE router gates (saved with the adapter).")
@click.option("--gate-lr", type=float, help="With --train-gates: the gates' learning rate  [default: --lr]")
@click.option("--seed", default=0, show_default=True, help="Seed of the data order and the adapters' init.")
@click.option("--merge", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the merged checkpoint here (STUDENT's layout; only adapted tensors change; adapted "
                   "block-FP8 weights stored BF16).")
@click.option("--force", is_flag=True, help="Overwrite OUT and the --merge directory; discard earlier checkpoints.")
def lora_cmd(student: Path, cache: Path, out: Path, targets: str, rank: int, alpha: float, train_gates: bool,
             gate_lr: float | None, lr: float, steps: int, batch_size: int, schedule: str, warmup_steps: int,
             grad_clip: float, seed: int, dtype: str, device_map: str | None, merge: Path | None, fsdp: bool,
             cpu_offload: bool, save_every: int, resume: bool, work_dir: Path | None, eval_cache: Path | None,
             eval_every: int, no_gradient_checkpointing: bool, threads: int | None, force: bool) -> None:
    """Train LoRA adapters of STUDENT (and with --train-gates its routers) to match the teacher cache.

    On many GPUs: `torchrun --nproc-per-node N -m glmgguf kd lora ... --fsdp` (rank 0 writes OUT)."""
    from tqdm import tqdm

    from glmgguf.dist import launch
    from glmgguf.kd.lora import LoraOptions, train_lora
    from glmgguf.kd.train import TrainOptions

    _threads(threads)
    if cpu_offload and not fsdp:
        raise click.UsageError("--cpu-offload needs --fsdp")
    train = TrainOptions(steps=steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps, schedule=schedule,
                         grad_clip=grad_clip, seed=seed, mtp=False, save_every=save_every, dtype=DTYPES[dtype],
                         device_map=None if device_map in (None, "cpu") else device_map, fsdp=fsdp,
                         cpu_offload=cpu_offload, gradient_checkpointing=not no_gradient_checkpointing,
                         eval_every=eval_every)
    opts = LoraOptions(train=train, rank=rank, alpha=alpha, targets=tuple(t.strip() for t in targets.split(",")),
                       train_gates=train_gates, gate_lr=gate_lr)
    with launch(device_map or "auto") as dist:
        if dist is not None and fsdp:
            train.device_map = None  # each rank reads its own shards onto its device
        with tqdm(total=steps, unit="step", desc="LoRA-KD", dynamic_ncols=True,
                  disable=dist is not None and not dist.main) as bar:
            def progress(step: int, total: int, rec: dict) -> None:
                bar.update(1)
                bar.set_postfix_str(f"KL {rec['kl']:.4f}, lr {rec['lr']:.2e}")

            res = train_lora(student, cache, out, opts, merge=merge, work_dir=work_dir, resume=resume, force=force,
                             progress=progress, log=bar.write, dist=dist, eval_cache=eval_cache)
    if res is None:
        return
    recs, evals = res.log["steps"], res.log["evals"]
    click.echo(f"train KL {recs[0]['kl']:.5f} (step 1) -> {recs[-1]['kl']:.5f} (step {len(recs)}); "
               f"{res.log['trainable_parameters']:,} trainable parameters, {res.seconds_per_step:.3f} s/step")
    if len(evals) >= 2:
        click.echo(f"held-out KL {evals[0]['kl']:.5f} (step {evals[0]['step']}) -> {evals[-1]['kl']:.5f} "
                   f"(step {evals[-1]['step']})")


@kd.command("lora-gguf")
@click.argument("adapter", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The student ADAPTER was trained on (its `glmgguf convert` GGUF is what the adapter applies to).")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def lora_gguf_cmd(adapter: Path, out: Path, base: Path, force: bool) -> None:
    """Write the PEFT adapter ADAPTER (from `kd lora`) as a llama.cpp LoRA adapter GGUF (`--lora OUT`).

    Adapters on o_proj, the shared experts and the dense MLPs are written, and co-trained router gates as an
    exact full-rank pair; the other MLA projections (q_a, q_b, kv_a, kv_b) are refused, as llama.cpp applies no
    LoRA to them: use `kd lora --merge` and `glmgguf convert` for those.
    """
    from glmgguf.kd.lora_gguf import write_lora_gguf

    rep = write_lora_gguf(adapter, base, out, force=force)
    click.echo(f"{rep.out}: {rep.n_modules} adapted tensors, rank {rep.rank}, alpha {rep.alpha:g}")
