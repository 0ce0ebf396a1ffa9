"""Train a testbed model on Python standard-library source so that its routers specialize.

A random-init MoE routes tokens almost uniformly; pruning, observation and distillation stages need a model
whose experts matter unequally. A few minutes of CPU training on code text (all trunk weights, the MTP head too)
makes expert load skewed and token-dependent. The result is cached, keyed by everything that shapes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from glmgguf.cache import cache_root
from glmgguf.locks import cache_entry_lock
from glmgguf.testbed.build import new_testbed_model, save_testbed
from glmgguf.testbed.configs import testbed_config_kwargs
from glmgguf.testbed.tokenizer import (
    PAD_TOKEN,
    build_tokenizer,
    corpus_fingerprint,
    special_token_ids,
    stdlib_corpus,
)
from glmgguf.threads import free_cores

# Part of the cache key (with a digest of this package's source files): bump to force retraining.
TRAIN_CODE_VERSION = 1

DEFAULT_STEPS = {"tiny": 400, "small": 200}
SEQ_LEN = 128
BATCH_SIZE = 8
LR = 1e-3
MIN_LR_FRACTION = 0.1
WARMUP_STEPS = 30
WEIGHT_DECAY = 0.01
MTP_LOSS_WEIGHT = 0.3
# Routers learn 30x faster than the rest: a few hundred steps then skew expert load the way long pretraining
# without a balancing loss does (some experts busy, some nearly idle) instead of leaving it near-uniform.
ROUTER_LR_MULT = 30.0
EVAL_SEQS = 32
REPORT_NAME = "train_report.json"

__all__ = ["DEFAULT_STEPS", "REPORT_NAME", "evaluate", "stdlib_corpus", "train_testbed",
           "trained_testbed"]


def _hyperparams(size: str, seed: int, steps: int) -> dict:
    return {
        "size": size, "seed": seed, "steps": steps, "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE, "lr": LR,
        "min_lr_fraction": MIN_LR_FRACTION, "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY,
        "mtp_loss_weight": MTP_LOSS_WEIGHT, "router_lr_mult": ROUTER_LR_MULT, "eval_seqs": EVAL_SEQS,
    }


def _source_digest() -> str:
    """Digest of the testbed's own source files: editing how the model is built or trained invalidates caches."""
    h = hashlib.sha256()
    for name in ("configs.py", "tokenizer.py", "build.py", "train.py"):
        h.update((Path(__file__).with_name(name)).read_bytes())
    return h.hexdigest()[:16]


def cache_key(size: str, seed: int, steps: int) -> str:
    """Key of a trained testbed: config, seed, steps, hyperparameters, code, corpus and library versions."""
    import transformers

    blob = json.dumps({
        "config": testbed_config_kwargs(size), "hyper": _hyperparams(size, seed, steps),
        "code": TRAIN_CODE_VERSION, "source": _source_digest(), "corpus": corpus_fingerprint(),
        "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def token_stream(split: str, max_bytes: int | None = None) -> torch.Tensor:
    """The split's files tokenized and concatenated, each file followed by <|endoftext|>."""
    tok = build_tokenizer()
    eot = special_token_ids()[PAD_TOKEN]
    ids: list[int] = []
    for enc in tok.encode_batch(stdlib_corpus(split, max_bytes=max_bytes), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def heldout_batch(n_seqs: int = EVAL_SEQS, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """A fixed [n_seqs, seq_len + 1] block of held-out tokens (evenly spaced windows)."""
    stream = token_stream("heldout")
    span = seq_len + 1
    if len(stream) < n_seqs * span:
        raise RuntimeError(f"held-out corpus too small: {len(stream)} tokens")
    starts = torch.linspace(0, len(stream) - span, n_seqs).long()
    return torch.stack([stream[s:s + span] for s in starts])


def _batches(stream: torch.Tensor, batch: int, span: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        starts = torch.randint(0, len(stream) - span, (batch,), generator=gen)
        yield torch.stack([stream[s:s + span] for s in starts])


# ---------------------------------------------------------------------------------------------------------------
# Forward pieces
# ---------------------------------------------------------------------------------------------------------------

def _causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def forward_losses(model, mtp, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token loss of the trunk and (if `mtp`) token t+2 loss of the MTP head, on [B, S+1] token windows."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    hidden = model.model(input_ids=inputs).last_hidden_state  # final-norm output
    logits = model.lm_head(hidden)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if mtp is None:
        return loss, None
    # position t: trunk state h_t and embedding of token t+1 -> token t+2
    h = hidden[:, :-1]
    e = model.model.embed_tokens(inputs[:, 1:])
    n = h.shape[1]
    pos = torch.arange(n).unsqueeze(0)
    pos_emb = model.model.rotary_emb(h, position_ids=pos)
    mtp_logits = mtp.mtp_forward(h, e, pos_emb, _causal_mask(n, h.dtype), lm_head=model.lm_head)
    mtp_loss = F.cross_entropy(mtp_logits.float().reshape(-1, mtp_logits.shape[-1]), seqs[:, 2:].reshape(-1))
    return loss, mtp_loss


@contextlib.contextmanager
def _count_routing(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Count, per router, how often each expert is among the selected top-k."""
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for key, gate in modules.items():
        counts[key] = torch.zeros(gate.num_experts, dtype=torch.long)

        def hook(mod, inp, out, key=key):
            counts[key] += torch.bincount(out[2].reshape(-1), minlength=mod.num_experts)

        handles.append(gate.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def normalized_entropy(counts: torch.Tensor) -> float:
    """Entropy of the expert-load distribution divided by log(n_experts): 1.0 = perfectly uniform."""
    p = counts.double() / counts.sum()
    ent = -(p * p.clamp_min(1e-300).log()).sum()
    return float(ent / math.log(len(counts)))


def _routers(model, mtp) -> dict[str, torch.nn.Module]:
    gates = {str(i): layer.mlp.gate for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}
    if mtp is not None:
        gates[str(model.config.num_hidden_layers)] = mtp.mlp.gate
    return gates


@torch.no_grad()
def evaluate(model, mtp, seqs: torch.Tensor, batch: int = 8) -> dict:
    """Held-out loss (trunk and MTP) and normalized expert-load entropy per MoE layer (MTP layer included)."""
    was_training = model.training
    model.eval()
    if mtp is not None:
        mtp.eval()
    losses, mtp_losses = [], []
    with _count_routing(_routers(model, mtp)) as counts:
        for i in range(0, len(seqs), batch):
            loss, mtp_loss = forward_losses(model, mtp, seqs[i:i + batch])
            losses.append(loss.item())
            if mtp_loss is not None:
                mtp_losses.append(mtp_loss.item())
    if was_training:
        model.train()
        if mtp is not None:
            mtp.train()
    out = {
        "heldout_loss": sum(losses) / len(losses),
        "expert_load_entropy": {k: round(normalized_entropy(c), 6) for k, c in counts.items()},
        "expert_load": {k: c.tolist() for k, c in counts.items()},
    }
    if mtp_losses:
        out["mtp_heldout_loss"] = sum(mtp_losses) / len(mtp_losses)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def _lr_at(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return LR * (step + 1) / WARMUP_STEPS
    t = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def train_model(model, mtp, steps: int, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Train `model` (+ `mtp`) in place on the standard-library train split; returns the report dict."""
    threads = free_cores()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    stream = token_stream("train")
    eval_seqs = heldout_batch()
    before = evaluate(model, mtp, eval_seqs)
    if log:
        log(f"before: heldout loss {before['heldout_loss']:.3f}, entropy {before['expert_load_entropy']}")

    named = list(model.named_parameters()) + (list(mtp.named_parameters()) if mtp is not None else [])
    params = [p for _, p in named if p.requires_grad]
    router = [p for n, p in named if p.requires_grad and n.endswith("mlp.gate.weight")]
    decay = [p for n, p in named if p.requires_grad and p.dim() >= 2 and not n.endswith("mlp.gate.weight")]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY, "lr_mult": 1.0},
                             {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
                             {"params": router, "weight_decay": 0.0, "lr_mult": ROUTER_LR_MULT}],
                            lr=LR, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = _batches(stream, BATCH_SIZE, SEQ_LEN + 1, gen)
    model.train()
    if mtp is not None:
        mtp.train()
    recent: list[float] = []
    t_train = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps) * group["lr_mult"]
        loss, mtp_loss = forward_losses(model, mtp, next(batches))
        total = loss if mtp_loss is None else loss + MTP_LOSS_WEIGHT * mtp_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if log and (step + 1) % 50 == 0:
            log(f"step {step + 1}/{steps}: train loss {sum(recent) / len(recent):.3f} "
                f"({(time.perf_counter() - t_train) / (step + 1):.2f} s/step)")
    train_time = time.perf_counter() - t_train
    model.eval()
    if mtp is not None:
        mtp.eval()
    after = evaluate(model, mtp, eval_seqs)
    if log:
        log(f"after: heldout loss {after['heldout_loss']:.3f}, entropy {after['expert_load_entropy']}")
    return {
        "train_tokens_available": int(len(stream)),
        "train_tokens_seen": steps * BATCH_SIZE * SEQ_LEN,
        "heldout_tokens": int(eval_seqs.numel()),
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "torch_threads": threads,
        "before": before,
        "after": after,
    }


def train_testbed(
    out_dir: str | os.PathLike,
    size: str = "tiny",
    seed: int = 0,
    steps: int | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build the `size` testbed from `seed`, train it `steps` steps and write it (with train_report.json)."""
    steps = DEFAULT_STEPS.get(size, 200) if steps is None else steps
    t0 = time.perf_counter()
    model, mtp = new_testbed_model(size, seed)
    report = {"hyperparams": _hyperparams(size, seed, steps), **train_model(model, mtp, steps, seed=seed, log=log)}
    report["code_version"] = TRAIN_CODE_VERSION
    report["corpus"] = corpus_fingerprint()
    report["total_time_s"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(report, indent=2) + "\n"
    return save_testbed(model, mtp, out_dir, size, force=force, extra_files={REPORT_NAME: text})


def trained_testbed(
    size: str = "tiny",
    seed: int = 0,
    steps: int | None = None,
    cache: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """A trained testbed checkpoint, from the cache when present (`$GLMGGUF_CACHE/testbed/<size>-trained-<key>`).

    The key covers the config, seed, steps, training hyperparameters and code version, the corpus and torch.
    With `cache=False` the model is retrained and the cache entry replaced.
    """
    steps = DEFAULT_STEPS.get(size, 200) if steps is None else steps
    out = cache_root() / "testbed" / f"{size}-trained-{cache_key(size, seed, steps)}"
    if cache and (out / REPORT_NAME).is_file():
        return out
    with cache_entry_lock(out):
        if cache and (out / REPORT_NAME).is_file():  # trained by another process meanwhile
            return out
        return train_testbed(out, size=size, seed=seed, steps=steps, force=True, log=log)


def read_report(checkpoint_dir: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint_dir) / REPORT_NAME).read_text())
