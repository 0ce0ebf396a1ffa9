"""GLM-5.x routing exactly as the model applies it (transformers' `GlmMoeDsaTopkRouter`, llama.cpp's glm-dsa).

For one token x (hidden size H) and a router with weight W [E, H], correction bias b [E]:

    s      = sigmoid(W x)                                  scores, computed in float32
    c      = s + b                                         used for SELECTION only
    groups = E experts split into n_group contiguous groups; group score = sum of its 2 largest c
    keep the topk_group best groups, c of every expert outside them := -inf
    S      = indices of the top_k largest c                the selected experts (k = num_experts_per_tok)
    g_j    = s_j / (sum_{i in S} s_i + 1e-20)   if norm_topk_prob, else s_j        for j in S
    g_j   *= routed_scaling_factor
    y      = sum_{j in S} g_j * f_j(x)  (+ shared experts)

g_j is the weight that really multiplies expert j's output: the bias changes WHICH experts are chosen but not
their weights, and the normalization runs over the selected k only. (A softmax over raw logits, as some REAP
observers use for GLM, gives other weights and, ignoring the bias, other experts.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmgguf.reap.errors import RoutingError


@dataclass(frozen=True)
class RouterSpec:
    """The routing hyperparameters of one MoE layer."""

    n_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: dict, n_experts: int | None = None) -> RouterSpec:
        """From a config.json dict; `n_experts` overrides `n_routed_experts` (per-layer counts)."""
        return cls(
            n_experts=int(n_experts if n_experts is not None else cfg["n_routed_experts"]),
            top_k=int(cfg["num_experts_per_tok"]),
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        )

    def check(self) -> None:
        """Raise RoutingError unless this router can select `top_k` experts."""
        e, g = self.n_experts, self.n_group
        if self.top_k < 1 or e < self.top_k:
            raise RoutingError(f"{e} experts cannot serve num_experts_per_tok={self.top_k}")
        if g < 1 or e % g:
            raise RoutingError(f"n_group={g} does not divide {e} experts")
        if not 1 <= self.topk_group <= g:
            raise RoutingError(f"topk_group={self.topk_group} must lie in 1..n_group={g}")
        if g > 1 and e // g < 2:
            raise RoutingError(f"groups of {e // g} expert(s): group scores need at least 2 experts per group")
        if self.topk_group * (e // g) < self.top_k:
            raise RoutingError(f"topk_group={self.topk_group} groups of {e // g} experts hold fewer than "
                               f"num_experts_per_tok={self.top_k}")


def route(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens [T, H]: returns (weights [T, k] float32, expert indices [T, k] int64), see the module doc."""
    x = hidden.reshape(-1, hidden.shape[-1])
    scores = torch.sigmoid(x.float() @ weight.float().t())
    choice = scores if bias is None else scores + bias.float()
    e, g = spec.n_experts, spec.n_group
    if g > 1:
        group_scores = choice.view(-1, g, e // g).topk(2, dim=-1).values.sum(-1)
        group_idx = group_scores.topk(spec.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e).bool()
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    idx = choice.topk(spec.top_k, dim=-1, sorted=False).indices
    w = scores.gather(1, idx)
    if spec.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * spec.routed_scaling_factor, idx
