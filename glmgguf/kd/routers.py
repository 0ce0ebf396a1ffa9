"""The routers made trainable: float32 master gate weights, and the correction bias as a parameter with a
straight-through gradient (see `glmgguf.kd.train`)."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from glmgguf.kd.student import Student


def surrogate_bias_forward(self, hidden_states: torch.Tensor):
    """`GlmMoeDsaTopkRouter.forward` with a straight-through gradient for the correction bias (same values)."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    scores = router_logits.sigmoid()
    bias = self.e_score_correction_bias
    choice = scores.detach() + bias.detach()
    g, e = self.num_group, self.num_experts
    if g > 1:
        group_scores = choice.view(-1, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx) + (bias - bias.detach())[idx]  # + exactly 0: forward unchanged
    if self.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return router_logits, weights * self.routed_scaling_factor, idx


def free_routers(student: Student, train_bias: bool) -> dict[str, nn.Parameter]:
    """Make the routers trainable (float32 master weights); returns HF name -> parameter."""
    params: dict[str, nn.Parameter] = {}
    for L, gate in student.gates().items():
        w = nn.Parameter(gate.weight.detach().to(torch.float32), requires_grad=True)
        gate.weight = w
        params[f"model.layers.{L}.mlp.gate.weight"] = w
        if train_bias:
            b = gate.e_score_correction_bias.detach().to(torch.float32).clone()
            del gate._buffers["e_score_correction_bias"]
            gate.e_score_correction_bias = nn.Parameter(b, requires_grad=True)
            params[f"model.layers.{L}.mlp.gate.e_score_correction_bias"] = gate.e_score_correction_bias
            gate.forward = types.MethodType(surrogate_bias_forward, gate)
    return params
