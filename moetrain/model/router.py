"""Top-k token router and its auxiliary losses.

Shape legend: T tokens, D model dim, E experts, K experts per token (top-k).

The router runs in fp32 whatever the model dtype: the softmax over experts and the aux losses are sensitive
to rounding. ``top_k`` is a plain attribute, so a schedule can switch it at run time without rebuilding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, without its coefficient.

    ``loss = E * sum_i f_i * P_i`` where ``f_i = (#assignments routed to expert i) / (T * K)`` (a count, no
    gradient) and ``P_i = mean_t probs[t, i]`` (differentiable). It is 1.0 when routing is perfectly uniform
    and E when every token goes to one expert. The trainer multiplies it by ``moe.aux_loss_coef``.

    Computed over the tokens of one forward call: one micro-batch on one data-parallel rank.
    """
    T, K = expert_idx_TK.shape
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    f_E = counts_E / (T * K)
    P_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE), without its coefficient: ``mean_t (log sum_i exp(logits[t, i]))^2``.

    Keeps router logits small so the softmax stays well conditioned. The trainer multiplies it by
    ``moe.z_loss_coef``.
    """
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


@dataclass
class Routing:
    logits_TE: torch.Tensor  # fp32
    probs_TE: torch.Tensor  # fp32 softmax over all experts
    expert_idx_TK: torch.Tensor  # int64, best expert first
    gates_TK: torch.Tensor  # fp32 combine weights


class TopKRouter(nn.Module):
    """Linear scores -> softmax over experts -> top-k; gates optionally renormalized over the chosen k."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool = True) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight_ED.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TK, expert_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.renormalize and self.top_k > 1:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, expert_idx_TK, gates_TK)
