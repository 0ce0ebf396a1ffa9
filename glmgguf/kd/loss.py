"""Sparse KL(teacher || student) over a cached top-k of the teacher, with the missing mass as one bucket.

The teacher cache keeps, per position, the teacher's k most likely tokens T (ids and log-probs, fp16) and the
log of the probability mass outside them, log p_R = log(1 - sum_{i in T} p_i) (fp32, computed from the full
distribution, not from the rounded top-k). Both distributions are coarse-grained onto the same k + 1 buckets:
the k teacher tokens, and "any other token":

    p_i  (i in T)   teacher top-k probabilities        p_R = teacher mass outside T
    q_i  (i in T)   student probabilities of T          q_R = 1 - sum_{i in T} q_i = student mass outside T

    KL_k(p || q) = sum_{i in T} p_i (log p_i - log q_i)  +  p_R (log p_R - log q_R)

q is the student's full softmax (log q_i = z_i - logsumexp z); log q_R is a logsumexp over the student's logits
with T masked out (exact, no 1 - sum cancellation). The teacher's k + 1 buckets are renormalized to sum to one
(fp16 rounding of the log-probs moves the sum by ~1e-3). Terms with p = 0 (k = vocab: p_R = 0) contribute 0.

Properties: KL_k >= 0; KL_k = the full-vocabulary KL when k = vocab; for k < vocab it is a lower bound of the
full KL (merging outcomes never increases a KL divergence), tight when p_R is small. The student is pushed to
give the teacher's top-k the teacher's probabilities AND to put the teacher's remaining mass, no more and no less,
on everything else (without the bucket, a student could inflate q outside T at no cost). Positions are weighted
uniformly: the loss of a batch is the mean over all its positions.
"""

from __future__ import annotations

import torch


def sparse_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              rest_logprob: torch.Tensor) -> torch.Tensor:
    """KL_k(teacher || student) per position (float32, shape of `student_logits` without the vocab axis).

    student_logits [..., V]; topk_ids [..., k] (int); topk_logprobs [..., k] (teacher log-probs, any float dtype);
    rest_logprob [...] (log of the teacher's mass outside its top-k; -inf when k = V).
    """
    z = student_logits.float()
    ids = topk_ids.long()
    lse = torch.logsumexp(z, dim=-1)
    lq_top = z.gather(-1, ids) - lse.unsqueeze(-1)
    lq_rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1) - lse
    lp = torch.cat([topk_logprobs.float(), rest_logprob.float().unsqueeze(-1)], dim=-1)
    lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    lq = torch.cat([lq_top, lq_rest.unsqueeze(-1)], dim=-1)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1)


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(teacher || student) per position over the whole vocabulary (float64)."""
    lp = torch.log_softmax(teacher_logits.double(), -1)
    lq = torch.log_softmax(student_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def top1_agreement(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Per position: does the student's most likely token equal the teacher's (topk_ids[..., 0], sorted)?"""
    return student_logits.argmax(-1) == topk_ids[..., 0].long()


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache stores for teacher logits [..., V]: top-k log-probs (fp16, descending), their ids (int32),
    and the log of the mass outside them (fp32), all computed in float32 from the full distribution."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    k = min(k, lp.shape[-1])
    vals, ids = lp.topk(k, dim=-1, sorted=True)
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), dim=-1)
    return vals.to(torch.float16), ids.to(torch.int32), rest
