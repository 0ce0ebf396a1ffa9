"""Router-KD's training record: periodic checkpoints in the work directory and the loss curve."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glmgguf.errors import storage_errors

LATEST = "LATEST"


def plot_curve(log: dict, path: Path) -> None:
    """The loss curve: per-step trunk (and MTP) KL, a moving average, and held-out KL points when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = log["steps"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if recs:
        xs = [r["step"] for r in recs]
        ys = [r["kl"] for r in recs]
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, lw=0.8, label="train KL (batch)")
        w = max(1, len(ys) // 20)
        avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, avg, color="tab:blue", lw=1.6, label=f"train KL ({w}-step mean)")
        if recs[0].get("mtp_kl") is not None:
            ax.plot(xs, [r["mtp_kl"] for r in recs], color="tab:orange", alpha=0.5, lw=0.8, label="train MTP KL")
    evals = log.get("evals") or []
    if evals:
        ax.plot([e["step"] for e in evals], [e["kl"] for e in evals], "o-", color="tab:red", label="eval-cache KL")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.set_title(f"Router-KD: {log.get('student', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_checkpoint(work: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                    state: dict) -> None:
    """Write step `step`'s trainable tensors, optimizer state and run state, then point LATEST at it and drop
    older checkpoints (each move atomic: an interruption leaves the previous checkpoint usable)."""
    d = work / f"checkpoint-{step:07d}"
    tmp = work / f"checkpoint-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with storage_errors(d):
            save_file({n: p.detach().to("cpu").contiguous() for n, p in params.items()},
                      str(tmp / "trainable.safetensors"))
            buf = io.BytesIO()  # torch.save's file writer hides a full disk behind a RuntimeError: write it here
            torch.save(opt.state_dict(), buf)
            (tmp / "optimizer.pt").write_bytes(buf.getbuffer())
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_checkpoint(work, tmp, d)


def save_trainable(work: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, state: dict,
                   root: nn.Module | None = None, dist=None) -> None:
    """A periodic checkpoint of the trained tensors: DCP shards under FSDP (`root`, `dist`), else one file each."""
    if dist is not None:
        from glmgguf.kd.fsdp import save_sharded

        save_sharded(work, step, params, opt, root, state, dist)
    else:
        save_checkpoint(work, step, params, opt, state)


def load_trainable(ckpt: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                   root: nn.Module | None = None) -> None:
    """The trained tensors and optimizer state of a checkpoint into `params` / `opt` (DCP under FSDP, `root`)."""
    from glmgguf.kd.errors import KdError
    from glmgguf.kd.fsdp import is_sharded_checkpoint, load_sharded

    if is_sharded_checkpoint(ckpt) != (root is not None):
        raise KdError(f"checkpoint {ckpt} was written {'with' if root is None else 'without'} --fsdp: resume it "
                      "the same way")
    if root is not None:
        load_sharded(ckpt, params, opt, root)
        return
    saved = load_file(str(ckpt / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))


def publish_checkpoint(work: Path, tmp: Path, final: Path) -> None:
    """Move a written checkpoint `tmp` to `final`, point LATEST at it and drop older checkpoints (each move
    atomic: an interruption leaves the previous checkpoint usable)."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (work / (LATEST + ".partial")).write_text(final.name)
    os.replace(work / (LATEST + ".partial"), work / LATEST)
    for old in work.glob("checkpoint-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(work: Path) -> Path | None:
    """The checkpoint LATEST names, if it is complete."""
    p = work / LATEST
    if not p.is_file():
        return None
    d = work / p.read_text().strip()
    return d if (d / "state.json").is_file() else None


def clear_work(work: Path, extra: tuple[str, ...] = ()) -> None:
    """Remove what a KD run writes into its work directory (checkpoints, LATEST, the `extra` file names), then the
    directory itself if that leaves it empty. Anything else in it (a user's folder given as --work-dir) stays."""
    if not work.is_dir():
        return
    for entry in work.iterdir():
        if entry.name.startswith("checkpoint-") and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name in (LATEST, LATEST + ".partial", *extra):
            entry.unlink()
    if not any(work.iterdir()):
        work.rmdir()
