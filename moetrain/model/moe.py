"""The MoE layer: router -> capacity -> permutation -> grouped experts -> gate-weighted combine.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per token.

Runtime-switchable: ``top_k``, ``capacity_factor`` and ``drop_policy`` are plain attributes read on every
call, so a schedule changes them without rebuilding the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.model.dispatch import capacity_keep_mask, combine, expert_capacity, permute
from moetrain.model.experts import GroupedExperts
from moetrain.model.router import TopKRouter, load_balancing_loss, router_z_loss


@dataclass
class MoEStats:
    """What one forward call of one MoE layer reports to the trainer."""

    aux_loss: torch.Tensor  # differentiable, no coefficient
    z_loss: torch.Tensor  # differentiable, no coefficient
    routed_per_expert_E: torch.Tensor  # assignments the router chose, before capacity (no grad)
    tokens_per_expert_E: torch.Tensor  # assignments computed, after capacity (no grad)

    @property
    def dropped(self) -> int:
        return int(self.routed_per_expert_E.sum() - self.tokens_per_expert_E.sum())


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        min_capacity: int = 4,
        renormalize: bool = True,
        grouped_mm_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.min_capacity = min_capacity
        self.router = TopKRouter(d_model, num_experts, top_k, renormalize)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, grouped_mm_impl)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"moe.top_k={k} must be between 1 and moe.num_experts={self.num_experts}")
        self.router.top_k = k

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD)
        capacity = expert_capacity(B * S, self.num_experts, self.top_k, self.capacity_factor, self.min_capacity)
        keep_TK = None
        if capacity is not None:
            keep_TK = capacity_keep_mask(
                routing.expert_idx_TK, routing.gates_TK, self.num_experts, capacity, self.drop_policy
            )
        perm = permute(routing.expert_idx_TK, self.num_experts, keep_TK)
        y_AD = self.experts(x_TD[perm.token_A], perm.tokens_per_expert_E)
        out_TD = combine(y_AD, perm, routing.gates_TK, B * S)
        stats = MoEStats(
            aux_loss=load_balancing_loss(routing.probs_TE, routing.expert_idx_TK, self.num_experts),
            z_loss=router_z_loss(routing.logits_TE),
            routed_per_expert_E=torch.bincount(routing.expert_idx_TK.reshape(-1), minlength=self.num_experts),
            tokens_per_expert_E=perm.tokens_per_expert_E,
        )
        return out_TD.view(B, S, D), stats
